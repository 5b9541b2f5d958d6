"""Tiny exported engine directories shared by the runtime tests (built once per process).

Exporting a tiny pipeline takes a few seconds, so every runtime test module in one pytest run
reuses the same directories; they live in a temporary folder removed at exit.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache, lru_cache
from pathlib import Path

from tiny_pipeline import make_tiny_pipeline

SIZE = 16  # tiny pipelines: VAE factor 2, so 16x16 images <-> 8x8 latents


@lru_cache(maxsize=1)
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="trt-sd-runtime-tests-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@cache
def tiny_model(v_prediction: bool = False) -> Path:
    """A tiny diffusers folder (epsilon / SD 1.x style, or v-prediction / SD 2.x style)."""
    return make_tiny_pipeline(
        _root() / ("model-v" if v_prediction else "model"), v_prediction=v_prediction
    )


@cache
def tiny_engines(v_prediction: bool = False) -> Path:
    """fp32 ONNX engine directory of :func:`tiny_model`, batch 1..4, 16..24 pixels."""
    from trt_sd.export import export_model

    out = _root() / ("engines-v" if v_prediction else "engines")
    export_model(
        tiny_model(v_prediction),
        out,
        precision="fp32",
        height="16:24",
        width="16:24",
        batch="1:4",
        progress=False,
    )
    return out


@cache
def tiny_sdxl_model() -> Path:
    """A tiny random SDXL base diffusers folder (see tests/tiny_sdxl.py)."""
    from tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(_root() / "model-sdxl")


@cache
def tiny_sdxl_engines() -> Path:
    """fp32 ONNX engine directory of :func:`tiny_sdxl_model`, batch 1..2, 16..24 pixels."""
    from trt_sd.export import export_model

    out = _root() / "engines-sdxl"
    export_model(tiny_sdxl_model(), out, height="16:24", width="16:24", batch="1:2", progress=False)
    return out


@cache
def tiny_refiner_model() -> Path:
    """A tiny random SDXL refiner diffusers folder (see tests/tiny_sdxl.py)."""
    from tiny_sdxl import make_tiny_sdxl_refiner

    return make_tiny_sdxl_refiner(_root() / "model-refiner")


@cache
def tiny_refiner_engines() -> Path:
    """fp32 ONNX engine directory of :func:`tiny_refiner_model`, batch 1..2, 16..24 pixels."""
    from trt_sd.export import export_model

    out = _root() / "engines-refiner"
    export_model(
        tiny_refiner_model(), out, height="16:24", width="16:24", batch="1:2", progress=False
    )
    return out
