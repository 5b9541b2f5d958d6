"""UniPC (Zhao et al. 2023), diffusers' ``UniPCMultistepScheduler``: a multistep predictor
(UniP) plus a corrector (UniC) that refines the previous step with the model output just
computed, so it gains an order without extra model calls.

Both are linear in the stored outputs, so each step's weights (the rho vectors solved from
the B(h) conditions) are precomputed (samplers/vp.py); ``step`` corrects x, then predicts the
next x. ``exact_timesteps=True`` hands the model unrounded Karras timesteps (see vp.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import NoiseFn
from .dpm_solver import phi
from .sigmas import GridRule, vp_coefficients
from .vp import Coeffs, VPSolverStepper, distinct_order

UNIPC_RULE = GridRule("solver", "table", round_karras=True, sigma_min_final="grid")


def _rhs(hh: float, order: int, solver_type: str) -> tuple[float, float, np.ndarray]:
    """(phi_1 = expm1(hh), B(h), b) with b_i = i! * phi_(i+1)(hh) / B(h) (the UniPC paper's
    order conditions); ``hh`` is -h for data prediction, +h for noise prediction."""
    h_phi_1 = math.expm1(hh)
    b_h = hh if solver_type == "bh1" else h_phi_1
    if (
        not math.isfinite(hh) or hh == 0.0
    ):  # final step to sigma 0: only the first-order term survives
        return h_phi_1, b_h, np.zeros(order)
    h_phi_k, factorial, b = h_phi_1 / hh - 1.0, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, np.array(b)


class UniPCStepper(VPSolverStepper):
    """UniPC with bh1 / bh2 B(h), data (``predict_x0``) or noise prediction."""

    rule = UNIPC_RULE

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
        exact_timesteps: bool = False,
    ) -> None:
        super().__init__(config, steps, rng, noise_fn, bool(config["predict_x0"]), exact_timesteps)
        solver = config["solver_type"]
        solver = "bh2" if solver in ("midpoint", "heun", "logrho") else solver
        if solver not in ("bh1", "bh2"):
            raise ValueError(
                f"solver_type={solver!r} is not supported by unipc; allowed: 'bh1', 'bh2'"
            )
        self.order = int(config["solver_order"])
        self._keep = self.order + 1  # the corrector also needs the output before the oldest
        skip = {int(i) for i in (config.get("disable_corrector") or ())}
        self._predict: dict[int, Coeffs] = {}
        self._correct: dict[int, Coeffs | None] = {}
        prev_order = 0
        for k in range(t_start, self.n):
            corrector = k > t_start and (k - 1) not in skip
            if corrector:  # the corrector's outputs sit at k, k-1, ..., k-prev_order
                prev_order = distinct_order(self.lambdas, k - 1, prev_order)
                corrector = self.lambdas[k] != self.lambdas[k - 1]
            self._correct[k] = self._corrector(k, prev_order, solver) if corrector else None
            o = min(self.order, self.n - k) if config["lower_order_final"] else self.order
            o = distinct_order(self.lambdas, k, min(o, k - t_start + 1))
            if self.sigmas[k + 1] == 0.0:
                o = 1
            self._predict[k] = self._predictor(k, o, solver)
            prev_order = o
        self._predict_steps = {k: self._compile(k, c)[0] for k, c in self._predict.items()}
        self._correct_steps = {
            k: self._compile(k, c)[0] for k, c in self._correct.items() if c is not None
        }
        self._last: np.ndarray | None = None
        self._finish_vp(t_start)

    def _rks(self, s0: int, count: int, h: float) -> np.ndarray:
        return np.array([(self.lambdas[s0 - i] - self.lambdas[s0]) / h for i in range(1, count)])

    def _step_weights(
        self, s0: int, t: int, order: int, rhos: np.ndarray, solver: str, extra: int
    ) -> Coeffs:
        """Weights of x_t = cx x + c0 m0 - c_out B(h) sum(rho_i D1_i), D1_i = (m_(s0-i) - m0)/r_i,
        over the outputs (m_s0, m_s0-1, ...); ``extra`` = 1 prepends the corrector's new output.
        c0 is DPM-Solver's first-order weight (-c_out * phi_1), finite also at sigma_t = 0."""
        cx, c0, _, _, _ = phi(
            "dpmsolver++" if self._data else "dpmsolver", self.sigmas[s0], self.sigmas[t]
        )
        h = self.lambdas[t] - self.lambdas[s0]
        weights = np.zeros(order + extra)
        weights[extra] = c0
        if math.isfinite(h) and h != 0.0 and len(rhos):
            _, b_h, _ = _rhs(-h if self._data else h, order, solver)
            scale = -self._c_out(t) * b_h
            for i, (rho, rk) in enumerate(
                zip(rhos, self._rks(s0, order, h), strict=False), start=1
            ):
                weights[extra + i] += scale * rho / rk
                weights[extra] -= scale * rho / rk
        return cx, [float(w) for w in weights], 0.0

    def _c_out(self, t: int) -> float:
        """alpha_t for data prediction, sigma_t for noise prediction."""
        alpha, sigma_t = vp_coefficients(self.sigmas[t])
        return alpha if self._data else sigma_t

    def _predictor(self, k: int, order: int, solver: str) -> Coeffs:
        h = self.lambdas[k + 1] - self.lambdas[k]
        hh = -h if self._data else h
        _, _, b = _rhs(hh, order, solver)
        if order <= 1 or h == 0.0 or not math.isfinite(h):
            rhos = np.zeros(0)
        elif order == 2:
            rhos = np.array([0.5])
        else:
            rks = np.append(self._rks(k, order, h), 1.0)
            vander = np.vstack([rks**i for i in range(order)])
            rhos = np.linalg.solve(vander[:-1, :-1], b[:-1])
        return self._step_weights(k, k + 1, order, rhos, solver, extra=0)

    def _corrector(self, k: int, order: int, solver: str) -> Coeffs:
        """Re-do the step s0 = k-1 -> k with the new output m_k as the last D1 (r = 1)."""
        h = self.lambdas[k] - self.lambdas[k - 1]
        hh = -h if self._data else h
        _, b_h, b = _rhs(hh, order, solver)
        if order == 1:
            rhos = np.array([0.5])
        else:
            rks = np.append(self._rks(k - 1, order, h), 1.0)
            rhos = np.linalg.solve(np.vstack([rks**i for i in range(order)]), b)
        cx, weights, _ = self._step_weights(k - 1, k, order, rhos[:-1], solver, extra=1)
        # + rho_c[-1] * (m_k - m_(k-1)) inside the B(h) bracket
        last = -self._c_out(k) * b_h * float(rhos[-1])
        weights[0] += last
        weights[1] -= last
        return cx, weights, 0.0

    def _step(self, model_output: np.ndarray, k: int, x: np.ndarray) -> np.ndarray:
        history = self._push(model_output, k, x)
        corrector = self._correct_steps.get(k)
        if corrector is not None and self._last is not None:
            x = corrector([self._last, *history])
        self._last = x
        return self._predict_steps[k]([x, *history])
