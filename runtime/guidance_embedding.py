"""The guidance-scale embedding of LCM-distilled UNets, in NumPy.

A UNet distilled with Latent Consistency (``time_cond_proj_dim`` in its config) takes the
guidance scale as an input (``timestep_cond``) instead of running classifier-free guidance:
diffusers' pipelines then skip the unconditional rows and feed
``get_guidance_scale_embedding(guidance - 1, time_cond_proj_dim)`` (the Imagen-style scale
minus one, as ``StableDiffusionPipeline`` and ``LatentConsistencyModelPipeline`` both do): a
sinusoidal embedding of ``1000 * w``, sines then cosines, computed here in float32 as torch
does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def guidance_embedding(guidance: Sequence[float], dim: int) -> np.ndarray:
    """``(rows, dim)`` float32: one embedding of ``guidance - 1`` per row."""
    w = (np.asarray(guidance, dtype=np.float32) - np.float32(1.0)) * np.float32(1000.0)
    half = dim // 2
    step = np.log(np.float32(10000.0)).astype(np.float32) / np.float32(half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float32) * -step).astype(np.float32)
    angles = w[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb
