"""Validated export options (standard library + trt_sd.models only).

Both the Python API and the CLI go through :func:`resolve_options`, so a bad precision, backend,
shape or opset is refused with the same one-line :class:`InputError` before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trt_sd.models import BackendUnavailableError, InputError, Range
from trt_sd.models.manifest import PRECISIONS

BACKEND_CHOICES = ("auto", "onnxruntime", "tensorrt", "tensorrt-rtx")
#: Backends whose export ends in TensorRT engines (``tensorrt_build``), one flavour each.
TENSORRT_BACKENDS = ("tensorrt", "tensorrt-rtx")
#: Pixel sizes must be multiples of this whatever the VAE factor (SD's VAE downsamples 8x).
PIXEL_MULTIPLE = 8
#: Lowest opset: LayerNormalization is a single op from 17 on (TensorRT maps it to its
#: normalization layer instead of a chain of reductions).
MIN_OPSET = 17
MAX_OPSET = 20  # the TorchScript exporter (see export.onnx_export) stops at 20


@dataclass(frozen=True)
class ExportOptions:
    """Everything besides the model and output folder that determines an export."""

    precision: str
    backend: str
    height: Range
    width: Range
    batch: Range
    opset: int
    vae_fp16: bool
    allow_pickle: bool
    #: TensorRT build settings (``tensorrt_build.BuildOptions`` minus the precision); used only
    #: when ``backend == "tensorrt"``.
    trt_optimization_level: int = 3
    trt_version_compatible: bool = False
    trt_hardware_compatible: str = "none"
    trt_static_shapes: bool = False
    #: TensorRT-RTX only: build targets ("8.6", ...; empty = all it supports) and where the
    #: runtime keeps its JIT (runtime) cache (None = the per-user default).
    trt_compute_capabilities: tuple[str, ...] = ()
    trt_runtime_cache: str | None = None
    #: Engines whose weights can be refit after load (LoRA).
    trt_refittable: bool = False

    @property
    def builds_engines(self) -> bool:
        """Whether this export builds TensorRT engines (either flavour)."""
        return self.backend in TENSORRT_BACKENDS


def _range(value: str | int | Range, what: str, multiple_of: int) -> Range:
    if isinstance(value, Range):
        return Range.parse(f"{value.min}:{value.opt}:{value.max}", what, multiple_of)
    return Range.parse(value, what, multiple_of)


def resolve_backend(backend: str) -> str:
    """Map ``auto`` to a concrete backend and check that the requested one is usable here.

    ``auto`` never picks TensorRT-RTX: it builds anywhere, but its engines run only on an
    RTX-class GPU, so it must be asked for."""
    if backend not in BACKEND_CHOICES:
        raise InputError(f"unknown backend {backend!r}; choose from {', '.join(BACKEND_CHOICES)}")
    from .tensorrt_build import RTX, compute_capability, require_tensorrt

    if backend == RTX:
        require_tensorrt(RTX)  # raises with install instructions; no GPU needed to build
        return RTX
    if backend == "tensorrt":
        require_tensorrt()  # raises with install instructions where TensorRT is absent
        compute_capability()  # and says so where there is no GPU to build for
        return "tensorrt"
    if backend == "auto":
        try:
            require_tensorrt()
            compute_capability()
        except BackendUnavailableError:
            return "onnxruntime"
        return "tensorrt"
    return "onnxruntime"


def resolve_options(
    *,
    precision: str = "fp32",
    backend: str = "auto",
    height: str | int | Range | None = None,
    width: str | int | Range | None = None,
    batch: str | int | Range = "1:4",
    opset: int = 17,
    vae_fp16: bool = False,
    allow_pickle: bool = False,
    default_size: int = 512,
    trt_optimization_level: int = 3,
    trt_version_compatible: bool = False,
    trt_hardware_compatible: str = "none",
    trt_static_shapes: bool = False,
    trt_compute_capabilities: str | tuple[str, ...] | list[str] | None = None,
    trt_runtime_cache: str | None = None,
    trt_refittable: bool = False,
) -> ExportOptions:
    """Check every option; ``height`` / ``width`` default to the model's native size."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}")
    opts = ExportOptions(
        precision=precision,
        backend=resolve_backend(backend),
        height=_range(default_size if height is None else height, "height", PIXEL_MULTIPLE),
        width=_range(default_size if width is None else width, "width", PIXEL_MULTIPLE),
        batch=_range(batch, "batch", 1),
        opset=opset,
        vae_fp16=bool(vae_fp16),
        allow_pickle=bool(allow_pickle),
        trt_optimization_level=trt_optimization_level,
        trt_version_compatible=bool(trt_version_compatible),
        trt_hardware_compatible=trt_hardware_compatible,
        trt_static_shapes=bool(trt_static_shapes),
        trt_compute_capabilities=_targets(trt_compute_capabilities, backend),
        trt_runtime_cache=None if trt_runtime_cache is None else str(trt_runtime_cache),
        trt_refittable=bool(trt_refittable),
    )
    if opts.trt_refittable and opts.backend == "tensorrt-rtx":
        from .trt_targets import has_gpu

        if not has_gpu():
            # Measured with TensorRT-RTX 1.7.1: a REFIT build JIT-compiles on the GPU and fails
            # without one ("MyelinCheckException: graph_jit.cpp:278: CHECK(status ==
            # CUDA_SUCCESS) failed"); plain builds need no GPU.
            raise BackendUnavailableError(
                "--refittable TensorRT-RTX engines can only be built where a GPU is present "
                "(TensorRT-RTX compiles refittable graphs on it); build without --refittable "
                "or on the GPU machine"
            )
    if opts.trt_runtime_cache is not None and opts.backend != "tensorrt-rtx":
        raise InputError("--runtime-cache is a TensorRT-RTX option; use --backend tensorrt-rtx")
    trt_build_options(opts, precision)  # validates the TensorRT settings whatever the backend
    return opts


def _targets(value: str | tuple[str, ...] | list[str] | None, backend: str) -> tuple[str, ...]:
    """TensorRT-RTX build targets, checked against what the installed TensorRT-RTX offers
    (``()`` = all of them)."""
    if value is None or value == "all" or not value:
        return ()
    if backend != "tensorrt-rtx":
        raise InputError("--compute-capability needs --backend tensorrt-rtx")
    from trt_sd.models.tensorrt_check import import_tensorrt

    from .trt_targets import resolve_rtx_targets

    return resolve_rtx_targets(import_tensorrt("tensorrt-rtx"), value)


def trt_build_options(opts: ExportOptions, precision: str) -> Any:
    """The ``tensorrt_build.BuildOptions`` of one component (its precision may differ from the
    export's: the VAE stays fp32 in fp16 exports)."""
    from .tensorrt_build import BuildOptions

    return BuildOptions(
        precision=precision,
        optimization_level=opts.trt_optimization_level,
        version_compatible=opts.trt_version_compatible,
        hardware_compatible=opts.trt_hardware_compatible,
        static_shapes=opts.trt_static_shapes,
        flavour="tensorrt-rtx" if opts.backend == "tensorrt-rtx" else "tensorrt",
        compute_capabilities=opts.trt_compute_capabilities,
        refittable=opts.trt_refittable,
    )
