"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python (no torch, cupy).

cuda-python mirrors the C API: every call returns ``(error, *values)``. :func:`check` turns a
non-zero error into a :class:`BackendUnavailableError` naming the call, so a failing
allocation or copy is one clear line instead of a silently wrong image.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from trt_sd.models.errors import BackendUnavailableError


def cudart() -> Any:
    """The CUDA runtime module of cuda-python (13.x layout, falling back to 12.x's)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise BackendUnavailableError(
                "cuda-python is not installed; the TensorRT backend needs it: "
                "pip install 'trt-sd[tensorrt]'"
            ) from None
    return runtime


def check(result: Any, call: str) -> Any:
    """Unpack ``(err, *values)``; raise on error; return the single value (or the tuple)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendUnavailableError(f"CUDA call {call} failed: {err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass
class DeviceBuffer:
    """Device memory that only grows: reused across steps so a generation allocates once."""

    ptr: int = 0
    nbytes: int = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            rt = cudart()
            if self.ptr:
                check(rt.cudaFree(self.ptr), "cudaFree")
            self.ptr = int(check(rt.cudaMalloc(max(nbytes, 256)), "cudaMalloc"))
            self.nbytes = nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr, self.nbytes = 0, 0


class DeviceContext:
    """One GPU's stream and the scratch memory shared by every engine on it.

    TensorRT engines need activation scratch memory; engines of one pipeline run one after
    another on one stream, so one allocation sized for the largest serves them all
    (``ExecutionContextAllocationStrategy.USER_MANAGED``). A lock serialises the calls that
    use it, which is also what keeps ``run`` thread-safe.
    """

    _by_device: ClassVar[dict[int, DeviceContext]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, device: int) -> None:
        rt = cudart()
        check(rt.cudaSetDevice(device), "cudaSetDevice")
        self.device = device
        self.stream = check(rt.cudaStreamCreate(), "cudaStreamCreate")
        self.scratch = DeviceBuffer()
        self.lock = threading.RLock()

    @classmethod
    def get(cls, device: int) -> DeviceContext:
        with cls._registry_lock:
            if device not in cls._by_device:
                cls._by_device[device] = cls(device)
            return cls._by_device[device]

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def upload(self, dst: int, array: np.ndarray) -> None:
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(rt.cudaMemcpyAsync(dst, array.ctypes.data, array.nbytes, kind, self.stream), "H2D")

    def download(self, src: int, out: np.ndarray) -> np.ndarray:
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt.cudaMemcpyAsync(out.ctypes.data, src, out.nbytes, kind, self.stream), "D2H")
        return out

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check(rt.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream), "D2D")


class EventTimer:
    """GPU time of the work enqueued between ``start`` and ``stop`` (CUDA events), so per
    component timings measure the GPU, not how long Python waited."""

    def __init__(self) -> None:
        rt = cudart()
        self._start = check(rt.cudaEventCreate(), "cudaEventCreate")
        self._stop = check(rt.cudaEventCreate(), "cudaEventCreate")

    def start(self, stream: Any) -> None:
        check(cudart().cudaEventRecord(self._start, stream), "cudaEventRecord")

    def stop(self, stream: Any) -> None:
        check(cudart().cudaEventRecord(self._stop, stream), "cudaEventRecord")

    def seconds(self) -> float:
        rt = cudart()
        check(rt.cudaEventSynchronize(self._stop), "cudaEventSynchronize")
        ms = check(rt.cudaEventElapsedTime(self._start, self._stop), "cudaEventElapsedTime")
        return float(ms) / 1000.0


class CudaGraph:
    """A captured sequence of engine launches, replayed with one call (static shapes only)."""

    def __init__(self) -> None:
        self.exec: Any = None

    def capture_begin(self, stream: Any) -> None:
        rt = cudart()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")

    def capture_end(self, stream: Any) -> None:
        rt = cudart()
        graph = check(rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        self.exec = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")

    def launch(self, stream: Any) -> None:
        check(cudart().cudaGraphLaunch(self.exec, stream), "cudaGraphLaunch")
