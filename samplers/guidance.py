"""Classifier-free guidance as diffusers' StableDiffusionPipeline applies it."""

from __future__ import annotations

import numpy as np


def cfg(
    cond: np.ndarray, uncond: np.ndarray, guidance_scale: float, guidance_rescale: float = 0.0
) -> np.ndarray:
    """``uncond + guidance_scale * (cond - uncond)``, optionally rescaled.

    ``guidance_rescale`` > 0 applies Lin et al. (2023) section 3.4 (diffusers'
    ``rescale_noise_cfg``): match the per-sample standard deviation (unbiased, over all
    non-batch axes) of the guided output to the conditional one, and blend by that factor.
    Works on eps, v or x0 outputs alike; returns the dtype of ``cond``.
    """
    cond, uncond = np.asarray(cond), np.asarray(uncond)
    if cond.shape != uncond.shape:
        raise ValueError(f"cond shape {cond.shape} does not match uncond shape {uncond.shape}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale={guidance_rescale!r} must be in [0, 1]")
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0.0:
        axes = tuple(range(1, cond.ndim))
        std_cond = cond.std(axis=axes, ddof=1, keepdims=True)
        std_guided = guided.std(axis=axes, ddof=1, keepdims=True)
        rescaled = guided * (std_cond / std_guided)
        guided = guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided
    return guided.astype(cond.dtype, copy=False)
