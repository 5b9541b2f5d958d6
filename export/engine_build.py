"""Verified ONNX graph -> TensorRT / TensorRT-RTX engine in the engine directory, and the
manifest fields that record it (the one place engine fields are written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trt_sd.models import Component

from . import engine_dir
from .build_context import BuildContext, trt_settings
from .checkpoint import sha256_file


def build_tensorrt_engine(
    ctx: BuildContext, component: Component, onnx_path: Path, precision: str
) -> dict[str, Any]:
    """Build (or take from the engine cache) the engine of a verified ONNX graph and place it
    in the engine directory; returns the manifest fields that change.

    The ONNX graph stays beside the engine (``onnx_file``): it is what a rebuild on another
    GPU or TensorRT version starts from.
    """
    from trt_sd.models.paths import cache_root

    from .options import trt_build_options
    from .tensorrt_build import RTX, build_engine

    options = trt_build_options(ctx.opts, precision)
    cache = cache_root() / ("tensorrt-rtx" if options.flavour == RTX else "tensorrt")
    result = build_engine(onnx_path, component, ctx.shapes, options, cache)
    engine_dir.link_or_copy(result.engine, ctx.build / result.engine.name)
    fields: dict[str, Any] = {
        "file": result.engine.name,
        "sha256": sha256_file(result.engine),
        "backend": result.flavour,
        "onnx_file": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "tensorrt_flavour": result.flavour,
        "tensorrt_version": result.tensorrt_version,
        "compute_capability": result.compute_capability,
        "engine_cache_key": result.cache_key,
        "build_seconds": round(result.seconds, 2),
        "engine_bytes": result.size_bytes,
        "engine_io": result.network_io,
        **trt_settings(ctx.opts),
    }
    if result.flavour == RTX:
        fields["compute_capabilities"] = result.compute_capability.split(",")
    return fields
