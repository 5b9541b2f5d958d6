"""The k-diffusion family (Karras et al. 2022): Euler, Euler ancestral, Heun, DPM2, DPM2
ancestral, LMS and DPM++ 2S ancestral, over diffusers' sigma grids.

Latents are variance exploding, x = x0 + sigma * eps, so txt2img starts from noise scaled by
the largest sigma and the UNet sees x / sqrt(sigma^2 + 1). Every sampler here integrates the
probability-flow ODE dx/dsigma = (x - x0(x, sigma)) / sigma; the ancestral ones step down to
``sigma_down`` and add fresh noise of size ``sigma_up``. The two-stage ones (Heun, DPM2, 2S)
call the model twice per step, except on the last step to sigma = 0 where they take one Euler
step, so N steps cost 2N - 1 calls (diffusers' interleaved timestep lists).

Beyond diffusers: every sampler here accepts ``prediction_type="sample"`` (diffusers raises
NotImplementedError for Euler ancestral and both KDPM2s) and Karras / exponential sigmas
(Euler ancestral has neither in diffusers; it then follows Euler's grid rule), and the
ancestral ones take ``eta`` (k-diffusion's; 1 = diffusers).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.polynomial import polynomial as poly

from .base import NoiseFn, Stepper, clip_x0, combine, ve_x0
from .schedules import alphas_cumprod
from .sigmas import GridRule, ancestral_step, build_grid

#: Euler, Euler ancestral, Heun, LMS: model timesteps of Karras grids stay fractional.
EULER_RULE = GridRule("standard", "spaced", round_karras=False)
#: KDPM2 and KDPM2 ancestral round the main timesteps of a Karras grid.
KDPM2_RULE = GridRule("standard", "spaced", round_karras=True)


def _geometric_mean(a: float, b: float) -> float:
    """The log-midpoint of two sigmas, rounded to float32 as diffusers' tables are."""
    return (
        0.0 if a == 0 or b == 0 else float(np.float32(math.exp(0.5 * (math.log(a) + math.log(b)))))
    )


class _SigmaStepper(Stepper):
    """Shared set-up: the sigma grid, input scaling, init noise and add_noise."""

    rule = EULER_RULE
    #: model calls per step as diffusers counts them (``scheduler.order``), for img2img trimming
    calls_per_step = 1

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        rng: np.random.Generator | None,
        noise_fn: NoiseFn | None,
    ) -> None:
        super().__init__(config, rng, noise_fn)
        abar = alphas_cumprod(config, clamp_zero_snr=True)
        self.grid = build_grid(config, abar, steps, self.rule)
        self.sigmas = [float(s) for s in self.grid.sigmas]
        self.pred = config["prediction_type"]

    def _finish_calls(
        self, call_sigmas: list[float], call_timesteps: np.ndarray, t_start: int
    ) -> None:
        self._call_sigmas = call_sigmas
        top = max(self.sigmas)
        spacing = self.config.get("timestep_spacing", "linspace")
        init = top if spacing in ("linspace", "trailing") else math.sqrt(top * top + 1.0)
        c_in = [1.0 / math.sqrt(s * s + 1.0) for s in call_sigmas]
        timesteps = np.asarray(call_timesteps, dtype=np.float32)
        self._finish(timesteps, np.array(c_in), t_start * self.calls_per_step, init)

    def _noise_scales(self, i: int = 0) -> tuple[float, float]:
        return 1.0, self._call_sigmas[self._begin + i]

    def _x0(self, model_output: np.ndarray, x: np.ndarray, sigma: float) -> np.ndarray:
        a, b = ve_x0(self.pred, sigma)
        return clip_x0(combine([(a, x), (b, model_output)], x.dtype), self.config)

    def _derivative(self, x: np.ndarray, x0: np.ndarray, sigma: float) -> np.ndarray:
        """dx/dsigma = (x - x0) / sigma."""
        return combine([(1.0 / sigma, x), (-1.0 / sigma, x0)], x.dtype)


