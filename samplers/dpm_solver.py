"""DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2022b), multistep and singlestep,
as diffusers' ``DPMSolverMultistepScheduler`` / ``DPMSolverSinglestepScheduler`` run them.

All variants are exponential integrators in lambda = log(alpha_t / sigma_t): a step from s to
t is ``x_t = cx * x_s + c0 * D0 + c1 * D1 + c2 * D2 (+ cz * noise)``, where D0, D1, D2
estimate the model output (x0 for "++", eps otherwise) and its first two lambda-derivatives
times h, h^2 from earlier outputs. :func:`phi` gives the c's; the steppers only differ in how
they form D1 and D2. Each step's weights on the stored outputs are precomputed
(samplers/vp.py), so ``step`` is a few array passes.

Multistep third order: ``dpm++3m`` / ``dpm-solver-3m`` vs their ``-compat`` names
    With m(tau) expanded about lambda_s (tau = lambda - lambda_s, h = lambda_t - lambda_s),
    the data-prediction update is
        x_t = (sigma_t/sigma_s) x_s + alpha_t * integral_0^h e^(tau - h) m(tau) dtau
    and the tau^2/2 * m'' term integrates to alpha_t (h^2/2 - h + 1 - e^-h) * m''
    = c2 * (h^2 m''), with c2 = -alpha_t((e^-h - 1 + h)/h^2 - 1/2): D2 must estimate h^2 m''.
    (Noise prediction alike: x_t = (alpha_t/alpha_s) x_s - sigma_t * integral_0^h e^(h - tau)
    eps(tau) dtau, whose eps'' term is c2 * (h^2 eps'') with c2 = -sigma_t((e^h - 1 - h)/h^2
    - 1/2).) From outputs at tau = 0, -h0, -(h0 + h1) (r0 = h0/h, r1 = h1/h), the divided
    differences D1_0 = (m0 - m1)/r0 ~ h(m' - h0 m''/2) and D1_1 = (m1 - m2)/r1
    ~ h(m' - (h0 + h1/2) m'') give D1_0 - D1_1 ~ h^2 m'' (r0 + r1)/2, so h^2 m''
    ~ 2 (D1_0 - D1_1)/(r0 + r1). diffusers (like the reference code) uses D2 = (D1_0 - D1_1)
    /(r0 + r1), half of that, which leaves an O(h^3) error term and caps the method near order
    2 (measured: 1.84 for data, 2.19 for noise prediction; docs/quality.md); D1 = D1_0
    + r0/(r0+r1)(D1_0 - D1_1) ~ h m' is right either way.
    ``dpm++3m`` and ``dpm-solver-3m`` use the Taylor-consistent D2 (``d2_scale=2``, measured
    order 3.15 / 3.07), as does ``dpm-solver`` with ``order=3``. ``dpm++3m-compat``,
    ``dpm-solver-3m-compat``, ``dpm++`` (diffusers' class name) with ``order=3`` and
    ``dpm++3m-sde`` keep diffusers' update (``d2_scale=1``).
    diffusers also rounds a Karras grid's timesteps for the model while stepping with the
    unrounded sigmas, which caps the measurable order too; ``dpm++3m`` and ``dpm-solver-3m``
    therefore set ``exact_timesteps=True`` (samplers/vp.py). Every DPM-Solver and UniPC name
    accepts ``exact_timesteps=``; elsewhere the default (False) is diffusers' int64 timesteps.

Singlestep third order (``dpm++3s``, ``dpm-solver-3s``) has no such halving: its "heun" D2 =
2 (D1_1 - D1_0)/(r0 - r1) is Taylor-consistent, and its "midpoint" variant (D1 only, with the
phi_2 weight) is third order because its inner point sits near r = 2/3 of the step, which
cancels the h^2 m'' term (the reference DPM-Solver-3 places it there on purpose). Measured
with exact timesteps: 2.8-3.2 (docs/quality.md).

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
from typing import Any

import numpy as np

from .base import NoiseFn
from .sigmas import GridRule, log_snr, vp_coefficients
from .vp import Coeffs, VPSolverStepper, distinct_order

MULTISTEP_RULE = GridRule("solver", "table", round_karras="not_cosine")
SINGLESTEP_RULE = GridRule("singlestep", "table", round_karras=True)


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


def _weights(c_d: list[float], d_rows: list[np.ndarray]) -> list[float]:
    """Weights on (m0, m1, ...) of sum(c_d[j] * D_j) where D_j = d_rows[j] . (m0, m1, ...)."""
    total = np.zeros(len(d_rows[0]))
    for c, row in zip(c_d, d_rows, strict=True):
        total += c * row
    return [float(w) for w in total]


def _algorithm(config: dict[str, Any]) -> tuple[str, str]:
    """(algorithm_type, solver_type) with diffusers' renames of DEIS / UniPC configs."""
    algorithm = config["algorithm_type"]
    solver = config["solver_type"]
    solver = "midpoint" if solver in ("logrho", "bh1", "bh2") else solver
    if solver not in ("midpoint", "heun"):
        raise ValueError(f"solver_type={solver!r} is not supported; allowed: 'midpoint', 'heun'")
    return algorithm, solver


