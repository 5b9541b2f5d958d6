"""Which GPUs an engine is built for: the local GPU (TensorRT) or a list of compute
capabilities (TensorRT-RTX, ahead of time, no GPU needed).

TensorRT builds for the GPU it runs on, so its engines are keyed by that GPU's compute
capability (queried through cuda-python). TensorRT-RTX builds on any machine for the targets
set on the builder config (``ComputeCapability.SM75`` ...); trt-sd defaults to every target the
installed TensorRT-RTX offers, so one engine directory serves every RTX-class GPU, and records
the list so the runtime can refuse a GPU outside it with one clear line.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, cast

from trt_sd.models.errors import BackendUnavailableError, InputError

if TYPE_CHECKING:
    import tensorrt_rtx


def compute_capability(device: int = 0) -> str:
    """``"9.0"`` for an H100: part of a TensorRT engine's cache key (engines are per
    architecture)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python 12.x layout
        except ImportError:
            raise BackendUnavailableError(
                "cuda-python is needed to query the GPU: pip install 'trt-sd[tensorrt]'"
            ) from None
    attr = cudart.cudaDeviceAttr
    err, major = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device)
    err2, minor = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device)
    if int(err) or int(err2):
        raise BackendUnavailableError(f"no usable CUDA device {device} ({err})")
    return f"{major}.{minor}"


def has_gpu(device: int = 0) -> bool:
    """Whether a CUDA GPU answers here (cuda-python present and the device usable)."""
    try:
        compute_capability(device)
    except BackendUnavailableError:
        return False
    return True


def _sm_name(cc: str) -> str:
    """``"8.6"`` -> ``"SM86"`` (the enum member name)."""
    return "SM" + cc.replace(".", "")


def _cc_of(member: str) -> str:
    """``"SM86"`` -> ``"8.6"``, ``"SM120"`` -> ``"12.0"``."""
    digits = member[2:]
    return f"{digits[:-1]}.{digits[-1]}"


def rtx_supported(trt: ModuleType) -> tuple[str, ...]:
    """Every compute capability the installed TensorRT-RTX can build for, oldest first."""
    names = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
    return tuple(sorted((_cc_of(m) for m in names), key=lambda c: tuple(map(int, c.split(".")))))


#: Left out of the default targets: TensorRT-RTX 1.7 refuses fp32 matrix multiplies for Turing
#: ("Cannot compile operation ... for Turing (SM75): FP32 GEMM is not supported"), and every
#: export keeps some (fp32 text encoder / VAE, fp32 islands of fp16 graphs). Ask for 7.5
#: explicitly (``--compute-capability 7.5``) for graphs that are fp16 throughout.
NOT_DEFAULT = ("7.5",)


def default_rtx_targets(trt: ModuleType) -> tuple[str, ...]:
    """Every target the installed TensorRT-RTX supports that builds any of our graphs."""
    return tuple(cc for cc in rtx_supported(trt) if cc not in NOT_DEFAULT)


def resolve_rtx_targets(trt: ModuleType, requested: Iterable[str] | str | None) -> tuple[str, ...]:
    """The targets to build for: ``None`` / ``"all"`` = :func:`default_rtx_targets`; otherwise a
    comma list (``"8.6,8.9"``, ``"86,120"`` or ``"sm86"``) checked against the supported list."""
    supported = rtx_supported(trt)
    if requested is None or requested == "all" or requested == ():
        return default_rtx_targets(trt)
    items = requested.split(",") if isinstance(requested, str) else list(requested)
    out: list[str] = []
    for raw in items:
        text = str(raw).strip().lower().removeprefix("sm")
        cc = text if "." in text else f"{text[:-1]}.{text[-1:]}" if len(text) >= 2 else text
        if cc not in supported:
            raise InputError(
                f"compute capability {str(raw).strip()!r} is not one TensorRT-RTX builds for; "
                f"choose from {', '.join(supported)} (or all)"
            )
        if cc not in out:
            out.append(cc)
    return tuple(sorted(out, key=lambda c: tuple(map(int, c.split(".")))))


def set_rtx_targets(config: object, trt: ModuleType, targets: tuple[str, ...]) -> None:
    """Put ``targets`` on a TensorRT-RTX builder config (typed against the RTX bindings)."""
    rtx_config = cast("tensorrt_rtx.IBuilderConfig", config)
    rtx_config.num_compute_capabilities = len(targets)
    for i, cc in enumerate(targets):
        member: tensorrt_rtx.ComputeCapability = getattr(trt.ComputeCapability, _sm_name(cc))
        if not rtx_config.set_compute_capability(member, i):
            raise InputError(f"TensorRT-RTX refused compute capability {cc} as build target")