class EulerStepper(_SigmaStepper):
    """Euler's method on the probability-flow ODE (k-diffusion ``sample_euler``)."""

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
    ) -> None:
        super().__init__(config, steps, rng, noise_fn)
        timesteps = self.grid.timesteps
        if config.get("timestep_type") == "continuous" and self.pred == "v_prediction":
            timesteps = 0.25 * np.log(np.asarray(self.sigmas[:-1], dtype=np.float32))
        self._finish_calls(self.sigmas[:-1], timesteps, t_start)

    def _step(self, model_output: np.ndarray, k: int, x: np.ndarray) -> np.ndarray:
        sigma, ratio = self.sigmas[k], (self.sigmas[k + 1] - self.sigmas[k]) / self.sigmas[k]
        a, b = ve_x0(self.pred, sigma)
        # x + (x - x0) * dt / sigma with x0 = a x + b out, folded into two terms
        return combine([(1.0 + (1.0 - a) * ratio, x), (-b * ratio, model_output)], x.dtype)


class EulerAncestralStepper(_SigmaStepper):
    """Euler step down to sigma_down, then noise of size sigma_up (``sample_euler_ancestral``)."""

    stochastic = True

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
        eta: float = 1.0,
    ) -> None:
        super().__init__(config, steps, rng, noise_fn)
        self._splits = [
            ancestral_step(s, s_next, eta)
            for s, s_next in zip(self.sigmas, self.sigmas[1:], strict=False)
        ]
        self._finish_calls(self.sigmas[:-1], self.grid.timesteps, t_start)

    def _step(self, model_output: np.ndarray, k: int, x: np.ndarray) -> np.ndarray:
        sigma, (down, up) = self.sigmas[k], self._splits[k]
        a, b = ve_x0(self.pred, sigma)
        ratio = (down - sigma) / sigma
        terms = [(1.0 + (1.0 - a) * ratio, x), (-b * ratio, model_output)]
        if up > 0.0:
            terms.append((up, self._noise(x)))
        return combine(terms, x.dtype)


