"""ONNX Runtime backend: CPU provider, or CUDA provider with IO binding.

``onnxruntime`` is imported when a backend is created, never at ``import trt_sd.runtime``: it
costs ~0.1 s to import and a service that only validates requests should not pay it.

Session options, and why (one engine call is a handful of large convolutions / GEMMs, run from
a Python loop that waits for each result):

* ``ORT_ENABLE_ALL`` graph optimisation: constant folding plus the layout and fusion passes
  (conv+activation, attention, GroupNorm, GELU); the one-off cost is paid at load, or once per
  machine with ``TRT_SD_ORT_CACHE`` (:mod:`.ort_cache`).
* intra-op threads = physical cores: the kernels are compute bound; a core's second hardware
  thread adds contention, not throughput. ``TRT_SD_NUM_THREADS=N`` overrides it (several
  pipelines sharing a machine, or a fair single-thread comparison).
* inter-op threads = 1 with sequential execution: the SD graphs are a chain of dependent ops, so
  a parallel executor finds almost nothing to overlap and its scheduling costs per node.
* CPU memory arena and memory-pattern planning on: every step of a generation runs the same
  shapes, so buffers planned on the first call are reused instead of reallocated per step.

``InferenceSession.run`` is thread-safe, and IO bindings are created per call, so one backend
serves concurrent generations.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Collection, Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trt_sd.models.descriptors import Component
from trt_sd.models.errors import BackendUnavailableError, InputError, ManifestError
from trt_sd.models.lora import Patch
from trt_sd.models.manifest import ComponentEntry

from . import ort_cache
from .base import EngineBackend
from .hardware import cuda_device_count, physical_cores
from .ort_lora import PatchedSessions, patched_view

CPU_HINT = "install ONNX Runtime with: pip install 'trt-sd[cpu]'"
GPU_HINT = (
    "the CUDA provider needs onnxruntime-gpu and an NVIDIA GPU: pip uninstall onnxruntime && "
    "pip install 'trt-sd[gpu]'"
)


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(f"ONNX Runtime is not installed; {CPU_HINT}") from None
    return onnxruntime


def cuda_provider_usable() -> bool:
    """onnxruntime-gpu is installed and the driver reports a GPU."""
    try:
        ort = import_onnxruntime()
    except BackendUnavailableError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and cuda_device_count() > 0


def intra_op_threads() -> int:
    """``$TRT_SD_NUM_THREADS`` if set (a positive integer), else the physical core count."""
    value = os.environ.get("TRT_SD_NUM_THREADS", "").strip()
    if not value:
        return physical_cores()
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"TRT_SD_NUM_THREADS must be a positive integer, got {value!r}")
    return int(value)


def session_options(ort: Any) -> Any:
    """The tuned options described in the module docstring."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = intra_op_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_cpu_mem_arena = True
    so.enable_mem_pattern = True
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise
    return so


class OnnxRuntimeBackend(EngineBackend):
    """One ``InferenceSession``. ``device_id=None`` runs on the CPU provider."""

    def __init__(
        self,
        path: Path,
        component: Component,
        entry: ComponentEntry,
        device_id: int | None = None,
    ) -> None:
        super().__init__(component, entry)
        ort = import_onnxruntime()
        self._ort = ort
        self.device_id = device_id
        if device_id is None:
            providers: list[Any] = ["CPUExecutionProvider"]
            self.kind = "onnxruntime-cpu"
        else:
            if not cuda_provider_usable():
                raise BackendUnavailableError(f"ONNX Runtime CUDA provider unavailable; {GPU_HINT}")
            providers = [
                (
                    "CUDAExecutionProvider",
                    {
                        "device_id": device_id,
                        # a new cuDNN algorithm search per shape is paid once; SD runs the same
                        # shapes for every step
                        "cudnn_conv_algo_search": "EXHAUSTIVE",
                        "arena_extend_strategy": "kSameAsRequested",
                        "do_copy_in_default_stream": True,
                    },
                ),
                "CPUExecutionProvider",
            ]
            self.kind = "onnxruntime-cuda"
        cache_root = ort_cache.cache_dir() if device_id is None else None  # InputError as is
        self.path, self.providers = path, providers
        self.lora_sessions = PatchedSessions()
        try:
            self.session = self._cached_session(path, entry, providers, cache_root)
            if self.session is None:
                self.session = ort.InferenceSession(
                    str(path), sess_options=session_options(ort), providers=providers
                )
        except Exception as e:  # ORT raises its own pybind exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ManifestError(
                f"engine file {path.name} (component {entry.name}) could not be loaded: {first}"
            ) from None
        if device_id is not None and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailableError(
                f"ONNX Runtime fell back to the CPU for {entry.name}; {GPU_HINT}"
            )
        self._output_names = [s.name for s in self.outputs]

    def _cached_session(
        self, path: Path, entry: ComponentEntry, providers: list[Any], root: Path | None
    ) -> Any:
        """A CPU session through the optimised-graph cache in ``root`` (see
        :mod:`.ort_cache`), or None to load the plain way."""
        if root is None:  # off, or the CUDA provider (not cached)
            return None
        ort = self._ort
        try:
            cached = ort_cache.entry_for(root, entry, ort.__version__, path)
        except OSError:
            return None  # unreadable here: the plain load reports it
        if cached.ready:
            if cached.intact():
                so = session_options(ort)
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                try:
                    return ort.InferenceSession(
                        str(cached.model), sess_options=so, providers=providers
                    )
                except Exception:  # memory, limits: not the entry's fault, keep it
                    return None
            cached.discard()  # missing or truncated files: rebuild it below
        try:
            if not cached.lock():
                return None  # another process is writing this entry
        except OSError:
            return None  # an unwritable cache only costs the fast load
        try:
            staged = cached.staging()
            so = session_options(ort)
            ort_cache.save_options(so, staged / ort_cache.MODEL)
            try:
                session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
            except Exception:
                shutil.rmtree(staged, ignore_errors=True)
                return None  # e.g. a full disk while saving: load it the plain way
            record = {"engine_file": str(path), "sha256": entry.sha256, "ort": ort.__version__}
            cached.commit(staged, record)
            return session
        except OSError:
            return None
        finally:
            cached.unlock()

    def run(self, feeds: Mapping[str, Any], keep_on_device: Collection[str] = ()) -> dict[str, Any]:
        cast = self.cast_feeds(feeds)
        if self.device_id is None:
            values = self.session.run(self._output_names, cast)
            return dict(zip(self._output_names, values, strict=True))
        return self._run_bound(cast, keep_on_device)

    def _run_bound(self, feeds: dict[str, Any], keep_on_device: Collection[str]) -> dict[str, Any]:
        """CUDA path: inputs already on the GPU (OrtValues from an earlier call) are bound in
        place; outputs in ``keep_on_device`` stay on the GPU, the rest are copied to host."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, value)
        for name in self._output_names:
            if name in keep_on_device:
                binding.bind_output(name, "cuda", self.device_id)
            else:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return {
            name: value if name in keep_on_device else value.numpy()
            for name, value in zip(self._output_names, outputs, strict=True)
        }

    def with_weights(self, key: Hashable, patches: Callable[[], dict[str, Patch]]) -> EngineBackend:
        """A session with patched initializers, from a small LRU (:mod:`.ort_lora`)."""
        return patched_view(self, self.path, self.providers, key, patches)  # type: ignore[no-any-return]

    def to_host(self, value: Any) -> np.ndarray:
        if isinstance(value, self._ort.OrtValue):
            return np.asarray(value.numpy())
        return np.asarray(value)