class DPMSolverMultistepStepper(VPSolverStepper):
    """Multistep DPM-Solver / DPM-Solver++ (2M, 3M, SDE variants), one model call per step.

    ``d2_scale``: 2 makes the third-order step Taylor-consistent (``dpm++3m``,
    ``dpm-solver-3m``); 1 is diffusers' update (the ``-compat`` names); see the module doc.
    """

    rule = MULTISTEP_RULE

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
        kind, solver = _algorithm(config)
        super().__init__(config, steps, rng, noise_fn, kind.endswith("++"), exact_timesteps)
        order = int(config["solver_order"])
        if kind == "sde-dpmsolver" and order == 3:
            raise ValueError("order=3 is not available for sde-dpmsolver; allowed: 1, 2")
        self.stochastic = kind.startswith("sde")
        self.order = self._keep = order
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
            o = distinct_order(self.lambdas, k, o)
            self._plan[k] = self._coefficients(kind, solver, k, o, d2_scale)
        self._steps = {k: self._compile(k, coeffs) for k, coeffs in self._plan.items()}
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
        history = self._push(model_output, k, x)
        combination, noisy = self._steps[k]
        return combination([x, *history, self._noise(x)] if noisy else [x, *history])


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


class DPMSolverSinglestepStepper(VPSolverStepper):
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
        exact_timesteps: bool = False,
    ) -> None:
        kind, solver = _algorithm(config)
        if kind == "sde-dpmsolver":
            raise ValueError(
                "singlestep DPM-Solver does not support algorithm_type 'sde-dpmsolver'"
            )
        super().__init__(config, steps, rng, noise_fn, kind.endswith("++"), exact_timesteps)
        self.stochastic = kind.startswith("sde")
        order = int(config["solver_order"])
        final_zero = config["final_sigmas_type"] == "zero" or self.sigmas[-1] == 0.0
        orders = singlestep_orders(self.n, order, config["lower_order_final"], final_zero)
        self.order = self._keep = order
        self._plan: dict[int, tuple[int, Coeffs]] = {}
        for k in range(t_start, self.n):
            o = min(orders[k], k - t_start + 1)  # as many outputs as this request has
            o = distinct_order(self.lambdas, k, o)
            self._plan[k] = (o, self._coefficients(kind, solver, k, o))
        self._steps = {k: self._compile(k, coeffs) for k, (_, coeffs) in self._plan.items()}
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
        history = self._push(model_output, k, x)
        if self._plan[k][0] == 1:
            self._base = x
        base, (combination, noisy) = self._base, self._steps[k]
        return combination([base, *history, self._noise(base)] if noisy else [base, *history])
