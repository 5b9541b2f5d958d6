"""Few-step samplers of consistency-distilled models: LCM (diffusers' ``LCMScheduler``) and
TCD (``TCDScheduler``), step for step as diffusers 0.42.1.

Both draw their timesteps from the distillation grid, not from ``timestep_spacing`` (which
they accept and ignore, as diffusers does): ``original_inference_steps`` (default 50) points
``k - 1, 2k - 1, ...`` with ``k = T // original_inference_steps``, cut to the first
``int(original_inference_steps * strength)`` for img2img, then ``steps`` of them picked evenly
by index from the top. img2img therefore keeps all ``steps`` model calls and starts lower on
the grid (the LCM img2img pipeline never trims by ``strength`` a second time); ``strength`` is
handed to these steppers instead of the usual call-list trim (see ``api.stepper``).

Every step is ``c_x0 * x0 + c_x * x (+ std * noise)`` with ``x0`` the model's predicted clean
latents, so both share :class:`_ConsistencyStepper`; only the coefficients differ:

- LCM: the consistency function ``denoised = c_out * x0 + c_skip * x`` (boundary-condition
  scalings at ``timestep * timestep_scaling``, sigma_data 0.5), then re-noised to the next
  timestep with fresh noise, except after the last call, which returns ``denoised``.
- TCD: ``x0`` and the implied noise taken to the intermediate ``s = floor((1 - eta) * t_next)``
  (``eta`` is the paper's gamma, diffusers' default 0.3), then forward-noised from ``s`` to
  ``t_next``. ``eta = 0`` is deterministic (DDIM-like); the last call returns the sample at
  ``s``. diffusers' ``set_timesteps(original_inference_steps=...)`` argument switches TCD to
  a grid over all training timesteps; the config key (the pipelines' path) is what we follow.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import NoiseFn, Stepper, clip_x0, combine, needs_clip, vp_x0
from .schedules import alphas_cumprod

#: the consistency models' sigma_data (diffusers and the LCM paper)
SIGMA_DATA = 0.5


def consistency_timesteps(config: dict[str, Any], steps: int, strength: float) -> np.ndarray:
    """diffusers' LCM/TCD ``set_timesteps`` without custom timesteps: int64, descending."""
    train = int(config["num_train_timesteps"])
    original = config["original_inference_steps"]
    if isinstance(original, bool) or not isinstance(original, int) or not 0 < original <= train:
        raise ValueError(
            f"original_inference_steps={original!r} must be an integer in 1..{train} "
            "(num_train_timesteps)"
        )
    if steps > original:
        raise ValueError(
            f"steps={steps} is more than original_inference_steps={original}: the timesteps "
            "are a subset of that distillation grid; use fewer steps or raise it"
        )
    usable = int(original * strength)
    if usable < steps:
        raise ValueError(
            f"strength={strength} leaves {usable} of the {original} distillation timesteps, "
            f"fewer than steps={steps}; use at most {usable} steps or a higher strength"
        )
    origin = (np.arange(1, usable + 1, dtype=np.int64) * (train // original) - 1)[::-1]
    picks = np.floor(np.linspace(0, usable, num=steps, endpoint=False)).astype(np.int64)
    return origin[picks]


class _ConsistencyStepper(Stepper):
    """Shared set-up and step: subclasses fill ``self._plan`` with, per call,
    ``((a, b), c_x0, c_x, std)``: x0 = a * x + b * model_output, then
    x_next = c_x0 * x0 + c_x * x + std * noise."""

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None,
        noise_fn: NoiseFn | None,
        strength: float,
    ) -> None:
        super().__init__(config, rng, noise_fn)
        if t_start:
            raise ValueError("internal error: consistency samplers take strength, not t_start")
        self.abar = alphas_cumprod(config).astype(np.float64)
        self.final_abar = 1.0 if config["set_alpha_to_one"] else float(self.abar[0])
        ts = consistency_timesteps(config, steps, strength)
        self._plan: list[tuple[tuple[float, float], float, float, float]] = []
        self._clip = False
        for k, t in enumerate(ts):
            a_t = float(self.abar[t])
            x0 = vp_x0(config["prediction_type"], a_t**0.5, (1.0 - a_t) ** 0.5)
            nxt = int(ts[k + 1]) if k + 1 < ts.size else None
            self._plan.append((x0, *self._coefficients(int(t), nxt, a_t)))
        self._finish(ts, np.ones(ts.size), 0, 1.0)

    def _abar(self, t: int) -> float:
        return float(self.abar[t]) if t >= 0 else self.final_abar

    def _coefficients(self, t: int, nxt: int | None, a_t: float) -> tuple[float, float, float]:
        """(c_x0, c_x, std) of the call at timestep ``t``; ``nxt`` None on the last call."""
        raise NotImplementedError

    def _noise_scales(self, i: int = 0) -> tuple[float, float]:
        a = self.abar[int(self.timesteps[i])]
        return float(np.sqrt(a)), float(np.sqrt(1.0 - a))

    def _step(self, model_output: np.ndarray, k: int, x: np.ndarray) -> np.ndarray:
        (a, b), c_x0, c_x, std = self._plan[k]
        if self._clip:
            x0 = clip_x0(combine([(a, x), (b, model_output)], x.dtype), self.config)
            terms = [(c_x0, x0), (c_x, x)]
        else:  # linear in (x, model_output): fold the x0 terms
            terms = [(c_x0 * a + c_x, x), (c_x0 * b, model_output)]
        if std > 0.0:
            terms.append((std, self._noise(x)))
        return combine(terms, x.dtype)


class LCMStepper(_ConsistencyStepper):
    """Luo et al. (2023) Latent Consistency Models, diffusers' ``LCMScheduler``: multistep
    consistency sampling (1-8 steps; LCM-LoRA with guidance 1-2)."""

    stochastic = True

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
        strength: float = 1.0,
    ) -> None:
        super().__init__(config, steps, t_start, rng, noise_fn, strength)
        self._clip = needs_clip(config)
        self.stochastic = steps > 1

    def _coefficients(self, t: int, nxt: int | None, a_t: float) -> tuple[float, float, float]:
        scaled = t * float(self.config["timestep_scaling"])
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        if nxt is None:  # the last call returns the consistency function's output
            return c_out, c_skip, 0.0
        a_next = self._abar(nxt)
        return a_next**0.5 * c_out, a_next**0.5 * c_skip, (1.0 - a_next) ** 0.5