class _TwoStageStepper(_SigmaStepper):
    """Steps of two model calls: call 2k at sigma_k, call 2k+1 at an intermediate sigma."""

    calls_per_step = 2

    def _two_stage_calls(
        self, mids: list[float], t_start: int, mid_ts: np.ndarray | None = None
    ) -> None:
        """Interleave [t_0, t(mid_0), t_1, t(mid_1), ..., t_{N-1}] as diffusers does."""
        self._mids = mids
        n = len(self.sigmas) - 1
        call_sigmas, call_ts = [self.sigmas[0]], [float(self.grid.timesteps[0])]
        if mid_ts is None:
            mid_ts = self.grid.t_of(np.array(mids[: n - 1])) if n > 1 else np.zeros(0)
        for k in range(1, n):
            call_sigmas += [mids[k - 1], self.sigmas[k]]
            call_ts += [float(mid_ts[k - 1]), float(self.grid.timesteps[k])]
        self._saved = np.zeros(0)  # x at the start of the current two-stage step
        self._finish_calls(call_sigmas, np.array(call_ts), t_start)

    def _step(self, model_output: np.ndarray, k: int, x: np.ndarray) -> np.ndarray:
        n, stage = divmod(k, 2)
        if stage == 0:
            return self._first(model_output, n, x)
        return self._second(model_output, n, x)

    def _first(self, model_output: np.ndarray, n: int, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _second(self, model_output: np.ndarray, n: int, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class HeunStepper(_TwoStageStepper):
    """Heun's method (Karras et al. Algorithm 1 without churn): trapezoid of the slopes at
    sigma_k and at the Euler prediction for sigma_{k+1}."""

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
    ) -> None:
        super().__init__(config, steps, rng, noise_fn)
        self._d1 = np.zeros(0)  # the slope at the start of the current step
        # the second call of step k re-evaluates at sigma_k+1, so it gets that timestep
        self._two_stage_calls(self.sigmas[1:-1], t_start, self.grid.timesteps[1:])

    def _first(self, model_output: np.ndarray, n: int, x: np.ndarray) -> np.ndarray:
        sigma, sigma_next = self.sigmas[n], self.sigmas[n + 1]
        self._d1 = self._derivative(x, self._x0(model_output, x, sigma), sigma)
        self._saved = x
        return combine([(1.0, x), (sigma_next - sigma, self._d1)], x.dtype)

    def _second(self, model_output: np.ndarray, n: int, x: np.ndarray) -> np.ndarray:
        sigma, sigma_next = self.sigmas[n], self.sigmas[n + 1]
        d2 = self._derivative(x, self._x0(model_output, x, sigma_next), sigma_next)
        half_dt = 0.5 * (sigma_next - sigma)
        return combine([(1.0, self._saved), (half_dt, self._d1), (half_dt, d2)], x.dtype)


class DPM2Stepper(_TwoStageStepper):
    """DPM-Solver-2 in Karras' form (``sample_dpm_2``): Euler to the log-midpoint sigma, then
    a full step with the slope there."""

    rule = KDPM2_RULE

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
    ) -> None:
        super().__init__(config, steps, rng, noise_fn)
        mids = [_geometric_mean(a, b) for a, b in zip(self.sigmas, self.sigmas[1:], strict=False)]
        self._two_stage_calls(mids, t_start)

    def _first(self, model_output: np.ndarray, n: int, x: np.ndarray) -> np.ndarray:
        sigma, mid = self.sigmas[n], self._mids[n]
        d = self._derivative(x, self._x0(model_output, x, sigma), sigma)
        self._saved = x
        return combine([(1.0, x), (mid - sigma, d)], x.dtype)  # mid = 0 on the last step

    def _second(self, model_output: np.ndarray, n: int, x: np.ndarray) -> np.ndarray:
        sigma, mid, sigma_next = self.sigmas[n], self._mids[n], self.sigmas[n + 1]
        d = self._derivative(x, self._x0(model_output, x, mid), mid)
        return combine([(1.0, self._saved), (sigma_next - sigma, d)], x.dtype)


class _AncestralTwoStage(_TwoStageStepper):
    """Two-stage ancestral steps: deterministic part to sigma_down, noise of size sigma_up."""

    stochastic = True
    rule = KDPM2_RULE

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
        eta: float = 1.0,
    ) -> None:
        super().__init__(config, steps, rng, noise_fn)
        self._splits = [
            ancestral_step(s, s_next, eta)
            for s, s_next in zip(self.sigmas, self.sigmas[1:], strict=False)
        ]
        mids = [
            _geometric_mean(s, down)
            for s, (down, _) in zip(self.sigmas, self._splits, strict=False)
        ]
        self._two_stage_calls(mids, t_start)

    def _add_noise_term(
        self, terms: list[tuple[float, np.ndarray]], n: int, x: np.ndarray
    ) -> np.ndarray:
        up = self._splits[n][1]
        if up > 0.0:
            terms.append((up, self._noise(x)))
        return combine(terms, x.dtype)


class DPM2AncestralStepper(_AncestralTwoStage):
    """DPM2 to sigma_down plus fresh noise (``sample_dpm_2_ancestral``, diffusers' KDPM2A)."""

    def _first(self, model_output: np.ndarray, n: int, x: np.ndarray) -> np.ndarray:
        sigma, mid = self.sigmas[n], self._mids[n]
        d = self._derivative(x, self._x0(model_output, x, sigma), sigma)
        self._saved = x
        return combine([(1.0, x), (mid - sigma, d)], x.dtype)  # mid = 0 on the last step

    def _second(self, model_output: np.ndarray, n: int, x: np.ndarray) -> np.ndarray:
        sigma, mid, down = self.sigmas[n], self._mids[n], self._splits[n][0]
        d = self._derivative(x, self._x0(model_output, x, mid), mid)
        return self._add_noise_term([(1.0, self._saved), (down - sigma, d)], n, x)


