"""How a seed becomes noise, so a seed means the same image everywhere.

* image ``i`` of a batch uses seed ``seed + i`` (as the WebUI does), so each image can be
  regenerated alone;
* its initial noise is ``np.random.default_rng(seed + i).standard_normal((C, h, w),
  dtype=np.float32)`` (``C, h, w`` = latent channels, height / f, width / f), unscaled, exactly
  what diffusers' ``latents=`` argument takes; the sampler scales it by its initial sigma;
* img2img samples the VAE posterior with ``np.random.default_rng([seed + i, 1])``; an
  inpainting UNet's masked image with ``[seed + i, 3]``;
* stochastic samplers (ancestral, SDE, DDIM with eta > 0) draw their per-step noise for image
  ``i`` from ``np.random.default_rng([seed + i, 2])`` (``standard_normal(..., float32)``), row
  by row, so an image does not depend on the batch it was generated in.

Separate streams (``[seed, 1]``, ``[seed, 2]``) keep the initial noise independent of whether
the caller passed ``latents=`` or uses img2img.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

POSTERIOR_STREAM = 1
SAMPLER_STREAM = 2
MASKED_IMAGE_STREAM = 3


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
    """(len(seeds), *shape) float32 standard normal, row ``i`` from ``seeds[i]``."""
    return np.stack(
        [np.random.default_rng(s).standard_normal(shape, dtype=np.float32) for s in seeds]
    )


def posterior_sample(
    seeds: Sequence[int], mean: np.ndarray, std: np.ndarray, stream: int = POSTERIOR_STREAM
) -> np.ndarray:
    """One VAE posterior sample per seed: ``mean + std * noise`` (``mean``/``std``: one row;
    ``stream``: :data:`MASKED_IMAGE_STREAM` for an inpainting UNet's masked image)."""
    rows = [
        mean[0]
        + std[0]
        * np.random.default_rng([s, stream]).standard_normal(mean.shape[1:], dtype=np.float32)
        for s in seeds
    ]
    return np.stack(rows).astype(np.float32)


def sampler_noise_fn(seeds: Sequence[int]) -> Callable[[tuple[int, ...]], np.ndarray]:
    """A sampler ``noise_fn``: a (batch, ...) draw made of one draw per row, row ``i`` from
    image ``i``'s own stream."""
    generators = [np.random.default_rng([s, SAMPLER_STREAM]) for s in seeds]

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) >= 1 and shape[0] == len(generators):
            return np.stack([g.standard_normal(shape[1:], dtype=np.float32) for g in generators])
        return generators[0].standard_normal(shape, dtype=np.float32)

    return draw


def request_noise(
    seeds: Sequence[int], shape: tuple[int, ...], latents: np.ndarray | None
) -> np.ndarray:
    """A request's initial noise of ``shape`` (batch first): the caller's ``latents``, checked
    (InputError), or drawn from ``seeds``."""
    from trt_sd.models.errors import InputError

    if latents is None:
        return initial_noise(seeds, shape[1:])
    latents = np.asarray(latents, dtype=np.float32)
    if latents.shape != shape:
        raise InputError(f"latents must have shape {shape}, got {latents.shape}")
    if not np.isfinite(latents).all():
        raise InputError("latents contain NaN or inf")
    return latents
