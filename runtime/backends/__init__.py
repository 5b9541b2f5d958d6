"""Engine backends behind one interface (:class:`EngineBackend`) and the choice between them.

``backend="auto"`` picks, per component, the fastest library that can serve the engine file:

1. TensorRT, when ``import tensorrt`` works, a GPU is present and the TensorRT runtime backend
   (module :data:`TENSORRT_MODULE`, written by the TensorRT work) says it can serve the file;
2. ONNX Runtime with the CUDA provider, when onnxruntime-gpu is installed and a GPU is present;
3. ONNX Runtime on the CPU.

The TensorRT hook is a module, not a hard import, so the runtime works (and this choice stays
correct) in installs without TensorRT. The module must provide
``TensorRTBackend(path, component, entry, device_id)`` (an :class:`EngineBackend`) and
``can_serve(entry) -> bool``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from trt_sd.models.descriptors import Component
from trt_sd.models.errors import BackendUnavailableError, InputError
from trt_sd.models.manifest import ComponentEntry
from trt_sd.models.tensorrt_check import FLAVOURS, import_tensorrt, install_hint

from .base import EngineBackend, IOSpec, io_specs
from .hardware import cuda_device_count, physical_cores

BACKEND_CHOICES = (
    "auto",
    "tensorrt",
    "tensorrt-rtx",
    "onnxruntime",
    "onnxruntime-cuda",
    "onnxruntime-cpu",
)
#: What a TensorRT-RTX engine needs to run (its targets; Hopper 9.x is not among them).
RTX_GPUS = "an RTX-class NVIDIA GPU (compute capability 8.0, 8.6, 8.9 or 12.x)"
TENSORRT_MODULE = "trt_sd.runtime.backends.tensorrt"

__all__ = [
    "BACKEND_CHOICES",
    "EngineBackend",
    "IOSpec",
    "create_backend",
    "cuda_device_count",
    "io_specs",
    "physical_cores",
    "resolve_backend",
]


def _tensorrt_module(flavour: str = "tensorrt") -> ModuleType:
    """The TensorRT runtime backend module, or BackendUnavailableError saying what is missing
    (``flavour``: ``tensorrt`` or ``tensorrt-rtx``, the engine's manifest backend)."""
    if cuda_device_count() == 0:
        if flavour == "tensorrt-rtx":
            raise BackendUnavailableError(
                f"TensorRT-RTX engines need {RTX_GPUS} and none was found; on this machine "
                "export ONNX engines (--backend onnxruntime) instead"
            )
        raise BackendUnavailableError(
            f"TensorRT needs an NVIDIA GPU and none was found; {install_hint(flavour)}"
        )
    import_tensorrt(flavour)
    try:
        return importlib.import_module(TENSORRT_MODULE)
    except ModuleNotFoundError as e:
        if e.name != TENSORRT_MODULE:
            raise
        raise BackendUnavailableError(
            "this trt-sd install has no TensorRT runtime backend; use --backend onnxruntime"
        ) from None


def _tensorrt_serves(entry: ComponentEntry) -> bool:
    try:
        return bool(_tensorrt_module().can_serve(entry))
    except BackendUnavailableError:
        return False


def resolve_backend(requested: str, entry: ComponentEntry) -> str:
    """The concrete backend for one component: "tensorrt", "tensorrt-rtx", "onnxruntime-cuda"
    or "onnxruntime-cpu". Raises InputError for an unknown name or an impossible pairing and
    BackendUnavailableError (with an install hint) when the library is missing."""
    if requested not in BACKEND_CHOICES:
        raise InputError(f"unknown backend {requested!r}; choose from {', '.join(BACKEND_CHOICES)}")
    from .onnxruntime import cuda_provider_usable  # cheap: onnxruntime itself loads lazily

    if entry.backend in FLAVOURS:
        # A .plan runs only on its own flavour; `auto` takes it there or says why it cannot.
        if requested not in ("auto", entry.backend):
            kind = "TensorRT-RTX" if entry.backend == "tensorrt-rtx" else "TensorRT"
            raise InputError(
                f"component {entry.name} is a {kind} engine ({entry.file}); {requested} "
                f"cannot run it: use --backend {entry.backend} or export ONNX engines"
            )
        _tensorrt_module(entry.backend)
        return entry.backend
    if requested in FLAVOURS:
        _tensorrt_module(requested)  # what is missing here comes first, with how to install it
        raise BackendUnavailableError(
            f"{entry.file} is an ONNX graph; --backend {requested} runs engines built with "
            f"`trt-sd export --backend {requested}`"
        )
    if requested == "auto" and _tensorrt_serves(entry):
        return "tensorrt"
    if requested == "onnxruntime-cpu":
        return "onnxruntime-cpu"
    if requested == "onnxruntime-cuda" or cuda_provider_usable():
        return "onnxruntime-cuda"
    return "onnxruntime-cpu"


def create_backend(
    requested: str,
    engine_dir: Path,
    component: Component,
    entry: ComponentEntry,
    device_id: int | None = None,
) -> EngineBackend:
    """Load one component's engine with the backend :func:`resolve_backend` picks.

    ``device_id`` selects the GPU for GPU backends (default 0); asking for a device on the CPU
    backend is an InputError rather than silently ignored.
    """
    kind = resolve_backend(requested, entry)
    path = Path(engine_dir) / entry.file
    if kind == "onnxruntime-cpu":
        if device_id is not None:
            raise InputError(
                f"devices=[{device_id}] needs a GPU backend, but {entry.name} runs on the CPU "
                "(no GPU or no GPU-enabled engine library here)"
            )
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, component, entry, None)
    gpu = 0 if device_id is None else device_id
    if gpu >= max(1, cuda_device_count()):
        raise InputError(f"GPU {gpu} does not exist; this machine has {cuda_device_count()}")
    if kind == "onnxruntime-cuda":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, component, entry, gpu)
    module = _tensorrt_module(kind)
    backend: EngineBackend = module.TensorRTBackend(path, component, entry, gpu)
    return backend
