"""Scheduler configs resolved the way diffusers' ``SchedulerClass.from_config`` resolves them.

Why: a checkpoint's ``scheduler_config.json`` names one class (SD 1.5 says ``PNDMScheduler``)
but users pick any sampler. diffusers then keeps only the keys the chosen class accepts and
fills the rest with *that class's* defaults (Heun and KDPM2 default to ``beta_start=0.00085``,
DDIM to ``clip_sample=True``, ...). Matching those defaults key for key is what makes the same
config mean the same schedule here; ``tests/test_samplers_parity.py`` checks every table below
against diffusers' own ``__init__`` signatures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_BETAS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}
_THRESHOLD: dict[str, Any] = {
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
}
_SIGMA_SPACING: dict[str, Any] = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}
_FLOW: dict[str, Any] = {
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}
_SPACING: dict[str, Any] = {"timestep_spacing": "linspace", "steps_offset": 0}
_EPS = {"prediction_type": "epsilon"}
_K_BETAS = {**_BETAS, "beta_start": 0.00085, "beta_end": 0.012}

#: LCMScheduler and TCDScheduler take the same keys with the same defaults
_CONSISTENCY: dict[str, Any] = {
    **_K_BETAS,
    "beta_schedule": "scaled_linear",
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    **_EPS,
    **_THRESHOLD,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}

#: ``__init__`` defaults of each diffusers 0.42.1 scheduler class (all keys).
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": {
        **_BETAS,
        "variance_type": "fixed_small",
        "clip_sample": True,
        **_EPS,
        **_THRESHOLD,
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    },
    "DDIMScheduler": {
        **_BETAS,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        **_EPS,
        **_THRESHOLD,
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    },
    "PNDMScheduler": {
        **_BETAS,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        **_EPS,
        "timestep_spacing": "leading",
        "steps_offset": 0,
    },
    "EulerDiscreteScheduler": {
        **_BETAS,
        **_EPS,
        "interpolation_type": "linear",
        **_SIGMA_SPACING,
        "sigma_min": None,
        "sigma_max": None,
        **_SPACING,
        "timestep_type": "discrete",
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": {
        **_BETAS,
        **_EPS,
        **_SPACING,
        "rescale_betas_zero_snr": False,
    },
    "HeunDiscreteScheduler": {
        **_K_BETAS,
        **_EPS,
        **_SIGMA_SPACING,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        **_SPACING,
    },
    "KDPM2DiscreteScheduler": {**_K_BETAS, **_SIGMA_SPACING, **_EPS, **_SPACING},
    "KDPM2AncestralDiscreteScheduler": {**_K_BETAS, **_SIGMA_SPACING, **_EPS, **_SPACING},
    "LMSDiscreteScheduler": {**_BETAS, **_SIGMA_SPACING, **_EPS, **_SPACING},
    "DPMSolverMultistepScheduler": {
        **_BETAS,
        "solver_order": 2,
        **_EPS,
        **_THRESHOLD,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        **_SIGMA_SPACING,
        "use_lu_lambdas": False,
        **_FLOW,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        **_SPACING,
        "rescale_betas_zero_snr": False,
    },
    "DPMSolverSinglestepScheduler": {
        **_BETAS,
        "solver_order": 2,
        **_EPS,
        **_THRESHOLD,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": False,
        **_SIGMA_SPACING,
        **_FLOW,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
    },
    "LCMScheduler": _CONSISTENCY,
    "TCDScheduler": _CONSISTENCY,
    "UniPCMultistepScheduler": {
        **_BETAS,
        "solver_order": 2,
        **_EPS,
        **_THRESHOLD,
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": [],
        "solver_p": None,
        **_SIGMA_SPACING,
        **_FLOW,
        **_SPACING,
        "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False,
        "sigma_min": None,
        "sigma_max": None,
        "shift_terminal": None,
    },
}

#: Values this library implements, per key; anything else is refused with a ValueError.
ALLOWED: dict[str, tuple[Any, ...]] = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "final_sigmas_type": ("zero", "sigma_min"),
    "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large"),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete", "continuous"),
    "algorithm_type": ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"),
    "use_beta_sigmas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "solver_p": (None,),
    "shift_terminal": (None,),
}


def resolve_config(
    class_name: str,
    scheduler_config: Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None = None,
    extra_defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config ``class_name.from_config(scheduler_config)`` would see, plus ``overrides``.

    Keys the class does not take are dropped (``_class_name``, ``skip_prk_steps`` for Euler,
    ...), as are keys listed in ``_use_default_values``. ``extra_defaults`` are keys this
    library adds to a class (e.g. Karras sigmas for Euler ancestral); they come only from
    ``overrides``, never from the file, so a config keeps meaning what it means in diffusers.
    """
    if scheduler_config is not None and not isinstance(scheduler_config, Mapping):
        raise ValueError(
            f"scheduler_config must be a dict (a scheduler_config.json), got "
            f"{type(scheduler_config).__name__}"
        )
    source = dict(scheduler_config or {})
    use_defaults = set(source.pop("_use_default_values", None) or ())
    resolved = dict(CLASS_DEFAULTS[class_name])
    for key, value in source.items():
        if key in resolved and key not in use_defaults:
            resolved[key] = value
    resolved.update(extra_defaults or {})
    resolved.update(overrides or {})
    validate(resolved)
    return resolved


def validate(config: Mapping[str, Any]) -> None:
    """Refuse values this library does not implement, naming the key and what is allowed."""
    for key, allowed in ALLOWED.items():
        if key in config and config[key] not in allowed:
            shown = ", ".join(repr(a) for a in allowed)
            raise ValueError(
                f"scheduler config {key}={config[key]!r} is not supported; allowed: {shown}"
            )
    if config.get("trained_betas") is None:
        for key in ("beta_start", "beta_end"):
            value = config.get(key)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"scheduler config {key}={value!r} must be a number in [0, 1)")
    steps = config.get("num_train_timesteps")
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"scheduler config num_train_timesteps={steps!r} must be an integer >= 2")
    order = config.get("solver_order")
    if order is not None and order not in (1, 2, 3):
        raise ValueError(f"order={order!r} is not supported; allowed: 1, 2, 3")
