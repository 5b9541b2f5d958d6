"""Shared by the per-family INT8 tests (tests/test_sdxl_int8.py, test_sdxl_refiner_int8.py):
a tiny INT8 export, the calibration's conditioning beside the runtime's, and image closeness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from runtime_engines import SIZE

from trt_sd.models.families import PromptRows
from trt_sd.runtime import Pipeline

#: small enough for CI: 2 prompts x 3 steps of calibration, one report image
TINY_RECIPE = {"calib_size": 2, "calib_steps": 3, "report_images": 1, "report_steps": 3}


def export_tiny_int8(model: Path, out: Path) -> Path:
    """``model`` exported with an INT8 UNet (16..24 pixels, batch 1..2), torch on one thread:
    tiny UNet calls on a shared 2-core machine."""
    import torch

    from trt_sd.export import export_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kw = {"height": "16:24", "width": "16:24", "batch": "1:2", "progress": False}
        export_model(model, out, precision="int8", int8=TINY_RECIPE, **kw)
    finally:
        torch.set_num_threads(threads)
    return out


def conditioning_pairs(model: Path, engines: Path, cases: list[tuple[list[str], bool]]):
    """For each ``(prompts, negative)``: (what calibration feeds the UNet, what the runtime
    pipeline on ``engines`` feeds it) for those prompt rows."""
    from trt_sd.export.checkpoint import locate
    from trt_sd.export.int8.conditioning import PromptEncoder
    from trt_sd.export.modules import ModuleLoader

    ckpt = locate(model)
    encoder = PromptEncoder(ckpt, ModuleLoader(ckpt), (SIZE, SIZE))
    pipe = Pipeline.load(engines, backend="onnxruntime-cpu")
    options = pipe.manifest.family.check_options({}, SIZE, SIZE)
    for texts, negative in cases:
        n = len(texts)
        rows = PromptRows(tuple(texts), (negative,) * n, ((SIZE, SIZE),) * n, (options,) * n)
        yield encoder(texts, negative=negative), pipe.encode_conditioning(rows)


def psnr_and_mean_diff(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, float]:
    """PSNR (dB) and mean absolute difference (pixel levels) of two lists of uint8 images."""
    x, y = np.stack(a).astype(np.float64), np.stack(b).astype(np.float64)
    return float(10 * np.log10(255.0**2 / np.mean((x - y) ** 2))), float(np.abs(x - y).mean())
