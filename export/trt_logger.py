"""The logger of TensorRT builds: prints warnings as TensorRT's own does and keeps the error
messages, so a failed build raises with TensorRT's reason instead of 'see the log above'."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from trt_sd.models.tensorrt_check import import_tensorrt

#: mypy: ``--always-true TRT_RTX_TYPES`` checks this module against the TensorRT-RTX bindings.
TRT_RTX_TYPES = False
if TYPE_CHECKING:
    if TRT_RTX_TYPES:
        import tensorrt_rtx as trt
    else:
        import tensorrt as trt

RTX = "tensorrt-rtx"


#: What TensorRT-RTX logs on every build on a machine without a GPU driver (it builds fine):
#: not shown, and not taken for the reason of a failed build.
CPU_NOISE = ("cudaError 35", "CUDA driver version is insufficient", "timing cache")


def label(flavour: str) -> str:
    return "TensorRT-RTX" if flavour == RTX else "TensorRT"


def collecting_logger(flavour: str) -> trt.ILogger:
    """A logger that prints warnings like TensorRT's own and keeps the error messages, so a
    failed build raises with TensorRT's reason instead of 'see the log above'."""
    if TYPE_CHECKING:  # one code path, type-checked against each flavour's API
        if TRT_RTX_TYPES:
            import tensorrt_rtx as trt
        else:
            import tensorrt as trt
    else:
        trt = import_tensorrt(flavour)

    class Collecting(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if any(noise in msg for noise in CPU_NOISE):
                return
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)
            if severity <= trt.ILogger.Severity.WARNING:
                print(f"[{label(flavour)}] {msg}", file=sys.stderr)

    return Collecting()
