"""The lean runtime: engine backends, tokenizer, pipeline and CLI. Imports no torch.

``import trt_sd.runtime`` is cheap: :class:`Pipeline` and friends load on first attribute
access, and the engine library (onnxruntime, TensorRT) only when a backend is created.

    from trt_sd.runtime import Pipeline
    pipe = Pipeline.load("engines/", backend="auto")
    result = pipe("a photo of a cat", steps=20, seed=1)
    result.images[0]  # HxWx3 uint8
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pipeline import GenerationResult, Pipeline

__all__ = ["GenerationResult", "Pipeline"]

_LAZY = {"Pipeline": ".pipeline", "GenerationResult": ".pipeline"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
