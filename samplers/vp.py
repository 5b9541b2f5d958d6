"""The shared machinery of the variance-preserving solvers (DPM-Solver(++), UniPC): the step
grid, the stored model outputs and the precomputed linear combinations a step is made of.

Every step of these solvers is linear in x and the stored outputs: ``x_next = cx * x +
sum_j w_j * m_(k-j) (+ cz * noise)``, with m the model output converted to predicted x0
("data") or noise. All weights are known once the grid is, so construction turns each step
into a :class:`~.base.LinearCombination` and ``step`` is array passes and little else: for
DPM-Solver++(2M), 7 passes over the latent (2 to store the new output, 5 for the update) and
no temporary arrays. NumPy's ufuncs take two operands and no fused multiply-add, and a step
must produce two new arrays (x_next and the stored output) from x, the model output and the
stored one; every rearrangement we tried that stays exact for whatever x the caller hands
in needs 7 (docs/benchmarks.md, "Sampler step").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .base import (
    F32,
    LinearCombination,
    NoiseFn,
    Stepper,
    aligned_empty,
    combine,
    dynamic_threshold,
    vp_eps,
    vp_x0,
)
from .schedules import alphas_cumprod
from .sigmas import GridRule, build_grid, log_snr, vp_coefficients

#: (cx, weights of m_k, m_k-1, ..., noise weight) of one step, newest output first
Coeffs = tuple[float, list[float], float]


def distinct_order(lambdas: list[float], k: int, order: int) -> int:
    """Lower ``order`` until the outputs it combines sit at distinct lambdas: rounding can
    repeat a timestep when steps approach num_train_timesteps, and a zero gap would divide
    by zero in the finite differences (diffusers returns inf / NaN there)."""
    while order > 1 and any(lambdas[k - j] == lambdas[k - j - 1] for j in range(order - 1)):
        order -= 1
    return order


class VPSolverStepper(Stepper):
    """Grid, output storage and compiled steps shared by the DPM-Solver and UniPC steppers.

    Subclasses set ``rule``, call ``super().__init__``, set ``_keep`` (how many outputs a step
    combines), compile their steps with :meth:`_compile` and end with :meth:`_finish_vp`.

    ``exact_timesteps``: diffusers rounds a Karras grid's timesteps for the model while the
    update uses the unrounded sigmas, which caps the order a solver can reach; with True the
    model gets ``sigma_to_t(sigma)`` unrounded (float32), the timestep of the very sigma the
    update uses, as diffusers' Euler and Heun do.
    """

    rule: GridRule

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        rng: np.random.Generator | None,
        noise_fn: NoiseFn | None,
        data: bool,
        exact_timesteps: bool = False,
    ) -> None:
        super().__init__(config, rng, noise_fn)
        abar = alphas_cumprod(config, clamp_zero_snr=True)
        self._exact = bool(exact_timesteps)
        rule = dataclasses.replace(self.rule, round_karras=False) if self._exact else self.rule
        self.grid = build_grid(config, abar, steps, rule)
        self.sigmas = [float(s) for s in self.grid.sigmas]
        self.lambdas = [log_snr(s) for s in self.sigmas]
        self.n = len(self.sigmas) - 1
        self._data = data  # the stored outputs are predicted x0 (else predicted noise)
        self._thresholding = bool(config.get("thresholding"))
        # Output k is stored as u with m = scale * u: u = x + (b/a) * out is one pass cheaper
        # than a * x + b * out, and the scale folds into the step weights (b * out if a = 0;
        # thresholding needs m itself).
        pred, convert = config["prediction_type"], vp_x0 if data else vp_eps
        self._conv = [convert(pred, *vp_coefficients(s)) for s in self.sigmas[:-1]]
        plain = not self._thresholding
        self._scale = [a if plain and a else 1.0 for a, _ in self._conv]
        self._adds_x = [bool(plain and a) for a, _ in self._conv]
        self._q = [b / a if plain and a else b for a, b in self._conv]
        self._q32 = [np.array(q, dtype=np.float32) for q in self._q]
        self._keep = 1
        self._history: list[np.ndarray | None] = []

    def _finish_vp(self, t_start: int) -> None:
        self._history = [None] * self._keep  # newest first; None: not produced yet
        ts = self.grid.timesteps
        # diffusers hands out int64 (truncating unrounded cosine-Karras timesteps)
        ts = ts.astype(np.float32) if self._exact else ts.astype(np.int64)
        self._finish(ts, np.ones(ts.size), t_start, 1.0)

    def _noise_scales(self, i: int = 0) -> tuple[float, float]:
        return vp_coefficients(self.sigmas[self._begin + i])

    def _compile(self, k: int, coeffs: Coeffs) -> tuple[LinearCombination, bool]:
        """The step ``coeffs`` (weights on m_k, m_k-1, ...) as one combination over
        ``[x, u_k, u_k-1, ..., noise]`` (``noise`` fresh, only if it takes some)."""
        cx, weights, cz = coeffs
        stored = [w * self._scale[k - j] if w else 0.0 for j, w in enumerate(weights)]
        stored += [0.0] * (self._keep - len(stored))
        return LinearCombination([cx, *stored, cz]), cz != 0.0

    def _push(self, model_output: np.ndarray, k: int, x: np.ndarray) -> list[Any]:
        """Store model call k's output in the buffer of the oldest one, which no step needs any
        more (``_keep`` aligned buffers per stepper, reused: no step allocates one, and they
        stay in cache). Returns the stored outputs, newest first, for a compiled step's
        ``[x, u_k, u_k-1, ...]``. (Inline ufunc calls: this runs every step.)"""
        history = self._history
        buffer = history.pop()
        if buffer is None or buffer.shape != x.shape or buffer.dtype is not x.dtype:
            buffer = aligned_empty(x.shape, x.dtype)
        if self._thresholding:
            a, b = self._conv[k]
            u = self._threshold(combine([(a, x), (b, model_output)], x.dtype), k, x)
        else:
            q = self._q32[k] if x.dtype is F32 else np.array(self._q[k], dtype=x.dtype)
            u = np.multiply(model_output, q, buffer)
            if self._adds_x[k]:
                np.add(u, x, u)
        history.insert(0, u)
        return history

    def _threshold(self, m: np.ndarray, k: int, x: np.ndarray) -> np.ndarray:
        def clip(x0: np.ndarray) -> np.ndarray:
            ratio, top = self.config["dynamic_thresholding_ratio"], self.config["sample_max_value"]
            return dynamic_threshold(x0, ratio, top)

        if self._data:
            return clip(m)
        # noise prediction: threshold the x0 it implies, then convert back (diffusers does)
        alpha, sigma_t = vp_coefficients(self.sigmas[k])
        x0 = clip(combine([(1 / alpha, x), (-sigma_t / alpha, m)], m.dtype))
        return combine([(1 / sigma_t, x), (-alpha / sigma_t, x0)], m.dtype)
