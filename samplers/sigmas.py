"""Sigma grids and the conversions between sigma, timestep and (alpha, sigma_t) pairs.

Conventions (diffusers' and k-diffusion's): ``sigma = sqrt((1 - abar) / abar)`` is the
variance-exploding noise level; the variance-preserving pair is ``alpha_t = 1/sqrt(1+sigma^2)``,
``sigma_t = sigma * alpha_t``; the log-SNR DPM-Solver steps in is ``lambda = -log(sigma)``.

Every diffusers class builds its step grid a little differently (which spacing, where a Karras
grid starts and ends, whether its timesteps are rounded); :class:`GridRule` names those
choices so each sampler states its class's rule in one line instead of repeating the code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .schedules import KARRAS_RHO, spaced_timesteps, train_sigmas


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps of ``sigma`` by linear interpolation in log-sigma (diffusers'
    ``_sigma_to_t``); ``log_sigmas`` is the float32 log of the training sigmas."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10)).reshape(-1)
    dists = log_sigma - log_sigmas[:, None]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def karras_sigmas(
    sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO
) -> np.ndarray:
    """Karras et al. (2022) eq. 5: uniform in sigma**(1/rho) from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Uniform in log-sigma from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def vp_coefficients(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of the variance-preserving process at k-diffusion ``sigma``."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def log_snr(sigma: float) -> float:
    """DPM-Solver's lambda = log(alpha_t / sigma_t) = -log(sigma); +inf at sigma = 0."""
    return math.inf if sigma == 0 else -math.log(sigma)


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) splitting a step into a deterministic part and fresh noise.

    Clamped so float rounding can never take a square root of a negative number (diffusers'
    float32 KDPM2-ancestral returns NaN there on cosine schedules).
    """
    if sigma_to == 0 or eta == 0:
        return sigma_to, 0.0
    var_up = sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2
    sigma_up = min(sigma_to, eta * math.sqrt(max(var_up, 0.0)))
    return math.sqrt(max(sigma_to**2 - sigma_up**2, 0.0)), sigma_up


@dataclass(frozen=True)
class GridRule:
    """How one diffusers class lays out its sigmas for N steps.

    spacing: ``schedules.spaced_timesteps`` rule. karras_range: ``"spaced"`` takes the Karras /
    exponential end points from the spaced grid (Euler family), ``"table"`` from the whole
    training table (DPM-Solver, UniPC). round_karras: round the model timesteps of a Karras
    grid (``"not_cosine"``: except for squaredcos_cap_v2, as DPMSolverMultistep does); False
    also keeps Lu-lambda timesteps unrounded.
    sigma_min_final: what ``final_sigmas_type="sigma_min"`` means on a Karras grid -
    ``"table"`` the training table's smallest sigma, ``"grid"`` the grid's own last sigma (UniPC).
    """

    spacing: str = "standard"
    karras_range: str = "spaced"
    round_karras: bool | str = False
    sigma_min_final: str = "table"


@dataclass(frozen=True)
class SigmaGrid:
    """N+1 sigmas (float32 values held in float64; the last one is the final sigma), the N
    timesteps handed to the model, and the training log-sigmas for intermediate points."""

    sigmas: np.ndarray
    timesteps: np.ndarray
    log_sigmas: np.ndarray

    def t_of(self, sigma: np.ndarray) -> np.ndarray:
        return sigma_to_t(np.asarray(sigma), self.log_sigmas)


def build_grid(
    config: Mapping[str, Any], abar: np.ndarray, steps: int, rule: GridRule
) -> SigmaGrid:
    """The step grid of a resolved config, following ``rule``."""
    table = train_sigmas(abar)
    log_sigmas = np.log(table)
    last = None
    clip = config.get("lambda_min_clipped", -math.inf)
    if clip is not None and clip > -math.inf:
        lambdas = np.log(np.sqrt(abar)) - np.log(np.sqrt(np.float32(1.0) - abar))
        last = int(config["num_train_timesteps"]) - int(np.searchsorted(lambdas[::-1], clip))
    timesteps = spaced_timesteps(config, steps, rule.spacing, last)
    sigmas = np.interp(timesteps, np.arange(table.size), table)
    n = timesteps.size
    if rule.karras_range == "table":
        lo, hi = float(table[0]), float(table[-1])
    else:
        lo, hi = float(sigmas[-1]), float(sigmas[0])
    lo = lo if config.get("sigma_min") is None else float(config["sigma_min"])
    hi = hi if config.get("sigma_max") is None else float(config["sigma_max"])
    cosine = config.get("beta_schedule") == "squaredcos_cap_v2"
    do_round = rule.round_karras is True or (rule.round_karras == "not_cosine" and not cosine)
    custom = True
    if config.get("use_karras_sigmas"):
        sigmas = karras_sigmas(lo, hi, n)
    elif config.get("use_exponential_sigmas"):
        sigmas, do_round = exponential_sigmas(lo, hi, n), False
    elif config.get("use_lu_lambdas"):
        lam_min, lam_max = float(log_sigmas[0]), float(log_sigmas[-1])
        sigmas = np.exp(lam_max + np.linspace(0, 1, n) * (lam_min - lam_max))
        do_round = rule.round_karras is not False and not cosine
    else:
        custom = False
    if custom:
        timesteps = sigma_to_t(sigmas, log_sigmas)
        if do_round:
            timesteps = timesteps.round()
    final = config.get("final_sigmas_type", "zero")
    if final == "sigma_min":
        grid_min = custom and rule.sigma_min_final == "grid"
        sigma_last = float(sigmas[-1]) if grid_min else float(table[0])
    else:
        sigma_last = 0.0
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32).astype(np.float64)
    return SigmaGrid(sigmas=sigmas, timesteps=timesteps, log_sigmas=log_sigmas)
