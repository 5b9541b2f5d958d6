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


def handed_latents(result: Any, family: Any) -> np.ndarray:
    """A base's ``GenerationResult`` as a refiner input: its latents, refused from another
    latent space (mixing engine directories of families whose VAEs differ)."""
    if result.latents is None:
        raise InputError("the result passed as image has no latents: use output_type='latent'")
    if result.latent_space != family.latent_space:
        raise InputError(
            f"these latents come from a model in the {result.latent_space!r} latent space; "
            f"this {family.label} engine directory takes {family.latent_space!r} "
            "latents (base and refiner must be of one family)"
        )
    return np.asarray(result.latents)


def prepare_handoff(
    pipe: Any,
    image: Any,
    denoising_start: Any,
    sampler: str,
    steps: int | None,
    height: int | None,
    width: int | None,
    strength: float | None,
) -> tuple[np.ndarray | None, Any, int | None, int | None, float | None]:
    """``(handed latents or None, image, height, width, strength)`` of a call: with latents
    (an array or a base's result) as ``image``, the image becomes None, the size comes from
    the latents and the strength starts the schedule at ``denoising_start``."""
    if hasattr(image, "latent_space") and hasattr(image, "latents"):  # a GenerationResult
        image = handed_latents(image, pipe.family)
    handed = as_latents(image, pipe.manifest.dims.latent_channels)
    if handed is None:
        if denoising_start is not None:
            raise InputError(
                "denoising_start continues from latents: pass the base's result.latents as image"
            )
        return None, image, height, width, strength
    if denoising_start is None:
        raise InputError("latents as image need denoising_start (the hand-off point)")
    factor = pipe.manifest.dims.vae_scale_factor
    height = handed.shape[2] * factor if height is None else height
    width = handed.shape[3] * factor if width is None else width
    steps = int(steps or pipe.manifest.defaults.get("steps", 30))
    from trt_sd.samplers import resolve, stepper

    try:
        name, implied = resolve(sampler)
        full = stepper(name, pipe.scheduler_config, steps, **dict(implied))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"sampler {sampler}: {e}") from None
    strength = start_strength(full.timesteps, steps, denoising_start, pipe.scheduler_config)
    return handed, None, height, width, strength
