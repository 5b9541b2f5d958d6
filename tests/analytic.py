"""An analytic diffusion problem: a Gaussian mixture whose exact denoiser is known in closed form.

Why: a sampler's discretisation error can only be measured against a model that makes no error
of its own. For a Gaussian-mixture data distribution the posterior mean E[x0 | x_t] is a
closed-form expression, so `denoise_fn` below is the *exact* epsilon predictor for whatever
(scaled input, timestep) pair a sampler hands it, and the probability-flow ODE it defines can be
integrated to ~1e-12 with scipy. The only error left in a sampler's output is then its own
discretisation error, whose decay with the step count gives the empirical order.

Conventions (the same as diffusers and k-diffusion):
- VP forward process of a diffusers beta schedule: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
- k-diffusion variables: sigma = sqrt((1 - abar) / abar) and x~ = x_t / sqrt(abar)
  = x_t * sqrt(1 + sigma^2) = x0 + sigma * eps. The probability-flow ODE is
  dx~/dsigma = E[eps | x~] (the model's epsilon prediction).
- A (possibly fractional) timestep maps to sigma by linear interpolation of log(sigma) over the
  training timesteps 0..T-1. That is the inverse of diffusers' `_sigma_to_t`, so the model is
  exact for the continuous timesteps Karras-type grids hand out, and for integer timesteps it is
  exactly abar[t].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.integrate import solve_ivp

from trt_sd.models.scheduler_configs import sd15_scheduler_config

#: Stable Diffusion 1.5's scheduler_config.json (what users of SD 1.x checkpoints get).
SD15_SCHEDULER_CONFIG = sd15_scheduler_config()


@dataclass(frozen=True)
class VPSchedule:
    """A discrete training schedule, held as the log-sigmas of its timesteps 0..T-1.

    Why log-sigmas: a sampler maps a sigma to the timestep it hands the model by interpolating
    in this table, so the model is exact only if it inverts the *same* table. Build it with
    :meth:`from_log_sigmas` from the sampler library's own table (float32 values, as diffusers
    keeps them) when comparing against that library; :meth:`from_config` is a float64 stand-in.
    """

    log_sigmas: np.ndarray

    @classmethod
    def from_log_sigmas(cls, log_sigmas: np.ndarray) -> VPSchedule:
        return cls(np.asarray(log_sigmas, dtype=np.float64).copy())

    @classmethod
    def from_config(cls, config: dict) -> VPSchedule:
        n = int(config.get("num_train_timesteps", 1000))
        kind = config.get("beta_schedule", "linear")
        start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        if kind == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
        elif kind == "linear":
            betas = np.linspace(start, end, n, dtype=np.float64)
        else:
            raise ValueError(f"analytic problem supports linear/scaled_linear, not {kind!r}")
        abar = np.cumprod(1.0 - betas)
        return cls(0.5 * np.log((1.0 - abar) / abar))

    @property
    def sigma_min(self) -> float:
        return float(np.exp(self.log_sigmas[0]))

    @property
    def sigma_max(self) -> float:
        return float(np.exp(self.log_sigmas[-1]))

    def sigma_from_timestep(self, t: np.ndarray | float) -> np.ndarray:
        """Inverse of diffusers' `_sigma_to_t`: log-sigma interpolated linearly in t."""
        grid = np.arange(len(self.log_sigmas), dtype=np.float64)
        return np.exp(np.interp(np.asarray(t, dtype=np.float64), grid, self.log_sigmas))

    def timestep_from_sigma(self, sigma: np.ndarray | float) -> np.ndarray:
        """diffusers' `_sigma_to_t` (log sigma increases with t, so np.interp applies)."""
        grid = np.arange(len(self.log_sigmas), dtype=np.float64)
        return np.interp(np.log(np.asarray(sigma, dtype=np.float64)), self.log_sigmas, grid)


@dataclass(frozen=True)
class GaussianMixture:
    """Data distribution sum_k w_k N(mu_k, diag(s_k^2)) in d dimensions."""

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, d)
    stds: np.ndarray  # (K, d)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def _posterior(self, x_tilde: np.ndarray, sigma: np.ndarray | float):
        """Responsibilities (N, K) and per-component shrink factors s^2 / (s^2 + sigma^2)."""
        sigma2 = np.asarray(sigma, dtype=np.float64).reshape(-1, 1, 1) ** 2  # (N|1, 1, 1)
        var = self.stds[None] ** 2 + sigma2  # (N|1, K, d)
        diff = x_tilde[:, None, :] - self.means[None]  # (N, K, d)
        log_p = np.log(self.weights)[None] - 0.5 * np.sum(diff**2 / var + np.log(var), axis=-1)
        log_p -= log_p.max(axis=1, keepdims=True)
        resp = np.exp(log_p)
        resp /= resp.sum(axis=1, keepdims=True)
        return resp, diff, var

    def log_density(self, x_tilde: np.ndarray, sigma: float) -> np.ndarray:
        """log p_sigma(x_tilde) of the noised data x0 + sigma * eps, for x_tilde (N, d)."""
        var = self.stds[None] ** 2 + sigma**2
        diff = x_tilde[:, None, :] - self.means[None]
        log_p = np.log(self.weights)[None] - 0.5 * np.sum(
            diff**2 / var + np.log(2.0 * np.pi * var), axis=-1
        )
        top = log_p.max(axis=1)
        return top + np.log(np.exp(log_p - top[:, None]).sum(axis=1))

    def denoised(self, x_tilde: np.ndarray, sigma: np.ndarray | float) -> np.ndarray:
        """E[x0 | x0 + sigma * eps = x_tilde] for x_tilde of shape (N, d)."""
        resp, diff, var = self._posterior(x_tilde, sigma)
        shrink = self.stds[None] ** 2 / var
        return np.einsum("nk,nkd->nd", resp, self.means[None] + shrink * diff)

    def eps(self, x_tilde: np.ndarray, sigma: np.ndarray | float) -> np.ndarray:
        """E[eps | x_tilde] = (x_tilde - denoised) / sigma, written without dividing by sigma so
        it stays exact (and smooth) down to sigma = 0."""
        resp, diff, var = self._posterior(x_tilde, sigma)
        sig = np.asarray(sigma, dtype=np.float64).reshape(-1, 1, 1)
        return np.einsum("nk,nkd->nd", resp, sig * diff / var)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        comp = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.means[comp] + self.stds[comp] * rng.standard_normal((n, self.dim))


