"""The VAE encoder step (img2img, inpainting) and the finite checks of the VAE's outputs.

Out of :mod:`.pipeline` so inpainting can encode its masked image from another noise stream
with the same arithmetic as an img2img init image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trt_sd.models.descriptors import TEXT_ENCODER, VAE_DECODER, VAE_ENCODER
from trt_sd.models.errors import NumericalError

from .noise import POSTERIOR_STREAM, posterior_sample


def check_finite(name: str, value: np.ndarray, detail: str = "", hint: str = "") -> None:
    """NumericalError naming the component (and what to change) when ``value`` has NaN / inf."""
    if np.isfinite(value).all():
        return
    hint = hint or {
        VAE_DECODER: (
            "; the fp16 SD VAE overflows on some latents: use the fp32 VAE "
            "(re-export without --vae-fp16)"
        ),
        VAE_ENCODER: (
            "; the fp16 SD VAE overflows on some images: use the fp32 VAE "
            "(re-export without --vae-fp16)"
        ),
        TEXT_ENCODER: "; export the text encoder in fp32",
    }.get(name, "; try an fp32 export")
    raise NumericalError(f"{name} produced NaN or inf{detail}{hint}")


def encode_image(
    pipe: Any,
    seeds: Sequence[int],
    image: np.ndarray,
    timings: dict[str, float],
    stream: int = POSTERIOR_STREAM,
) -> np.ndarray:
    """An image (1, 3, H, W) in [-1, 1] -> latents, one row per seed: one encoder call, then
    a posterior sample per seed (mean + std * noise from ``[seed, stream]``, logvar clamped to
    [-30, 20] as diffusers does), times the VAE scaling factor."""
    spec = pipe.components[VAE_ENCODER]
    out = pipe._run(VAE_ENCODER, {spec.inputs[0].name: image}, timings)
    params = np.asarray(out[spec.outputs[0].name], dtype=np.float32)
    check_finite(VAE_ENCODER, params)
    mean, logvar = np.split(params, 2, axis=1)
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
    scale = np.float32(pipe.manifest.vae_scaling_factor)
    return posterior_sample(seeds, mean, std, stream) * scale