class DPMpp2SAncestralStepper(_AncestralTwoStage):
    """DPM-Solver++(2S) to sigma_down plus noise (k-diffusion ``sample_dpmpp_2s_ancestral``).

    In x = x0 + sigma eps the exponential integrator's first-order step from sigma to s is
    x_s = (s / sigma) x - expm1(-h) x0 with h = log(sigma / s); the second stage re-steps
    from sigma_k with the x0 predicted at the log-midpoint. No diffusers equivalent exists.
    """

    rule = EULER_RULE

    def _first(self, model_output: np.ndarray, n: int, x: np.ndarray) -> np.ndarray:
        sigma, mid = self.sigmas[n], self._mids[n]
        x0 = self._x0(model_output, x, sigma)
        self._saved = x
        if mid == 0.0:  # last step (sigma_down = 0): an Euler step lands on x0
            return x0
        return combine([(mid / sigma, x), (-math.expm1(-math.log(sigma / mid)), x0)], x.dtype)

    def _second(self, model_output: np.ndarray, n: int, x: np.ndarray) -> np.ndarray:
        sigma, mid, down = self.sigmas[n], self._mids[n], self._splits[n][0]
        x0 = self._x0(model_output, x, mid)
        terms = [(down / sigma, self._saved), (-math.expm1(-math.log(sigma / down)), x0)]
        return self._add_noise_term(terms, n, x)


def lms_coefficients(sigmas: list[float], k: int, order: int) -> list[float]:
    """Weights of the last ``order`` slopes (newest first) for the step sigma_k -> sigma_k+1:
    each Lagrange basis polynomial through sigma_k, sigma_k-1, ... integrated exactly over
    the step (diffusers integrates the same polynomials with scipy.quad)."""
    nodes = [sigmas[k - j] for j in range(order)]
    weights = []
    for j in range(order):
        basis = np.array([1.0])
        for m, node in enumerate(nodes):
            if m != j:
                basis = poly.polymul(basis, [-node, 1.0]) / (nodes[j] - node)
        antiderivative = poly.polyint(basis)
        weights.append(
            float(
                poly.polyval(sigmas[k + 1], antiderivative)
                - poly.polyval(sigmas[k], antiderivative)
            )
        )
    return weights


class LMSStepper(_SigmaStepper):
    """Linear multistep (Adams-Bashforth in sigma) over the last ``order`` slopes.

    img2img: diffusers picks the order from the absolute step index, so after trimming it
    weights one stored slope with a 4th-order coefficient set; we use the slopes we have.
    """

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
        order: int = 4,
    ) -> None:
        super().__init__(config, steps, rng, noise_fn)
        if order not in (1, 2, 3, 4):
            raise ValueError(f"order={order!r} is not supported by lms; allowed: 1, 2, 3, 4")
        self.order = order
        self._slopes: list[np.ndarray] = []
        n = len(self.sigmas) - 1
        self._weights = {
            k: lms_coefficients(self.sigmas, k, min(order, k - t_start + 1))
            for k in range(t_start, n)
        }
        self._finish_calls(self.sigmas[:-1], self.grid.timesteps, t_start)

    def _step(self, model_output: np.ndarray, k: int, x: np.ndarray) -> np.ndarray:
        sigma = self.sigmas[k]
        slope = self._derivative(x, self._x0(model_output, x, sigma), sigma)
        self._slopes = [*self._slopes, slope][-self.order :]
        terms = zip(self._weights[k], reversed(self._slopes), strict=True)
        return combine([(1.0, x), *terms], x.dtype)