def default_mixture() -> GaussianMixture:
    """Three overlapping, anisotropic components in 3-D with roughly unit overall scale (like SD
    latents after the VAE scaling factor): curved ODE trajectories, no stiff corner cases."""
    return GaussianMixture(
        weights=np.array([0.5, 0.3, 0.2]),
        means=np.array([[-1.0, 0.5, 0.0], [1.0, -0.5, 0.6], [0.2, 1.2, -0.8]]),
        stds=np.array([[0.5, 0.35, 0.6], [0.4, 0.6, 0.3], [0.55, 0.3, 0.45]]),
    )


@dataclass
class ExactDenoiser:
    """`denoise_fn(x_in, t)` as a sampler calls the UNet: VP-scaled input, timestep array (N,).

    Returns the exact epsilon (or v) prediction. Records every call so a test can recover the
    initial value problem the sampler actually solves (its first call is at the initial state).
    """

    mixture: GaussianMixture
    schedule: VPSchedule
    prediction_type: str = "epsilon"
    calls: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def __call__(self, x_in: np.ndarray, t: np.ndarray) -> np.ndarray:
        x_in = np.asarray(x_in, dtype=np.float64)
        t = np.broadcast_to(np.asarray(t, dtype=np.float64), (x_in.shape[0],))
        self.calls.append((x_in.copy(), t.copy()))
        sigma = self.schedule.sigma_from_timestep(t)
        scale = np.sqrt(1.0 + sigma**2)[:, None]  # 1 / sqrt(abar)
        eps = self.mixture.eps(x_in * scale, sigma)
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            # v = sqrt(abar) eps - sqrt(1 - abar) x0, with x0 = x~ - sigma eps.
            x0 = x_in * scale - sigma[:, None] * eps
            return (eps - sigma[:, None] * x0) / scale
        raise ValueError(
            f"prediction_type must be epsilon or v_prediction, not {self.prediction_type!r}"
        )

    def _state(self, call: int) -> tuple[np.ndarray, float]:
        x_in, t = self.calls[call]
        if np.ptp(t) != 0:
            raise RuntimeError("a call mixed timesteps; expected one timestep per batch")
        sigma = float(self.schedule.sigma_from_timestep(t[0]))
        return x_in * np.sqrt(1.0 + sigma**2), sigma

    @property
    def start(self) -> tuple[np.ndarray, float]:
        """(x_tilde, sigma) of the first call: the sampler's initial state."""
        if not self.calls:
            raise RuntimeError("the denoiser has not been called yet")
        return self._state(0)

    @property
    def last(self) -> tuple[np.ndarray, float]:
        """(x_tilde, sigma) of the latest call. A final step to sigma = 0 returns the model's x0
        prediction at this state, ``mixture.denoised(*last)``."""
        if not self.calls:
            raise RuntimeError("the denoiser has not been called yet")
        return self._state(-1)


def solve_flow(
    mixture: GaussianMixture,
    x_tilde: np.ndarray,
    sigma_start: float,
    sigma_end: float,
    rtol: float = 1e-12,
    atol: float = 1e-12,
) -> np.ndarray:
    """Integrate the probability-flow ODE dx~/dsigma = eps(x~, sigma) from sigma_start to
    sigma_end (sigma_end may be 0) with DOP853, all samples as one system. Returns x~ at the end."""
    shape = x_tilde.shape

    def rhs(sigma: float, y: np.ndarray) -> np.ndarray:
        return mixture.eps(y.reshape(shape), sigma).ravel()

    sol = solve_ivp(
        rhs, (sigma_start, sigma_end), x_tilde.ravel(), method="DOP853", rtol=rtol, atol=atol
    )
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return sol.y[:, -1].reshape(shape)


def vp_from_tilde(x_tilde: np.ndarray, sigma: float) -> np.ndarray:
    """x_t = x~ / sqrt(1 + sigma^2): the VP-scaled sample a diffusers sampler returns."""
    return x_tilde / np.sqrt(1.0 + sigma**2)
