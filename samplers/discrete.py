"""The discrete-time samplers that index ``alphas_cumprod`` by integer timestep: DDPM, DDIM,
PNDM (PLMS). Latents are variance preserving (x = sqrt(abar) x0 + sqrt(1 - abar) eps) and the
UNet sees them unscaled.

diffusers quirks kept on purpose (they are what checkpoints were tuned with): DDIM and PNDM
step from t to ``t - T // N`` whatever the spacing (with ``linspace`` that is not the next listed
timestep); DDPM steps to the next listed timestep.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import NoiseFn, Stepper, clip_x0, combine, needs_clip, vp_eps, vp_x0
from .schedules import alphas_cumprod, spaced_timesteps


class _AlphaBarStepper(Stepper):
    """Shared set-up: integer timesteps, ``alphas_cumprod`` and the add_noise rule."""

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None,
        noise_fn: NoiseFn | None,
    ) -> None:
        super().__init__(config, rng, noise_fn)
        self.abar = alphas_cumprod(config).astype(np.float64)
        self.full_timesteps = spaced_timesteps(config, steps).round().astype(np.int64)
        self.ratio = int(config["num_train_timesteps"]) // steps

    def _alpha(self, t: int, final: float) -> float:
        return float(self.abar[t]) if t >= 0 else final

    def _noise_scales(self, i: int = 0) -> tuple[float, float]:
        a = self.abar[int(self.timesteps[i])]
        return float(np.sqrt(a)), float(np.sqrt(1.0 - a))


class DDPMStepper(_AlphaBarStepper):
    """Ho et al. (2020) ancestral sampling, diffusers' ``DDPMScheduler`` (fixed variances)."""

    stochastic = True

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
    ) -> None:
        super().__init__(config, steps, t_start, rng, noise_fn)
        ts = self.full_timesteps
        self._plan: list[tuple[tuple[float, float], float, float, float]] = []
        for k, t in enumerate(ts):
            prev = int(ts[k + 1]) if k + 1 < ts.size else -1
            a_t, a_prev = self._alpha(int(t), 1.0), self._alpha(prev, 1.0)
            cur_beta = 1.0 - a_t / a_prev
            c_x0 = a_prev**0.5 * cur_beta / (1.0 - a_t)
            c_x = (a_t / a_prev) ** 0.5 * (1.0 - a_prev) / (1.0 - a_t)
            if config["variance_type"] == "fixed_large":
                var = cur_beta
            else:  # fixed_small / fixed_small_log: the posterior variance
                var = max((1.0 - a_prev) / (1.0 - a_t) * cur_beta, 1e-20)
            std = var**0.5 if t > 0 else 0.0
            x0 = vp_x0(config["prediction_type"], a_t**0.5, (1.0 - a_t) ** 0.5)
            self._plan.append((x0, c_x0, c_x, std))
        self._finish(ts, np.ones(ts.size), t_start, 1.0)

    def _step(self, model_output: np.ndarray, k: int, x: np.ndarray) -> np.ndarray:
        (a, b), c_x0, c_x, std = self._plan[k]
        x0 = clip_x0(combine([(a, x), (b, model_output)], x.dtype), self.config)
        terms = [(c_x0, x0), (c_x, x)]
        if std > 0.0:
            terms.append((std, self._noise(x)))
        return combine(terms, x.dtype)


class DDIMStepper(_AlphaBarStepper):
    """Song et al. (2021) DDIM; ``eta`` > 0 adds that fraction of DDPM's noise."""

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
        eta: float = 0.0,
    ) -> None:
        super().__init__(config, steps, t_start, rng, noise_fn)
        if not eta >= 0.0:
            raise ValueError(f"eta={eta!r} must be >= 0")
        self.eta = float(eta)
        self.stochastic = self.eta > 0
        final = 1.0 if config["set_alpha_to_one"] else float(self.abar[0])
        pred = config["prediction_type"]
        self._plan: list[tuple[tuple[float, float], tuple[float, float], float, float, float]] = []
        for t in self.full_timesteps:
            a_t, a_prev = self._alpha(int(t), final), self._alpha(int(t) - self.ratio, final)
            var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
            std = self.eta * var**0.5
            coeffs = (a_t**0.5, (1.0 - a_t) ** 0.5)
            c_eps = max(1.0 - a_prev - std * std, 0.0) ** 0.5
            self._plan.append(
                (vp_x0(pred, *coeffs), vp_eps(pred, *coeffs), a_prev**0.5, c_eps, std)
            )
        ts = self.full_timesteps
        self._finish(ts, np.ones(ts.size), t_start, 1.0)

    def _step(self, model_output: np.ndarray, k: int, x: np.ndarray) -> np.ndarray:
        (xa, xb), (ea, eb), c_x0, c_eps, std = self._plan[k]
        if needs_clip(self.config):
            x0 = clip_x0(combine([(xa, x), (xb, model_output)], x.dtype), self.config)
            terms = [(c_x0, x0), (c_eps * ea, x), (c_eps * eb, model_output)]
        else:  # x_prev is linear in (x, model_output): fold the x0 and eps terms
            terms = [(c_x0 * xa + c_eps * ea, x), (c_x0 * xb + c_eps * eb, model_output)]
        if std > 0.0:
            terms.append((std, self._noise(x)))
        return combine(terms, x.dtype)


