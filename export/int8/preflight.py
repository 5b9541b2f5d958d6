"""INT8 checks that run before anything heavy loads: the recipe and a memory estimate.

``trt-sd export --precision int8`` may run for many minutes; a prompts file typo or a
calibration set that cannot fit in memory must fail in the first second, with one line that
says what to change.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trt_sd.models import InputError, ShapeRange

from ..checkpoint import Checkpoint
from .recipe import Int8Recipe, ResolvedRecipe, resolve_recipe

GIB = 1 << 30
#: UNet-sized copies alive at the peak: the torch module, the float graph being exported or
#: rewritten, ONNX Runtime's session for the report; QAT adds gradients and Adam's two moments.
PEAK_UNET_COPIES = {False: 2.5, True: 4.5}
HEADROOM = 1 * GIB
SKIP_ENV = "TRT_SD_SKIP_MEMORY_CHECK"


def capture_bytes(trajectories: int, steps: int, latent_shape: Sequence[int], text: int) -> int:
    """Memory the captured rows of ``trajectories`` will take (inputs + outputs + texts)."""
    per_row = 2 * math.prod(latent_shape) * 4  # sample + output, float32
    return 2 * trajectories * steps * per_row + (trajectories + 1) * text * 4


def available_memory() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def unet_weight_bytes(ckpt: Checkpoint) -> int:
    """Size of the UNet's weight files (a single-file checkpoint counts whole)."""
    if ckpt.kind == "single_file":
        return ckpt.path.stat().st_size
    folder = ckpt.path / "unet"
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def latent_shape(ckpt: Checkpoint, shapes: ShapeRange) -> tuple[int, int, int]:
    """Latent (C, h, w) at the export's optimum image size: what calibration samples at."""
    f = shapes.vae_scale_factor
    return (ckpt.dims.unet_in_channels, shapes.height.opt // f, shapes.width.opt // f)


def estimate_bytes(ckpt: Checkpoint, resolved: ResolvedRecipe, shapes: ShapeRange) -> int:
    r = resolved.recipe
    dims = ckpt.dims
    # every conditioning input of a row: context (both encoders' widths), pooled, time ids
    width = dims.text_hidden_size + dims.text_hidden_size_2
    text = dims.text_max_length * width + dims.text_pooled_size + dims.time_ids_size
    trajectories = int(r.calib_size or 0) + int(r.report_images or 0)
    steps = max(r.calib_steps, r.report_steps)
    captured = capture_bytes(trajectories, steps, latent_shape(ckpt, shapes), text)
    return int(unet_weight_bytes(ckpt) * PEAK_UNET_COPIES[r.qat]) + captured + HEADROOM


def check_memory(ckpt: Checkpoint, resolved: ResolvedRecipe, shapes: ShapeRange) -> None:
    """Refuse before starting when calibration would not fit in the memory available now."""
    need = estimate_bytes(ckpt, resolved, shapes)
    have = available_memory()
    if have is None or need <= have:
        return
    r = resolved.recipe
    raise InputError(
        f"INT8 {'QAT' if r.qat else 'calibration'} of this model needs about {need / GIB:.1f} GiB "
        f"of memory but {have / GIB:.1f} GiB is available; lower --calib-size (now "
        f"{r.calib_size}) or --calib-steps (now {r.calib_steps}), drop --qat, or free memory "
        f"(set {SKIP_ENV}=1 to try anyway)"
    )


def prepare_int8(
    recipe: Int8Recipe | Mapping[str, Any] | None,
    ckpt: Checkpoint,
    shapes: ShapeRange,
    backend: str,
) -> ResolvedRecipe:
    """Resolve the recipe for this model and backend and check memory (no torch import)."""
    if "int8" not in ckpt.family_spec.features:
        raise InputError(
            f"--precision int8 is not available for {ckpt.family_spec.label} models yet"
        )
    if ckpt.dims.time_cond_proj_dim:  # calibration samples with CFG rows
        raise InputError("--precision int8 is not available for LCM-distilled UNets yet")
    default_guidance = float(ckpt.defaults().get("guidance", 7.5))
    resolved = resolve_recipe(
        recipe,
        backend=backend,
        bundled_model=ckpt.bundled,
        default_guidance=default_guidance,
    )
    if os.environ.get(SKIP_ENV) != "1":
        check_memory(ckpt, resolved, shapes)
    return resolved
