"""Base -> refiner hand-off at a fraction of the schedule (diffusers' ``denoising_end`` /
``denoising_start``), for any family.

The base runs the model calls whose timestep is at or above the cutoff
``round(T - denoising_end * T)`` (``T``: training timesteps) and returns its latents
undecoded; the refiner takes those latents as they are (no VAE encode, no added noise) and
runs the calls below the cutoff ``round(T - denoising_start * T)`` of its own schedule for the
same step count. The refiner's start is an img2img start: the stepper is built with the
strength that begins exactly at that call, so its history and noise streams are those of an
img2img run from there (diffusers' ``set_begin_index``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trt_sd.models.errors import InputError


def _fraction(value: Any, what: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number in (0, 1), got {value!r}") from None
    if not 0.0 < f < 1.0:
        raise InputError(f"{what} must be in (0, 1), got {value!r}")
    return f


def _cutoff(fraction: float, config: dict[str, Any]) -> int:
    t = int(config.get("num_train_timesteps", 1000))
    return round(t - fraction * t)


def end_calls(timesteps: np.ndarray, denoising_end: Any, config: dict[str, Any]) -> int:
    """Model calls the base runs for ``denoising_end`` (at least one)."""
    cutoff = _cutoff(_fraction(denoising_end, "denoising_end"), config)
    return max(1, int((np.asarray(timesteps) >= cutoff).sum()))


def start_strength(
    full_timesteps: np.ndarray, steps: int, denoising_start: Any, config: dict[str, Any]
) -> float:
    """The img2img strength whose stepper begins at diffusers' ``denoising_start`` call.

    Only for samplers with one model call per step (the step index is the call index)."""
    if len(full_timesteps) != steps:
        raise InputError(
            "denoising_start needs a sampler with one model call per step (not Heun / DPM2)"
        )
    cutoff = _cutoff(_fraction(denoising_start, "denoising_start"), config)
    remaining = int((np.asarray(full_timesteps) < cutoff).sum())
    if remaining == 0:
        raise InputError(f"denoising_start={denoising_start} leaves no step of {steps}")
    return (remaining + 0.5) / steps  # int(steps * strength) == remaining, free of rounding


def as_latents(image: Any, channels: int) -> np.ndarray | None:
    """``image`` when it is a (batch, channels, h, w) latents array (the base's
    ``result.latents``), else None."""
    if isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == channels:
        latents = np.asarray(image, dtype=np.float32)
        if not np.isfinite(latents).all():
            raise InputError("the latents passed as image contain NaN or inf")
        return latents
    return None
