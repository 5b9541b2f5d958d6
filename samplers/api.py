"""The two public faces: :func:`stepper` (explicit per-request state, for services that batch
requests) and :func:`sample` (a convenience loop around one stepper)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .base import Stepper
from .config import CLASS_DEFAULTS, resolve_config
from .registry import SAMPLERS, SamplerInfo, resolve

#: options every sampler takes besides its config keys
_COMMON_OPTIONS = ("noise_fn",)


def _check_strength(strength: float) -> None:
    if (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float))
        or not 0 < strength <= 1
    ):
        raise ValueError(f"strength={strength!r} must be a number in (0, 1]")


def _img2img_start(steps: int, strength: float) -> int:
    """diffusers' StableDiffusionImg2ImgPipeline.get_timesteps: the step img2img starts at."""
    _check_strength(strength)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    if t_start >= steps:
        raise ValueError(
            f"strength={strength} with steps={steps} leaves no denoising step; "
            f"strength must be at least {1 / steps:.4g}"
        )
    return t_start


def _split_options(
    info: SamplerInfo, options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Options -> (config overrides, stepper params); refuses what this sampler does not take."""
    config_keys = set(CLASS_DEFAULTS[info.diffusers_class]) | set(info.extra_defaults)
    overrides: dict[str, Any] = {}
    params = dict(info.params)
    for key, value in options.items():
        target = key
        if key == "order":
            target = info.order_key or ("solver_order" if "solver_order" in info.fixed else key)
        if target in params:
            params[target] = value
        elif target in config_keys and target not in info.fixed:
            overrides[target] = value
        elif target in info.fixed:
            raise ValueError(
                f"{info.name} fixes {target}={info.fixed[target]!r}; pick another sampler name "
                f"(see `trt-sd samplers`) instead of setting {key}={value!r}"
            )
        else:
            allowed = sorted(
                {
                    *(k for k in config_keys if k not in info.fixed),
                    *params,
                    *(["order"] if info.order_key else []),
                    *_COMMON_OPTIONS,
                }
            )
            raise ValueError(
                f"option {key!r} is not known to sampler {info.name}; allowed: {', '.join(allowed)}"
            )
    return overrides, params


def stepper(
    name: str,
    scheduler_config: Mapping[str, Any] | None,
    steps: int,
    *,
    karras: bool | None = None,
    eta: float | None = None,
    rng: np.random.Generator | None = None,
    strength: float = 1.0,
    **options: Any,
) -> Stepper:
    """A fresh stepper for one request.

    name: a sampler name (``trt-sd samplers`` lists them; WebUI names work).
    scheduler_config: the checkpoint's scheduler_config.json as a dict (or None for the
        sampler class's defaults). Keys the sampler's diffusers class does not take are
        ignored, as ``from_config`` ignores them.
    steps: the number of denoising steps before img2img trimming (1..num_train_timesteps).
    karras: Karras sigmas (None: whatever the config / name says).
    eta: ancestral noise scale (ddim: default 0; euler-a, dpm2-a, dpm++2s-a: default 1;
        tcd: its gamma, default 0.3).
    rng: the noise source of stochastic samplers (default: a fresh ``default_rng()``).
    strength: img2img strength; the first ``steps - int(steps * strength)`` steps are skipped
        (lcm / tcd: all ``steps`` run, drawn from the lower ``strength`` of their grid).
    options: config keys of the sampler's class (``timestep_spacing``, ``final_sigmas_type``,
        ``use_exponential_sigmas``, ...), ``order`` where a sampler has one, and ``noise_fn``
        (``shape -> ndarray``, replaces ``rng`` draws; used to inject a known noise sequence).
    """
    canonical, implied = resolve(name)
    info = SAMPLERS[canonical]
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer")
    steps = int(steps)
    noise_fn = options.pop("noise_fn", None)
    if karras is not None:
        if implied.get("use_karras_sigmas") is not None and bool(karras) is False:
            raise ValueError(f"sampler name {name!r} asks for Karras sigmas but karras=False")
        implied["use_karras_sigmas"] = bool(karras)
    if eta is not None:
        if "eta" not in info.params:
            takers = [s.name for s in SAMPLERS.values() if "eta" in s.params]
            raise ValueError(f"eta applies only to {', '.join(takers)}; not to {info.name}")
        options["eta"] = float(eta)
    config_keys = set(CLASS_DEFAULTS[info.diffusers_class]) | set(info.extra_defaults)
    for key, value in implied.items():
        if key not in config_keys and value:
            takers = [
                s.name
                for s in SAMPLERS.values()
                if key in CLASS_DEFAULTS[s.diffusers_class] or key in s.extra_defaults
            ]
            raise ValueError(
                f"{key} is not available for {info.name}; samplers with it: {', '.join(takers)}"
            )
    options = {**{k: v for k, v in implied.items() if k in config_keys}, **options}
    overrides, params = _split_options(info, options)
    config = resolve_config(
        info.diffusers_class, scheduler_config, {**overrides, **info.fixed}, info.extra_defaults
    )
    if config.get("use_karras_sigmas") and config.get("use_exponential_sigmas"):
        raise ValueError("choose one of karras / use_exponential_sigmas, not both")
    if steps > config["num_train_timesteps"]:
        raise ValueError(
            f"steps={steps} is more than the schedule has (num_train_timesteps="
            f"{config['num_train_timesteps']})"
        )
    if info.strength_in_schedule:  # the sampler picks its timesteps from strength itself
        _check_strength(strength)
        t_start, params["strength"] = 0, float(strength)
    else:
        t_start = _img2img_start(steps, strength)
    try:
        st = info.stepper_cls(config, steps, t_start, rng=rng, noise_fn=noise_fn, **params)
    except IndexError:  # a spaced timestep past the table (e.g. leading + steps_offset)
        offset = int(config.get("steps_offset") or 0)
        if steps < config["num_train_timesteps"] - offset:
            raise  # the grid fits the table: this is a bug, not too many steps
        st = None
    if st is None or float(np.max(st.timesteps)) > config["num_train_timesteps"] - 1:
        raise ValueError(
            f"steps={steps} is too many for this schedule: its timesteps would pass the last "
            f"training timestep {config['num_train_timesteps'] - 1} (timestep_spacing="
            f"{config.get('timestep_spacing')!r}, steps_offset={config.get('steps_offset', 0)}); "
            "use fewer steps"
        )
    st.name = info.name
    return st


def sample(
    name: str,
    denoise_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    noise: np.ndarray,
    scheduler_config: Mapping[str, Any] | None,
    steps: int,
    *,
    init_latents: np.ndarray | None = None,
    **options: Any,
) -> np.ndarray:
    """Run a whole sampling loop and return the final latents.

    noise: standard-normal latents (unscaled), shape (batch, ...).
    denoise_fn(x_in, t): gets exactly what the UNet would (scaled input, a (batch,) array of
        the timestep) and returns the raw model output (eps / v / x0 per prediction_type).
    init_latents: clean latents for img2img (noised to the first remaining timestep);
        required when ``strength`` < 1.
    options: as :func:`stepper` (karras, eta, rng, strength, order, config keys, ...).
    """
    st = stepper(name, scheduler_config, steps, **options)
    noise = np.asarray(noise)
    if noise.ndim < 1:
        raise ValueError("noise must have a leading batch dimension")
    if init_latents is not None:
        x = st.add_noise(np.asarray(init_latents), noise)
    elif options.get("strength", 1.0) < 1.0:
        raise ValueError("strength < 1 needs init_latents (the latents of the input image)")
    else:
        x = st.prepare_noise(noise)
    for i, t in enumerate(st.timesteps):
        x_in = st.scale_model_input(x, i)
        out = denoise_fn(x_in, np.full((x.shape[0],), t, dtype=st.timesteps.dtype))
        x = st.step(np.asarray(out), i, x)
    return x
