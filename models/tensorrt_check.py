"""Whether a TensorRT flavour can be imported, and how to install it: one message for export and
runtime.

Two flavours share one Python API (Builder, OnnxParser, Runtime, ...), imported under different
module names:

* ``tensorrt`` — TensorRT 10.x / 11.x. Its wheels live on NVIDIA's package index, so the hint
  names the index. Building needs the GPU the engine will run on.
* ``tensorrt-rtx`` — TensorRT-RTX 1.x (``import tensorrt_rtx``), on PyPI. It builds engines
  ahead of time on any machine, for a list of target compute capabilities; running them needs
  an RTX-class GPU (compute capability 7.5, 8.0, 8.6, 8.9 or 12.x; Hopper is not in its list).

``tensorrt-stubs`` (the type stubs CI checks against) installed into site-packages leaves a
``tensorrt/`` folder with only ``.pyi`` files that imports as an empty namespace package; that
is not TensorRT, and is refused here rather than failing later on ``trt.Builder``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import BackendUnavailableError, InputError

#: Backend name (manifest, CLI) -> Python module.
FLAVOURS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}

INSTALL_HINT = (
    "install TensorRT from NVIDIA's package index on a machine with an NVIDIA GPU: "
    "pip install --extra-index-url https://pypi.nvidia.com 'trt-sd[tensorrt]'"
)
RTX_INSTALL_HINT = "install TensorRT-RTX from PyPI: pip install 'trt-sd[tensorrt-rtx]'"


def install_hint(flavour: str = "tensorrt") -> str:
    return RTX_INSTALL_HINT if flavour == "tensorrt-rtx" else INSTALL_HINT


def import_tensorrt(flavour: str = "tensorrt") -> ModuleType:
    """The module of ``flavour`` (``tensorrt`` or ``tensorrt-rtx``), or BackendUnavailableError
    saying what is missing."""
    if flavour not in FLAVOURS:
        raise InputError(f"unknown TensorRT flavour {flavour!r}; choose from {', '.join(FLAVOURS)}")
    label = "TensorRT-RTX" if flavour == "tensorrt-rtx" else "TensorRT"
    try:
        tensorrt = importlib.import_module(FLAVOURS[flavour])
    except ImportError:
        raise BackendUnavailableError(
            f"{label} is not installed; {install_hint(flavour)}"
        ) from None
    if not hasattr(tensorrt, "Builder"):
        raise BackendUnavailableError(
            f"{label} is not installed (found only its type stubs); {install_hint(flavour)}"
        )
    return tensorrt
