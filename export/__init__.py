"""Export stage: checkpoint -> verified ONNX -> engine directory (needs the export extra).

``export_model`` is imported lazily so ``trt_sd.export.cli`` (argument parsing) stays
importable without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import export_model

__all__ = ["export_model"]


def __getattr__(name: str) -> Any:
    if name == "export_model":
        from .api import export_model

        return export_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
