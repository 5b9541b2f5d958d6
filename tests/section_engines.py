"""Tiny engine directories with a cut UNet (pipeline stages, DeepCache), built once per process.

Each starts as a copy of :func:`runtime_engines.tiny_engines`, so the export reuses the text
encoder and VAE graphs (same model and options) and only builds the UNet sections.
"""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

from runtime_engines import tiny_engines, tiny_model

RANGES = {"height": "16:24", "width": "16:24", "batch": "1:4"}


def export_sections(name: str, **options: object) -> Path:
    from trt_sd.export import export_model

    out = tiny_engines().parent / name
    if not out.exists():
        shutil.copytree(tiny_engines(), out)
    export_model(tiny_model(), out, precision="fp32", progress=False, **RANGES, **options)
    return out


@cache
def split_engines(stages: int = 2) -> Path:
    """The tiny pipeline with its UNet in ``stages`` pipeline stages."""
    return export_sections(f"engines-split{stages}", split_unet=stages)


@cache
def deepcache_engines(branch: int = 0) -> Path:
    """The tiny pipeline exported with DeepCache at skip ``branch``."""
    return export_sections(f"engines-deepcache{branch}", deepcache=branch)
