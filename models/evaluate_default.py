"""Judge the default model the way users run it: through diffusers, offline, with DPM++ 2M.

    python -m trt_sd.models.train_default --evaluate-only --out models/default

Why separate from the recipe: the tests and the quality harness load a saved folder and
generate digits without any training code. Imports torch and diffusers (export side only).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import digits


def load_pipeline(model_dir: str | Path, scheduler: str = "dpmpp_2m") -> Any:
    """The saved folder through diffusers (offline), with DPM++ 2M (or the saved PNDM)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    if scheduler == "dpmpp_2m":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_digits(
    pipe: Any, labels: list[int], steps: int = 20, guidance: float = 5.0, seed: int = 0
) -> np.ndarray:
    """``(N, 3, 32, 32)`` images in [-1, 1], one per label, prompt ``prompt_for_digit``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        images = pipe(
            [digits.prompt_for_digit(d) for d in labels],
            height=digits.IMAGE_SIZE,
            width=digits.IMAGE_SIZE,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="pt",
        ).images
    return images.numpy() * 2.0 - 1.0


def save_grid(images: np.ndarray, path: Path, columns: int = 10, zoom: int = 2) -> None:
    """Images in [-1, 1] as a PNG grid, ``columns`` per row (digit order along a row)."""
    from PIL import Image

    pixels = ((np.clip(images, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    rows = math.ceil(len(pixels) / columns)
    size = pixels.shape[1]
    grid = np.zeros((rows * (size + 2), columns * (size + 2), 3), dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, columns)
        grid[r * (size + 2) + 1 : r * (size + 2) + 1 + size, c * (size + 2) + 1 :][:, :size] = img
    image = Image.fromarray(grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST).save(path)


def evaluate(
    model_dir: Path,
    per_digit: int = 10,
    steps: int = 20,
    guidance: float = 5.0,
    grid: Path | None = None,
) -> dict:
    """Prompt accuracy: ``per_digit`` images of each digit, judged by :class:`DigitJudge`."""
    pipe = load_pipeline(model_dir)
    labels = [d for _ in range(per_digit) for d in range(10)]
    start = time.perf_counter()
    images = generate_digits(pipe, labels, steps=steps, guidance=guidance)
    seconds = time.perf_counter() - start
    judge = digits.DigitJudge(model_dir)
    predicted = judge.predict(images)
    per_class = [float(np.mean(predicted[np.array(labels) == d] == d)) for d in range(10)]
    if grid is not None:
        save_grid(images[: 10 * min(per_digit, 4)], grid)
    return {
        "sampler": "DPMSolverMultistepScheduler (DPM++ 2M)",
        "steps": steps,
        "guidance": guidance,
        "images": len(labels),
        "accuracy": float(np.mean(predicted == np.array(labels))),
        "per_digit_accuracy": per_class,
        "generation_seconds": round(seconds, 1),
    }
