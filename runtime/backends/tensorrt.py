"""TensorRT / TensorRT-RTX runtime backend: one deserialized engine per component, driven by
cuda-python.

One code path serves both flavours (the manifest entry's ``backend`` says which module loads
the plan: ``tensorrt`` or ``tensorrt_rtx``). Loaded by
:func:`trt_sd.runtime.backends.create_backend` only when the flavour imports and a GPU is
present. Type-checked in CI against the TensorRT 10 stubs and against stubs generated from the
TensorRT-RTX bindings (``--always-true TRT_RTX_TYPES``); run on a GPU by the tests marked ``gpu``.

TensorRT-RTX compiles kernels for the actual GPU when an engine loads (JIT); its **runtime
cache** keeps them, so only the first load on a machine pays. The cache lives where the export
said (``runtime_cache``: relative paths inside the engine directory) or under
``~/.cache/trt-sd/tensorrt-rtx/runtime-cache``, one file per engine, written after the first
call.

What it does, and why:

* **Checks before it runs**: the engine's TensorRT version and GPU compute capability against
  what the manifest says it was built with. TensorRT refuses (or crashes on) a plan from
  another version or architecture; a clear ``ManifestError`` says which and how to rebuild.
* **One stream, one scratch allocation per GPU** (:class:`DeviceContext`): the engines of a
  pipeline run one after another, so their activation memory is one buffer sized for the
  largest (``USER_MANAGED`` allocation strategy), not one per engine.
* **Buffers reused across steps**: per-tensor device buffers only grow, so a 20-step
  generation allocates on its first step and never again.
* **Device residency**: outputs named in ``keep_on_device`` come back as :class:`DeviceTensor`
  (the text embeddings, fed to every UNet step without a host round trip).
* **CUDA graphs** for engines built with static shapes: the first call runs normally, the
  second captures, later calls replay the graph (one launch instead of one per kernel).
* **CUDA-event timing**: ``last_gpu_seconds`` is the GPU time of the latest call.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Collection, Hashable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from trt_sd.models.descriptors import Component
from trt_sd.models.errors import BackendUnavailableError, InputError, ManifestError
from trt_sd.models.lora import Patch
from trt_sd.models.manifest import ComponentEntry
from trt_sd.models.paths import cache_root
from trt_sd.models.tensorrt_check import FLAVOURS, import_tensorrt

from .base import EngineBackend
from .cuda import CudaGraph, DeviceBuffer, DeviceContext, EventTimer, check, cudart
from .tensorrt_refit import BASE_KEY, RefitState, RefitView, check_refittable, refit

#: mypy: ``--always-true TRT_RTX_TYPES`` checks this module against the TensorRT-RTX bindings.
TRT_RTX_TYPES = False
if TYPE_CHECKING:
    import tensorrt_rtx
    from typing_extensions import Buffer

    if TRT_RTX_TYPES:
        import tensorrt_rtx as trt
    else:
        import tensorrt as trt

RTX = "tensorrt-rtx"


def can_serve(entry: ComponentEntry) -> bool:
    """TensorRT runs serialized engines (``.plan``) of its own flavour; ONNX entries belong to
    ONNX Runtime."""
    return entry.backend in FLAVOURS


def label(flavour: str) -> str:
    return "TensorRT-RTX" if flavour == RTX else "TensorRT"


def runtime_cache_path(engine_dir: Path, entry: ComponentEntry) -> Path:
    """Where the TensorRT-RTX JIT cache of one engine lives (see the module docstring)."""
    where = entry.extra.get("runtime_cache")
    if where:
        folder = Path(os.path.expanduser(str(where)))
        folder = folder if folder.is_absolute() else Path(engine_dir) / folder
    else:
        folder = cache_root() / "tensorrt-rtx" / "runtime-cache"
    return folder / (Path(entry.file).name + ".cache")


def compute_capability(device: int) -> str:
    rt = cudart()
    attr = rt.cudaDeviceAttr
    major = check(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), "cc")
    minor = check(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), "cc")
    return f"{major}.{minor}"


def check_compatibility(entry: ComponentEntry, trt_version: str, device_cc: str) -> None:
    """Refuse an engine this TensorRT / GPU cannot run, saying what it was built for.

    Plain engines need the exact TensorRT version and compute capability they were built
    with; version-compatible engines load on the same or a later TensorRT of the same major
    version; hardware-compatible (Ampere+) engines load on any compute capability >= 8.0.
    """
    built = str(entry.extra.get("tensorrt_version", ""))
    built_cc = str(entry.extra.get("compute_capability", ""))
    flavour = entry.backend if entry.backend in FLAVOURS else "tensorrt"
    name = label(flavour)
    if flavour == RTX:
        targets = [str(c) for c in entry.extra.get("compute_capabilities") or built_cc.split(",")]
        if device_cc not in targets:
            raise ManifestError(
                f"{entry.file} is a TensorRT-RTX engine built for GPU compute capabilities "
                f"{', '.join(targets)}; this GPU is {device_cc}: rebuild with "
                f"`trt-sd export --backend tensorrt-rtx --compute-capability {device_cc}` "
                "if TensorRT-RTX supports it (it has no Hopper, 9.x, target), or use "
                "--backend onnxruntime-cuda with an ONNX export"
            )
        built_cc = device_cc  # the per-GPU check below is done
    rebuild = f"rebuild it with `trt-sd export --backend {flavour}` on this machine"
    if entry.extra.get("version_compatible"):
        same_major = built.split(".")[0] == trt_version.split(".")[0]
        if not same_major or _version_tuple(trt_version) < _version_tuple(built):
            raise ManifestError(
                f"{entry.file} was built with {name} {built} (version-compatible); this "
                f"{name} {trt_version} cannot load it: {rebuild}"
            )
    elif built != trt_version:
        raise ManifestError(
            f"{entry.file} was built with {name} {built}, this is {name} {trt_version}: {rebuild}"
        )
    level = entry.extra.get("hardware_compatible", "none")
    if level == "ampere+":
        if _version_tuple(device_cc) < (8, 0):
            raise ManifestError(
                f"{entry.file} is an Ampere+ engine; this GPU is compute capability {device_cc}"
            )
    elif built_cc != device_cc:
        raise ManifestError(
            f"{entry.file} was built for GPU compute capability {built_cc}, this GPU is "
            f"{device_cc}: {rebuild}"
        )


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


class TensorRTBackend(EngineBackend):
    """One TensorRT (or TensorRT-RTX) engine on one GPU."""

    kind = "tensorrt"

    def __init__(
        self, path: Path, component: Component, entry: ComponentEntry, device_id: int
    ) -> None:
        super().__init__(component, entry)
        self.flavour = entry.backend if entry.backend in FLAVOURS else "tensorrt"
        self.kind = self.flavour
        if TYPE_CHECKING:  # one code path, type-checked against each flavour's API
            if TRT_RTX_TYPES:
                import tensorrt_rtx as trt
            else:
                import tensorrt as trt
        else:
            trt = import_tensorrt(self.flavour)
        name = label(self.flavour)
        self.device = DeviceContext.get(device_id)
        check_compatibility(entry, str(trt.__version__), compute_capability(device_id))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise ManifestError(f"{name} could not deserialize {path.name} (see log above)")
        self.engine = engine
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self._cache_path: Path | None = None
        self._cache: Any = None
        if self.flavour == RTX:
            self._cache_path = runtime_cache_path(Path(path).parent, entry)
            context = self._rtx_context(engine, strategy)
        else:
            context = engine.create_execution_context(strategy)
        if context is None:
            raise BackendUnavailableError(f"{name} could not create a context for {path.name}")
        self.context = context
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        wanted = {s.name for s in (*self.inputs, *self.outputs)}
        if names != wanted:
            raise ManifestError(
                f"{path.name} has tensors {sorted(names)}, the descriptor says {sorted(wanted)}"
            )
        self._buffers = {name: DeviceBuffer() for name in wanted}
        self._timer = EventTimer()
        self._graph: CudaGraph | None = None
        self._calls = 0
        self.use_cuda_graph = bool(entry.extra.get("static_shapes"))
        self.last_gpu_seconds = 0.0
        self.engine_path, self.refit_state = Path(path), RefitState()  # run-time LoRA

    def _rtx_context(
        self, engine: trt.ICudaEngine, strategy: trt.ExecutionContextAllocationStrategy
    ) -> trt.IExecutionContext:
        """A context whose runtime config carries the persisted JIT cache (TensorRT-RTX)."""
        rtx_engine = cast("tensorrt_rtx.ICudaEngine", engine)
        config = rtx_engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(
            cast("tensorrt_rtx.ExecutionContextAllocationStrategy", strategy)
        )
        cache = config.create_runtime_cache()
        assert self._cache_path is not None
        if self._cache_path.is_file():
            cache.deserialize(self._cache_path.read_bytes())
        config.set_runtime_cache(cache)
        self._cache = cache
        return cast("trt.IExecutionContext", rtx_engine.create_execution_context(config))

    def _save_runtime_cache(self) -> None:
        """Persist the JIT cache after the first call (kernels compiled by then)."""
        if self._cache is None or self._cache_path is None:
            return
        cache = cast("tensorrt_rtx.IRuntimeCache", self._cache)
        data = cache.serialize()
        self._cache = None  # once per load
        if data is None:
            return
        path = self._cache_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            tmp.write_bytes(memoryview(cast("Buffer", data)))  # IHostMemory is a buffer
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache location costs the next load its JIT time, nothing else

    def _bind_inputs(self, feeds: Mapping[str, Any]) -> None:
        for spec in self.inputs:
            value = feeds[spec.name]
            buf = self._buffers[spec.name]
            if isinstance(value, DeviceTensor):
                if value.device != self.device.device:
                    raise InputError(f"{self.name}: input {spec.name} lives on another GPU")
                shape = value.shape
                # Copy rather than alias so addresses stay fixed for a captured CUDA graph.
                self.device.copy(buf.ensure(value.nbytes), value.ptr, value.nbytes)
            else:
                array = np.ascontiguousarray(value, dtype=spec.dtype)
                shape = array.shape
                self.device.upload(buf.ensure(array.nbytes), array)
            if not self.context.set_input_shape(spec.name, shape):
                raise InputError(
                    f"{self.name}: input {spec.name} of shape {shape} is outside the engine's "
                    "built shape range"
                )
            self.context.set_tensor_address(spec.name, buf.ptr)

    def _bind_outputs(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for spec in self.outputs:
            dims = self.context.get_tensor_shape(spec.name)
            shape = tuple(dims[i] for i in range(len(dims)))
            nbytes = int(np.prod(shape)) * spec.dtype.itemsize
            self.context.set_tensor_address(spec.name, self._buffers[spec.name].ensure(nbytes))
            shapes[spec.name] = shape
        size = self.engine.device_memory_size_v2
        self.context.set_device_memory(self.device.scratch.ensure(size), size)
        return shapes

    def _execute(self) -> None:
        stream = self.device.stream
        if self._graph is not None:
            self._graph.launch(stream)
            return
        capture = self.use_cuda_graph and self._calls == 1  # warm-up first, then capture
        if capture:
            graph = CudaGraph()
            graph.capture_begin(stream)
        if not self.context.execute_async_v3(self.device.stream_handle):
            raise BackendUnavailableError(f"TensorRT failed to run the {self.name} engine")
        if capture:
            graph.capture_end(stream)
            graph.launch(stream)
            self._graph = graph

    def with_weights(self, key: Hashable, patches: Callable[[], dict[str, Patch]]) -> EngineBackend:
        """Run-time LoRA: a view that refits this engine to its set (:mod:`.tensorrt_refit`)."""
        check_refittable(self)
        return RefitView(self, key, patches)

    def run_with_weights(
        self,
        key: Hashable,
        patches: Callable[[], dict[str, Patch]],
        feeds: Mapping[str, Any],
        keep_on_device: Collection[str] = (),
    ) -> dict[str, Any]:
        """One call with the engine holding weight set ``key`` (refit first if it does not)."""
        with self.refit_state.lock:
            if self.refit_state.key != key:
                refit(self, key, patches)
            return self._run(feeds, keep_on_device)

    def run(self, feeds: Mapping[str, Any], keep_on_device: Collection[str] = ()) -> dict[str, Any]:
        return self.run_with_weights(BASE_KEY, dict, feeds, keep_on_device)

    def _run(
        self, feeds: Mapping[str, Any], keep_on_device: Collection[str] = ()
    ) -> dict[str, Any]:
        feeds = self.cast_feeds(feeds)
        with self.device.lock:
            check(cudart().cudaSetDevice(self.device.device), "cudaSetDevice")
            self._bind_inputs(feeds)
            shapes = self._bind_outputs()
            stream = self.device.stream
            self._timer.start(stream)
            self._execute()
            self._timer.stop(stream)
            self._calls += 1
            out: dict[str, Any] = {}
            for spec in self.outputs:
                shape, src = shapes[spec.name], self._buffers[spec.name]
                if spec.name in keep_on_device:
                    out[spec.name] = DeviceTensor.copy_of(self.device, src.ptr, shape, spec.dtype)
                else:
                    out[spec.name] = self.device.download(src.ptr, np.empty(shape, spec.dtype))
            self.device.synchronize()
            self.last_gpu_seconds = self._timer.seconds()
            self._save_runtime_cache()
        return out

    def to_host(self, value: Any) -> np.ndarray:
        if isinstance(value, DeviceTensor):
            with self.device.lock:
                array = self.device.download(value.ptr, np.empty(value.shape, value.dtype))
                self.device.synchronize()
            return array
        return np.asarray(value)


class DeviceTensor:
    """An output kept on the GPU, in memory it owns (freed when the tensor is collected), so a
    later call of the same engine cannot overwrite it under another request."""

    def __init__(self, buffer: DeviceBuffer, shape: tuple[int, ...], dtype: np.dtype, device: int):
        self.ptr = buffer.ptr
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.device = device
        weakref.finalize(self, buffer.free)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @classmethod
    def copy_of(
        cls, ctx: DeviceContext, src: int, shape: tuple[int, ...], dtype: np.dtype
    ) -> DeviceTensor:
        buffer = DeviceBuffer()
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ctx.copy(buffer.ensure(nbytes), src, nbytes)
        return cls(buffer, shape, dtype, ctx.device)
