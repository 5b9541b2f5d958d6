"""Engine backends behind one interface (:class:`EngineBackend`) and the choice between them.

``backend="auto"`` picks, per component, the fastest library that can serve the engine file:

1. TensorRT, when ``import tensorrt`` works, a GPU is present and the TensorRT runtime backend
   (module :data:`TENSORRT_MODULE`, written by the TensorRT work) says it can serve the file;
2. ONNX Runtime with the CUDA provider, when onnxruntime-gpu is installed and a GPU is present;
3. OpenVINO in bf16 (``openvino``), when it is installed, the CPU computes bf16 natively
   (:func:`.hardware.cpu_bf16`) and the engine is an fp32 or INT8 ONNX graph of SD size
   (:data:`OPENVINO_AUTO_PRECISIONS`, :data:`OPENVINO_AUTO_MIN_BYTES`): there it runs the
   fp32 UNet ~1.5x faster than ONNX Runtime at the same prompt accuracy, and the INT8 one
   ~10-20% faster than ONNX Runtime's int8 kernels (docs/benchmarks.md "## CPU peers" and
   "## CPU peers, session 2", docs/quality.md "## bf16 on the CPU"). Without native bf16
   OpenVINO's fp32 is no faster than ONNX Runtime's, so ONNX Runtime stays;
4. ONNX Runtime on the CPU.

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
from .hardware import cpu_bf16, cuda_device_count, physical_cores

BACKEND_CHOICES = (
    "auto",
    "tensorrt",
    "tensorrt-rtx",
    "onnxruntime",
    "onnxruntime-cuda",
    "onnxruntime-cpu",
    "openvino",
    "openvino-fp32",
    "openvino-bf16",
)
#: What a TensorRT-RTX engine needs to run (its targets; Hopper 9.x is not among them).
RTX_GPUS = "an RTX-class NVIDIA GPU (compute capability 8.0, 8.6, 8.9 or 12.x)"
OPENVINO_KINDS = ("openvino", "openvino-fp32", "openvino-bf16")
#: engine precisions ``auto`` hands to OpenVINO on bf16 CPUs (see :func:`openvino_wins`): fp32
#: (bf16 arithmetic, ~0.5x ONNX Runtime per SD 1.5 UNet call) and INT8 Q/DQ graphs (OpenVINO's
#: int8 kernels with bf16 between them: ~0.8-0.9x ONNX Runtime's int8 per call, same quality
#: on the bundled model; docs/benchmarks.md "## CPU peers, session 2"). fp16 graphs stay.
OPENVINO_AUTO_PRECISIONS = ("fp32", "int8")
#: Smallest engine (bytes, weights included) ``auto`` hands to OpenVINO: on the bundled model's
#: 12 MB UNet a call is per-call overhead, and ONNX Runtime's is lower (0.014 vs 0.024 s per
#: CFG call, docs/benchmarks.md "## CPU peers"); SD-size components (>= 100 MB) are compute.
OPENVINO_AUTO_MIN_BYTES = 64 * 2**20
TENSORRT_MODULE = "trt_sd.runtime.backends.tensorrt"

__all__ = [
    "BACKEND_CHOICES",
    "EngineBackend",
    "IOSpec",
    "cpu_bf16",
    "create_backend",
    "cuda_device_count",
    "io_specs",
    "openvino_wins",
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


def openvino_wins(entry: ComponentEntry) -> bool:
    """``auto``'s CPU choice: OpenVINO for fp32 and INT8 ONNX graphs of at least
    :data:`OPENVINO_AUTO_MIN_BYTES` on CPUs with native bf16, when it is installed (checked
    without importing it)."""
    from .openvino import openvino_installed

    return (
        entry.backend == "onnxruntime"
        and entry.precision in OPENVINO_AUTO_PRECISIONS
        and int(entry.extra.get("bytes", 0)) >= OPENVINO_AUTO_MIN_BYTES
        and cpu_bf16()
        and openvino_installed()
    )


def resolve_backend(requested: str, entry: ComponentEntry) -> str:
    """The concrete backend for one component: "tensorrt", "tensorrt-rtx", "onnxruntime-cuda",
    "onnxruntime-cpu" or one of :data:`OPENVINO_KINDS`. Raises InputError for an unknown name
    or an impossible pairing and BackendUnavailableError (with an install hint) when the
    library is missing."""
    if requested not in BACKEND_CHOICES:
        raise InputError(f"unknown backend {requested!r}; choose from {', '.join(BACKEND_CHOICES)}")
    from .onnxruntime import cuda_provider_usable  # cheap: onnxruntime itself loads lazily

    if requested in OPENVINO_KINDS:
        if entry.backend in FLAVOURS:
            raise InputError(
                f"component {entry.name} is a {entry.backend} engine ({entry.file}); OpenVINO "
                "cannot run it: export ONNX engines (trt-sd export --backend onnxruntime)"
            )
        from .openvino import import_openvino, inference_precision

        inference_precision(requested)  # BackendUnavailableError: bf16 asked, CPU lacks it
        import_openvino()
        return requested
    if entry.backend in FLAVOURS:
        # A .plan runs only on its own flavour; `auto` takes it there or says why it cannot.
        kind = "TensorRT-RTX" if entry.backend == "tensorrt-rtx" else "TensorRT"
        if requested not in ("auto", entry.backend):
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
    if requested == "auto" and openvino_wins(entry):
        return "openvino"
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
    if kind in OPENVINO_KINDS:
        if device_id is not None:
            raise InputError(
                f"devices=[{device_id}] needs a GPU backend, but --backend {kind} runs on the CPU"
            )
        from .openvino import OpenVinoBackend

        return OpenVinoBackend(path, component, entry, kind)
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