class TCDStepper(_ConsistencyStepper):
    """Zheng et al. (2024) Trajectory Consistency Distillation, diffusers' ``TCDScheduler``
    (strategic stochastic sampling; ``eta`` is the paper's gamma)."""

    def __init__(
        self,
        config: dict[str, Any],
        steps: int,
        t_start: int,
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
        strength: float = 1.0,
        eta: float = 0.3,
    ) -> None:
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta={eta!r} (TCD's gamma) must be a number in [0, 1]")
        self.eta = float(eta)
        super().__init__(config, steps, t_start, rng, noise_fn, strength)
        self.stochastic = self.eta > 0.0 and steps > 1

    def _coefficients(self, t: int, nxt: int | None, a_t: float) -> tuple[float, float, float]:
        t_next = 0 if nxt is None else nxt
        # diffusers: torch.floor((1 - eta) * prev_timestep) on an int64 tensor, in float32
        s = int(np.floor(np.float32(1.0 - self.eta) * np.float32(t_next)))
        a_s = float(self.abar[s])
        # the sample at s: sqrt(a_s) x0 + sqrt(1 - a_s) eps with eps = (x - sqrt(a_t) x0) / sigma_t
        to_s = (1.0 - a_s) ** 0.5 / (1.0 - a_t) ** 0.5
        c_x0, c_x = a_s**0.5 - to_s * a_t**0.5, to_s
        if self.eta == 0.0 or nxt is None:
            return c_x0, c_x, 0.0
        ratio = self._abar(t_next) / a_s  # forward-noise from s back up to t_next
        return ratio**0.5 * c_x0, ratio**0.5 * c_x, (1.0 - ratio) ** 0.5


def guidance_scale_embedding(guidance: np.ndarray | float, dim: int, rows: int = 1) -> np.ndarray:
    """The ``timestep_cond`` input of LCM-distilled UNets (``time_cond_proj_dim`` = ``dim``):
    diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` of
    ``w = guidance - 1``, float32 (rows, dim). Such UNets take guidance as this input and run
    without a CFG batch; LCM-LoRA UNets have no such input (guidance 1-2, plain CFG rule).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim={dim!r} must be an integer >= 2 (the UNet's time_cond_proj_dim)")
    w = np.broadcast_to(np.asarray(guidance, dtype=np.float32) - np.float32(1.0), (rows,))
    half = dim // 2
    # in float32 step for step as torch: log(10000) / (half - 1), exp(-k * that), w * 1000
    scale = np.float32(np.log(np.float32(10000.0))) / np.float32(max(half - 1, 1))
    # (exp in float64, then rounded: closer to torch's float32 exp than NumPy's float32 one)
    freqs = np.exp((np.arange(half, dtype=np.float32) * -scale).astype(np.float64))
    freqs = freqs.astype(np.float32)
    arg = ((w * np.float32(1000.0))[:, None] * freqs[None, :]).astype(np.float64)
    # sin / cos of arguments up to ~7000 rad: NumPy's float32 routines lose digits there
    emb = np.concatenate([np.sin(arg), np.cos(arg)], axis=1).astype(np.float32)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32, copy=False)
