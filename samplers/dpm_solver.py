"""DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2022b), multistep and singlestep,
as diffusers' ``DPMSolverMultistepScheduler`` / ``DPMSolverSinglestepScheduler`` run them.

All variants are exponential integrators in lambda = log(alpha_t / sigma_t): a step from s to
t is ``x_t = cx * x_s + c0 * D0 + c1 * D1 + c2 * D2 (+ cz * noise)``, where D0, D1, D2
estimate the model output (x0 for "++", eps otherwise) and its first two lambda-derivatives
times h, h^2 from earlier outputs. :func:`phi` gives the c's; the steppers only differ in how
they form D1 and D2. Each step's weights on the stored outputs are precomputed, so ``step`` is
a few array passes.

Third order: ``dpm++3m`` vs ``dpm++3m-compat``
    With m(tau) expanded about lambda_s (tau = lambda - lambda_s, h = lambda_t - lambda_s),
    the data-prediction update is
        x_t = (sigma_t/sigma_s) x_s + alpha_t * integral_0^h e^(tau - h) m(tau) dtau
    and the tau^2/2 * m'' term integrates to alpha_t (h^2/2 - h + 1 - e^-h) * m''
    = c2 * (h^2 m''), with c2 = -alpha_t((e^-h - 1 + h)/h^2 - 1/2): D2 must estimate h^2 m''.
    From outputs at tau = 0, -h0, -(h0 + h1) (r0 = h0/h, r1 = h1/h), the divided differences
    D1_0 = (m0 - m1)/r0 ~ h(m' - h0 m''/2) and D1_1 = (m1 - m2)/r1 ~ h(m' - (h0 + h1/2) m'')
    give D1_0 - D1_1 ~ h^2 m'' (r0 + r1)/2, so h^2 m'' ~ 2 (D1_0 - D1_1)/(r0 + r1). diffusers
    (like the reference code) uses D2 = (D1_0 - D1_1)/(r0 + r1), half of that, which leaves an
    O(h^3) error term and caps the method near order 2; D1 = D1_0 + r0/(r0+r1)(D1_0 - D1_1)
    ~ h m' is right either way. ``dpm++3m`` uses the Taylor-consistent D2 (``d2_scale=2``);
    ``dpm++3m-compat`` and every other name keep diffusers' update (``d2_scale=1``).
    diffusers also rounds a Karras grid's timesteps for the model while stepping with the
    unrounded sigmas, which caps the measurable order too; ``dpm++3m`` therefore sets
    ``exact_timesteps=True`` (the model gets sigma_to_t(sigma) as float32). Any multistep name
    accepts ``exact_timesteps=``; the default (False) is diffusers' int64 timesteps.

Where diffusers fails, we keep going (tests/test_samplers_parity.py pins each case):

- final sigma 0: diffusers refuses it for noise prediction (UniPC returns NaN); we use the
  finite limit (sigma_t * e^h = alpha_t sigma_s / alpha_s) with a first-order last step;
- cosine (squaredcos_cap_v2) Karras grids repeat integer timesteps, and diffusers' timestep ->
  index lookup then raises (IndexError / AssertionError); steppers count model calls instead,
  which is what diffusers computes when told its position with ``set_begin_index(0)``;
- a zero lambda gap (steps close to num_train_timesteps repeat a timestep) would divide by
  zero in the finite differences (diffusers: inf / NaN); the order drops instead.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from .base import NoiseFn, Stepper, combine, dynamic_threshold, vp_eps, vp_x0
from .schedules import alphas_cumprod
from .sigmas import GridRule, build_grid, log_snr, vp_coefficients

MULTISTEP_RULE = GridRule("solver", "table", round_karras="not_cosine")
#: ``exact_timesteps``: the model gets sigma_to_t(sigma) unrounded, the timestep of the very
#: sigma the update uses (diffusers rounds Karras timesteps, which caps the measured order)
EXACT_RULE = GridRule("solver", "table", round_karras=False)
SINGLESTEP_RULE = GridRule("singlestep", "table", round_karras=True)

Coeffs = tuple[float, list[float], float]  # (cx, weights of m_k, m_k-1, ..., noise weight)


def phi(kind: str, s: float, t: float) -> tuple[float, float, float, float, float]:
    """(cx, c0, c1, c2, cz) of the step from sigma ``s`` to ``t`` for algorithm ``kind``."""
    a_s, st_s = vp_coefficients(s)
    a_t, st_t = vp_coefficients(t)
    h = log_snr(t) - log_snr(s)
    if h == 0.0:  # a Karras grid ending on sigma_min, then final sigma_min: a no-op step
        return 1.0, 0.0, 0.0, 0.0, 0.0
    finite = math.isfinite(h)  # h = inf only on a final step to sigma 0 (first order)
    if kind == "dpmsolver++":
        e = math.expm1(-h)
        c1 = a_t * (e / h + 1.0) if finite else 0.0
        c2 = -a_t * ((e + h) / h**2 - 0.5) if finite else 0.0
        return st_t / st_s, -a_t * e, c1, c2, 0.0
    if kind == "sde-dpmsolver++":
        e2 = math.expm1(-2.0 * h)
        c1 = a_t * (e2 / (2.0 * h) + 1.0) if finite else 0.0
        c2 = a_t * ((-e2 - 2.0 * h) / (4.0 * h * h) - 0.5) if finite else 0.0
        return st_t / st_s * math.exp(-h), -a_t * e2, c1, c2, st_t * math.sqrt(-e2)
    growth = a_t * st_s / a_s  # sigma_t * e^h, finite at sigma_t = 0
    e = math.expm1(h) if finite else 0.0
    c1 = -st_t * (e / h - 1.0) if finite else 0.0
    if kind == "dpmsolver":
        c2 = -st_t * ((e - h) / h**2 - 0.5) if finite else 0.0
        return a_t / a_s, st_t - growth, c1, c2, 0.0
    # sde-dpmsolver: twice the drift, plus noise sigma_t * sqrt(e^2h - 1)
    return a_t / a_s, 2.0 * (st_t - growth), 2.0 * c1, 0.0, math.sqrt(max(growth**2 - st_t**2, 0.0))


def distinct_order(lambdas: list[float], k: int, order: int) -> int:
    """Lower ``order`` until the outputs it combines sit at distinct lambdas: rounding can
    repeat a timestep when steps approach num_train_timesteps, and a zero gap would divide
    by zero in the finite differences (diffusers returns inf / NaN there)."""
    while order > 1 and any(lambdas[k - j] == lambdas[k - j - 1] for j in range(order - 1)):
        order -= 1
    return order


def _weights(c_d: list[float], d_rows: list[np.ndarray]) -> list[float]:
    """Weights on (m0, m1, ...) of sum(c_d[j] * D_j) where D_j = d_rows[j] . (m0, m1, ...)."""
    total = np.zeros(len(d_rows[0]))
    for c, row in zip(c_d, d_rows, strict=True):
        total += c * row
    return [float(w) for w in total]


class _VPStepper(Stepper):
    """Shared set-up of the variance-preserving solvers (DPM-Solver, UniPC)."""

    rule = MULTISTEP_RULE
    _data = True  # the stored outputs are predicted x0 (else predicted noise)

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        rng: np.random.Generator | None,
        noise_fn: NoiseFn | None,
        rule: GridRule | None = None,
    ) -> None:
        super().__init__(config, rng, noise_fn)
        abar = alphas_cumprod(config, clamp_zero_snr=True)
        self._exact = rule is not None and not rule.round_karras
        self.grid = build_grid(config, abar, steps, rule or self.rule)
        self.sigmas = [float(s) for s in self.grid.sigmas]
        self.lambdas = [log_snr(s) for s in self.sigmas]
        self.n = len(self.sigmas) - 1
        # stored outputs as (u, scale) with m = scale * u, newest last
        self._history: deque[tuple[np.ndarray, float]] = deque(maxlen=1)
        self._keep = 1  # how many outputs the method combines (set by subclasses)
        self._thresholding = bool(config.get("thresholding"))
        self._scratch: np.ndarray | None = None

    def _finish_vp(self, t_start: int) -> None:
        self._history = deque(maxlen=self._keep)
        pred, convert = self.config["prediction_type"], vp_x0 if self._data else vp_eps
        self._conv = [convert(pred, *vp_coefficients(s)) for s in self.sigmas[:-1]]
        ts = self.grid.timesteps
        # diffusers hands out int64 (truncating unrounded cosine-Karras timesteps)
        ts = ts.astype(np.float32) if self._exact else ts.astype(np.int64)
        self._finish(ts, np.ones(ts.size), t_start, 1.0)

    def _noise_scales(self) -> tuple[float, float]:
        return vp_coefficients(self.sigmas[self._begin])

    def _convert(self, model_output: np.ndarray, k: int, x: np.ndarray, data: bool) -> None:
        """Store the model output as predicted x0 (``data``) or noise, thresholded if the config
        says so. Stored as (u, scale) with m = scale * u: u = x + (b/a) * out costs one array
        pass less than a * x + b * out, and the scale folds into the step weights."""
        a, b = self._conv[k]
        if self._thresholding:
            alpha, sigma_t = vp_coefficients(self.sigmas[k])
            m = combine([(a, x), (b, model_output)], x.dtype)
            if data:
                m = self._threshold(m)
            else:
                x0 = self._threshold(combine([(1 / alpha, x), (-sigma_t / alpha, m)], x.dtype))
                m = combine([(1 / sigma_t, x), (-alpha / sigma_t, x0)], x.dtype)
            entry = (m, 1.0)
        elif a == 0.0:
            entry = (model_output * b, 1.0)
        else:
            u = model_output * (b / a)
            u += x
            entry = (u, a)
        self._history.append(entry)

    def _threshold(self, x0: np.ndarray) -> np.ndarray:
        return dynamic_threshold(
            x0, self.config["dynamic_thresholding_ratio"], self.config["sample_max_value"]
        )

    def _combine(self, cx: float, x: np.ndarray, weights: list[float]) -> np.ndarray:
        """cx * x + sum(w_j * m_j) over the stored outputs, newest first (the hot loop of
        every VP solver: one multiply and one add per stored output)."""
        out = x * cx
        tmp = self._tmp(x)
        for w, (u, scale) in zip(weights, reversed(self._history), strict=False):
            if w:
                np.multiply(u, w * scale, out=tmp)
                out += tmp
        return out

    def _tmp(self, x: np.ndarray) -> np.ndarray:
        """A scratch array reused across steps (saves an allocation per step)."""
        if (
            self._scratch is None
            or self._scratch.shape != x.shape
            or self._scratch.dtype != x.dtype
        ):
            self._scratch = np.empty_like(x)
        return self._scratch

    def _apply(self, coeffs: Coeffs, x: np.ndarray) -> np.ndarray:
        cx, weights, cz = coeffs
        out = self._combine(cx, x, weights)
        if cz:
            out += cz * self._noise(x)
        return out


def _algorithm(config: dict[str, Any]) -> tuple[str, str]:
    """(algorithm_type, solver_type) with diffusers' renames of DEIS / UniPC configs."""
    algorithm = config["algorithm_type"]
    solver = config["solver_type"]
    solver = "midpoint" if solver in ("logrho", "bh1", "bh2") else solver
    if solver not in ("midpoint", "heun"):
        raise ValueError(f"solver_type={solver!r} is not supported; allowed: 'midpoint', 'heun'")
    return algorithm, solver