#: PLMS's Adams-Bashforth weights by the number of stored outputs (newest first).
_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


class PNDMStepper(_AlphaBarStepper):
    """Liu et al. (2022) pseudo numerical methods, diffusers' ``PNDMScheduler``.

    With ``skip_prk_steps`` (every Stable Diffusion config) it is PLMS: the second step is
    repeated to form a Heun-like warm-up, then Adams-Bashforth of growing order, so N steps
    take N+1 model calls. Without it, three Runge-Kutta steps (12 calls) warm up.

    img2img: diffusers trims the call list by t_start, which pairs the repeated warm-up call
    with the wrong timestep (the sample lags one step behind). We restart PLMS on the
    remaining grid instead, so the first remaining timestep is where noising happened.
    """

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
    ) -> None:
        super().__init__(config, steps, t_start, rng, noise_fn)
        if config["prediction_type"] not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"pndm does not support prediction_type={config['prediction_type']!r}; "
                "allowed: 'epsilon', 'v_prediction'"
            )
        grid = self.full_timesteps[t_start:][::-1]  # ascending, trimmed for img2img
        skip_prk = bool(config["skip_prk_steps"])
        if not skip_prk and grid.size < 4:
            raise ValueError(
                f"PNDM with skip_prk_steps=False needs at least 4 remaining steps, got {grid.size}"
            )
        if skip_prk:
            self._n_prk = 0
            plms = np.concatenate([grid[:-1], grid[-2:-1], grid[-1:]])[::-1]
            ts = plms
        else:
            half = self.ratio // 2
            prk = np.array(grid[-4:]).repeat(2) + np.tile(np.array([0, half]), 4)
            prk_ts = prk[:-1].repeat(2)[1:-1][::-1]
            self._n_prk = prk_ts.size
            self._prk_timesteps = prk_ts
            ts = np.concatenate([prk_ts, grid[:-3][::-1]])
        ts = ts.astype(np.int64)
        self._final = 1.0 if config["set_alpha_to_one"] else float(self.abar[0])
        self._ets: list[np.ndarray] = []
        self._rk_sum = np.zeros(0)  # Runge-Kutta sum of the current PRK step
        self._rk_sample = np.zeros(0)  # the sample the current (PRK or warm-up) step left
        self._finish(ts, np.ones(ts.size), 0, 1.0)

    def _prev_sample(self, x: np.ndarray, t: int, t_prev: int, e: np.ndarray) -> np.ndarray:
        """x at ``t_prev`` from x at ``t`` and a (combined) model output ``e`` (PNDM eq. 9)."""
        a_t, a_prev = self._alpha(t, self._final), self._alpha(t_prev, self._final)
        if self.config["prediction_type"] == "v_prediction":
            e = combine([(a_t**0.5, e), ((1.0 - a_t) ** 0.5, x)], x.dtype)
        denom = a_t * (1.0 - a_prev) ** 0.5 + (a_t * (1.0 - a_t) * a_prev) ** 0.5
        return combine([((a_prev / a_t) ** 0.5, x), (-(a_prev - a_t) / denom, e)], x.dtype)

    def _step(self, model_output: np.ndarray, k: int, x: np.ndarray) -> np.ndarray:
        t = int(self.timesteps[k])
        if k < self._n_prk:
            return self._step_prk(model_output, k, t, x)
        return self._step_plms(model_output, k - self._n_prk, t, x)

    def _step_prk(self, e: np.ndarray, k: int, t: int, x: np.ndarray) -> np.ndarray:
        t_prev = t - (0 if k % 2 else self.ratio // 2)
        t_base = int(self._prk_timesteps[k // 4 * 4])
        stage = k % 4
        if stage == 0:
            self._rk_sum, self._rk_sample = e / 6.0, x
            self._ets.append(e)
        elif stage in (1, 2):
            self._rk_sum = self._rk_sum + e / 3.0
        else:
            e = self._rk_sum + e / 6.0
        return self._prev_sample(self._rk_sample, t_base, t_prev, e)

    def _step_plms(self, e: np.ndarray, n: int, t: int, x: np.ndarray) -> np.ndarray:
        t_prev = t - self.ratio
        if n == 1 and self._n_prk == 0:  # the repeated warm-up call: Heun-like average
            e = combine([(0.5, e), (0.5, self._ets[-1])], x.dtype)
            return self._prev_sample(self._rk_sample, t + self.ratio, t, e)
        self._ets = [*self._ets[-3:], e]
        if n == 0 and self._n_prk == 0:
            self._rk_sample = x
        weights = _ADAMS_BASHFORTH[len(self._ets)]
        e = combine(zip(weights, reversed(self._ets), strict=False), x.dtype)
        return self._prev_sample(x, t, t_prev, e)
