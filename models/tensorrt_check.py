"""Whether TensorRT can be imported, and how to install it: one message for export and runtime.

TensorRT's wheels live on NVIDIA's package index, not PyPI, so the hint names the index.
``tensorrt-stubs`` (the type stubs CI checks against) installed into site-packages leaves a
``tensorrt/`` folder with only ``.pyi`` files that imports as an empty namespace package; that
is not TensorRT, and is refused here rather than failing later on ``trt.Builder``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import BackendUnavailableError

INSTALL_HINT = (
    "install TensorRT from NVIDIA's package index on a machine with an NVIDIA GPU: "
    "pip install --extra-index-url https://pypi.nvidia.com 'trt-sd[tensorrt]'"
)


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or BackendUnavailableError saying what is missing."""
    try:
        tensorrt = importlib.import_module("tensorrt")
    except ImportError:
        raise BackendUnavailableError(f"TensorRT is not installed; {INSTALL_HINT}") from None
    if not hasattr(tensorrt, "Builder"):
        raise BackendUnavailableError(
            f"TensorRT is not installed (found only its type stubs); {INSTALL_HINT}"
        )
    return tensorrt