class DPMSolverMultistepStepper(_VPStepper):
    """Multistep DPM-Solver / DPM-Solver++ (2M, 3M, SDE variants), one model call per step."""

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
        d2_scale: float = 1.0,
        exact_timesteps: bool = False,
    ) -> None:
        super().__init__(config, steps, rng, noise_fn, EXACT_RULE if exact_timesteps else None)
        kind, solver = _algorithm(config)
        order = int(config["solver_order"])
        if kind == "sde-dpmsolver" and order == 3:
            raise ValueError("order=3 is not available for sde-dpmsolver; allowed: 1, 2")
        self.stochastic = kind.startswith("sde")
        self.order = self._keep = order
        self._data = kind.endswith("++")
        n, few = self.n, self.n < 15
        final = config["euler_at_final"] or (config["lower_order_final"] and few)
        final = final or config["final_sigmas_type"] == "zero" or self.sigmas[-1] == 0.0
        self._plan: dict[int, Coeffs] = {}
        for k in range(t_start, n):
            done = min(k - t_start, order)  # diffusers' lower_order_nums
            if order == 1 or done < 1 or (k == n - 1 and final):
                o = 1
            elif order == 2 or done < 2 or (k == n - 2 and config["lower_order_final"] and few):
                o = 2
            else:
                o = 3
            self._plan[k] = self._coefficients(
                kind, solver, k, distinct_order(self.lambdas, k, o), d2_scale
            )
        self._finish_vp(t_start)

    def _coefficients(self, kind: str, solver: str, k: int, o: int, d2_scale: float) -> Coeffs:
        s = self.sigmas
        cx, c0, c1, c2, cz = phi(kind, s[k], s[k + 1])
        h = self.lambdas[k + 1] - self.lambdas[k]
        if o == 1 or h == 0.0:
            return cx, [c0], cz
        r0 = (self.lambdas[k] - self.lambdas[k - 1]) / h
        if o == 2:  # D0 = m0, D1 = (m0 - m1) / r0
            c_d1 = 0.5 * c0 if solver == "midpoint" else c1
            return cx, [c0 + c_d1 / r0, -c_d1 / r0], cz
        r1 = (self.lambdas[k - 1] - self.lambdas[k - 2]) / h
        d0 = np.array([1.0, 0.0, 0.0])
        d1_0 = np.array([1.0, -1.0, 0.0]) / r0
        d1_1 = np.array([0.0, 1.0, -1.0]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = d2_scale * (d1_0 - d1_1) / (r0 + r1)
        return cx, _weights([c0, c1, c2], [d0, d1, d2]), cz

    def _step(self, model_output: np.ndarray, k: int, x: np.ndarray) -> np.ndarray:
        self._convert(model_output, k, x, self._data)
        return self._apply(self._plan[k], x)


def singlestep_orders(
    steps: int, order: int, lower_order_final: bool, final_zero: bool
) -> list[int]:
    """diffusers' order list: each order-k step spans k grid intervals ([1, 2, 3, 1, 2, 3, ...])."""
    if not lower_order_final and steps % order != 0:
        lower_order_final = True
    if final_zero:
        lower_order_final = True
    if lower_order_final and order == 3:
        tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[steps % 3]
        orders = [1, 2, 3] * ((steps - (3 if steps % 3 == 0 else 0)) // 3) + tail
    elif lower_order_final and order == 2:
        orders = (
            [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
        )
    else:
        orders = list(range(1, order + 1)) * (steps // order)
    if final_zero:
        orders[-1] = 1
    return orders


class DPMSolverSinglestepStepper(_VPStepper):
    """Singlestep DPM-Solver(++): an order-k step restarts from the sample k grid points back
    and uses the k outputs since, so intermediate returned samples are provisional."""

    rule = SINGLESTEP_RULE

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
    ) -> None:
        super().__init__(config, steps, rng, noise_fn)
        kind, solver = _algorithm(config)
        if kind == "sde-dpmsolver":
            raise ValueError(
                "singlestep DPM-Solver does not support algorithm_type 'sde-dpmsolver'"
            )
        self.stochastic = kind.startswith("sde")
        self._data = kind.endswith("++")
        order = int(config["solver_order"])
        final_zero = config["final_sigmas_type"] == "zero" or self.sigmas[-1] == 0.0
        orders = singlestep_orders(self.n, order, config["lower_order_final"], final_zero)
        self.order = self._keep = order
        self._plan: dict[int, tuple[int, Coeffs]] = {}
        for k in range(t_start, self.n):
            o = min(orders[k], k - t_start + 1)  # as many outputs as this request has
            o = distinct_order(self.lambdas, k, o)
            self._plan[k] = (o, self._coefficients(kind, solver, k, o))
        self._base = np.zeros(0)  # the sample the current singlestep step restarts from
        self._finish_vp(t_start)

    def _coefficients(self, kind: str, solver: str, k: int, o: int) -> Coeffs:
        lam = self.lambdas
        cx, c0, c1, c2, cz = phi(kind, self.sigmas[k - o + 1], self.sigmas[k + 1])
        h = lam[k + 1] - lam[k - o + 1]
        if o == 1 or h == 0.0:
            return cx, [c0], cz
        if o == 2:  # base at s1; D0 = m1, D1 = (m0 - m1) / r0
            r0 = (lam[k] - lam[k - 1]) / h
            c_d1 = 0.5 * c0 if solver == "midpoint" else c1
            return cx, [c_d1 / r0, c0 - c_d1 / r0], cz
        r0, r1 = (lam[k] - lam[k - 2]) / h, (lam[k - 1] - lam[k - 2]) / h
        d0 = np.array([0.0, 0.0, 1.0])
        d1_0 = np.array([0.0, 1.0, -1.0]) / r1
        d1_1 = np.array([1.0, 0.0, -1.0]) / r0
        if solver == "midpoint":
            return cx, _weights([c0, c1], [d0, d1_1]), cz
        d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
        return cx, _weights([c0, c1, c2], [d0, d1, d2]), cz

    def _step(self, model_output: np.ndarray, k: int, x: np.ndarray) -> np.ndarray:
        o, coeffs = self._plan[k]
        self._convert(model_output, k, x, self._data)
        if o == 1:
            self._base = x
        return self._apply(coeffs, self._base)
