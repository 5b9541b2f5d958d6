"""Noise schedules (betas -> alphas_cumprod) and timestep spacings, bit-for-bit as diffusers.

Why bit-for-bit: diffusers builds its tables in float32 torch; Karras grids round timesteps
computed from them, so a last-bit difference can move a timestep handed to the UNet. The
helpers below reproduce torch's float32 ``linspace`` and its double-accumulated ``cumprod``.

Spacings differ per scheduler family, so each is a named *rule*:

- ``"standard"`` (DDPM, DDIM, PNDM, Euler, Heun, KDPM2, LMS): ``linspace`` = N points over
  [0, T-1]; ``leading`` = multiples of T//N plus ``steps_offset``; ``trailing`` = T - k*T/N - 1.
- ``"solver"`` (DPM-Solver multistep, UniPC): ``linspace`` and ``leading`` lay N+1 points and
  drop the last (so the final step lands near t=0, not on it).
- ``"singlestep"`` (DPM-Solver singlestep): always the N+1-point ``linspace``.

One deliberate difference: diffusers' ``trailing`` uses ``np.arange(T, 0, -T/N)``, which for
some N (61, 103, 121, ... with T=1000) yields N+1 entries ending in timestep -1. We always
return N timesteps (the first N of diffusers' list).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

#: Karras et al.'s rho, as diffusers and k-diffusion use it.
KARRAS_RHO = 7.0


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)``, bit-exact.

    torch computes the step in float32 and fills each half from its own end.
    """
    a, b = np.float32(start), np.float32(end)
    step = np.float64(np.float32((b - a) / np.float32(max(steps - 1, 1))))
    i = np.arange(steps, dtype=np.float64)
    lo = np.float64(a) + step * i
    hi = np.float64(b) - step * (steps - 1 - i)
    return np.where(i < steps // 2, lo, hi).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the ``squaredcos_cap_v2`` (improved DDPM cosine) schedule."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def _cumprod_f32(values: np.ndarray) -> np.ndarray:
    """torch's float32 cumprod accumulates in double; so do we."""
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), in float32."""
    abar_sqrt = np.sqrt(_cumprod_f32(np.float32(1.0) - betas))
    first, last = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def betas_from_config(config: Mapping[str, Any]) -> np.ndarray:
    """The float32 betas of a resolved scheduler config."""
    n = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
        if betas.shape != (n,):
            raise ValueError(f"trained_betas has {betas.size} values; num_train_timesteps is {n}")
    elif config["beta_schedule"] == "linear":
        betas = torch_linspace_f32(config["beta_start"], config["beta_end"], n)
    elif config["beta_schedule"] == "scaled_linear":
        betas = torch_linspace_f32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n) ** 2
    elif config["beta_schedule"] == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise ValueError(
            f"beta_schedule={config['beta_schedule']!r} is not supported; allowed: "
            "'linear', 'scaled_linear', 'squaredcos_cap_v2' (or trained_betas)"
        )
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod(config: Mapping[str, Any], clamp_zero_snr: bool = False) -> np.ndarray:
    """float32 ``alphas_cumprod``; ``clamp_zero_snr`` sets a zero-SNR schedule's last entry to
    2**-24 as the sigma-based diffusers classes do (sigma would be infinite otherwise)."""
    abar = _cumprod_f32(np.float32(1.0) - betas_from_config(config))
    if clamp_zero_snr and config.get("rescale_betas_zero_snr"):
        abar[-1] = np.float32(2.0**-24)
    return abar


def train_sigmas(abar: np.ndarray) -> np.ndarray:
    """k-diffusion sigmas of every training timestep, sqrt((1 - abar) / abar), float32."""
    return np.sqrt((np.float32(1.0) - abar) / abar)


def spaced_timesteps(
    config: Mapping[str, Any], steps: int, rule: str = "standard", last_timestep: int | None = None
) -> np.ndarray:
    """Descending float64 timesteps (not rounded for ``standard`` linspace) for ``steps`` steps.

    ``last_timestep`` is DPM-Solver's clipped range end (``lambda_min_clipped``).
    """
    train = int(config["num_train_timesteps"])
    last = train if last_timestep is None else last_timestep
    spacing = "linspace" if rule == "singlestep" else config.get("timestep_spacing", "linspace")
    offset = int(config.get("steps_offset", 0) or 0)
    if spacing == "trailing":
        # = diffusers' np.arange(last, 0, -train/steps), without its occasional extra entry
        start = last if rule == "solver" else train
        offsets = np.arange(steps) * (train / steps)
        return np.round(start - offsets[start - offsets > 0]) - 1.0
    if rule == "standard":
        if spacing == "linspace":
            return np.linspace(0, train - 1, steps)[::-1].copy()
        if spacing == "leading":
            return (np.arange(steps) * (train // steps)).round()[::-1] + float(offset)
    else:
        if spacing == "linspace":
            return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy()
        if spacing == "leading":
            ratio = last // (steps + 1)
            return (np.arange(steps + 1) * ratio).round()[::-1][:-1] + float(offset)
    raise ValueError(
        f"timestep_spacing={spacing!r} is not supported; allowed: 'leading', 'trailing', 'linspace'"
    )
