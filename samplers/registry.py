"""Sampler names: the canonical short names, the names Stable Diffusion WebUI / ComfyUI /
k-diffusion users type, and what each one means (diffusers class, fixed settings, order).

Lookup is case-, space-, ``-`` and ``_``-insensitive; a trailing "Karras" or "Exponential"
selects that sigma spacing ("DPM++ 2M Karras" -> ``dpm++2m`` with ``karras=True``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .base import Stepper
from .consistency import LCMStepper, TCDStepper
from .discrete import DDIMStepper, DDPMStepper, PNDMStepper
from .dpm_solver import DPMSolverMultistepStepper, DPMSolverSinglestepStepper
from .k_samplers import (
    DPM2AncestralStepper,
    DPM2Stepper,
    DPMpp2SAncestralStepper,
    EulerAncestralStepper,
    EulerStepper,
    HeunStepper,
    LMSStepper,
)
from .unipc import UniPCStepper

_MULTI = "DPMSolverMultistepScheduler"
_SINGLE = "DPMSolverSinglestepScheduler"
_NO_SPACING = {"use_karras_sigmas": False, "use_exponential_sigmas": False}


@dataclass(frozen=True)
class SamplerInfo:
    """One sampler name. ``fixed`` config keys define it and cannot be overridden; ``params``
    are stepper arguments (not config keys) with their defaults; ``order_key`` is what the
    ``order=`` option sets (a config key or a param), if anything."""

    name: str
    stepper_cls: Callable[..., Stepper]
    diffusers_class: str
    order: int
    calls_per_step: str
    stochastic: bool
    summary: str
    aliases: tuple[str, ...] = ()
    fixed: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    order_key: str | None = None
    extra_defaults: dict[str, Any] = field(default_factory=dict)
    #: img2img ``strength`` picks the timesteps (LCM / TCD) instead of trimming the call list
    strength_in_schedule: bool = False


def _dpm(
    name: str,
    algorithm: str,
    order: int | None,
    summary: str,
    aliases: tuple[str, ...] = (),
    singlestep: bool = False,
    **extra: Any,
) -> SamplerInfo:
    fixed: dict[str, Any] = {"algorithm_type": algorithm, **extra.pop("fixed", {})}
    params = {"exact_timesteps": False, **extra.pop("params", {})}
    if order is not None:
        fixed["solver_order"] = order
    return SamplerInfo(
        name=name,
        stepper_cls=DPMSolverSinglestepStepper if singlestep else DPMSolverMultistepStepper,
        diffusers_class=_SINGLE if singlestep else _MULTI,
        order=order or 2,
        calls_per_step="1",
        stochastic=algorithm.startswith("sde"),
        summary=summary,
        aliases=aliases,
        fixed=fixed,
        order_key=None if order is not None else "solver_order",
        params=params,
        **extra,
    )


def _k(
    name: str,
    cls: Callable[..., Stepper],
    diffusers_class: str,
    order: int,
    calls: str,
    stochastic: bool,
    summary: str,
    aliases: tuple[str, ...],
    **extra: Any,
) -> SamplerInfo:
    return SamplerInfo(
        name, cls, diffusers_class, order, calls, stochastic, summary, aliases, **extra
    )


_TWO = "2 (1 on the last)"
#: what makes a multistep third-order step measure order 3 (samplers/dpm_solver.py): the full
#: second-difference term, and the model evaluated at the very sigma the update assumes
_TRUE_D2 = 2.0
_TRUE_3M = {"d2_scale": _TRUE_D2, "exact_timesteps": True}
# fmt: off
SAMPLERS: dict[str, SamplerInfo] = {s.name: s for s in [
    # _k(name, stepper, diffusers class, order, calls per step, stochastic, summary, aliases)
    _k("ddpm", DDPMStepper, "DDPMScheduler", 1, "1", True,
       "DDPM ancestral sampling (needs many steps)", ("DDPM", "DDPMScheduler")),
    _k("ddim", DDIMStepper, "DDIMScheduler", 1, "1", False,
       "DDIM; eta>0 adds DDPM noise (stochastic)", ("DDIM", "DDIMScheduler"),
       params={"eta": 0.0}),
    _k("pndm", PNDMStepper, "PNDMScheduler", 4, "1 (+1 warm-up call)", False,
       "PNDM / PLMS (SD 1.x's default scheduler)", ("PLMS", "PNDMScheduler")),
    _k("euler", EulerStepper, "EulerDiscreteScheduler", 1, "1", False,
       "Euler on the probability-flow ODE", ("Euler", "k_euler", "EulerDiscreteScheduler")),
    _k("euler-a", EulerAncestralStepper, "EulerAncestralDiscreteScheduler", 1, "1", True,
       "Euler ancestral",
       ("Euler a", "k_euler_a", "euler_ancestral", "EulerAncestralDiscreteScheduler"),
       params={"eta": 1.0}, extra_defaults=_NO_SPACING),
    _k("heun", HeunStepper, "HeunDiscreteScheduler", 2, _TWO, False,
       "Heun's 2nd-order method (Karras et al.)", ("Heun", "k_heun", "HeunDiscreteScheduler")),
    _k("dpm2", DPM2Stepper, "KDPM2DiscreteScheduler", 2, _TWO, False,
       "DPM-Solver-2 in sigma (k-diffusion)", ("DPM2", "k_dpm_2", "KDPM2DiscreteScheduler")),
    _k("dpm2-a", DPM2AncestralStepper, "KDPM2AncestralDiscreteScheduler", 2, _TWO, True,
       "DPM2 ancestral",
       ("DPM2 a", "k_dpm_2_a", "dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler"),
       params={"eta": 1.0}),
    _k("lms", LMSStepper, "LMSDiscreteScheduler", 4, "1", False,
       "linear multistep in sigma (order= 1-4)", ("LMS", "k_lms", "LMSDiscreteScheduler"),
       params={"order": 4}, order_key="order"),
    _dpm("dpm-solver", "dpmsolver", None,
         "DPM-Solver multistep, noise prediction, as diffusers' class (order= 1-3; 3 = 3m-compat)",
         ("dpm-solver-2m",)),
    _dpm("dpm-solver-3m", "dpmsolver", 3,
         "DPM-Solver multistep 3rd order, Taylor-consistent 2nd difference",
         params=_TRUE_3M),
    _dpm("dpm-solver-3m-compat", "dpmsolver", 3,
         "DPM-Solver multistep 3rd order exactly as diffusers updates (measures ~2)"),
    _dpm("dpm-solver-2s", "dpmsolver", 2, "DPM-Solver singlestep 2nd order", singlestep=True),
    _dpm("dpm-solver-3s", "dpmsolver", 3, "DPM-Solver singlestep 3rd order", singlestep=True),
    _dpm("dpm++", "dpmsolver++", None,
         "DPM-Solver++ multistep as diffusers' class (order= 1-3, default 2 = 2M; 3 = 3m-compat)",
         ("DPMSolverMultistepScheduler",)),
    _dpm("dpm++2m", "dpmsolver++", 2, "DPM-Solver++(2M)", ("DPM++ 2M", "k_dpmpp_2m")),
    _dpm("dpm++3m", "dpmsolver++", 3, "DPM-Solver++(3M), Taylor-consistent 2nd difference",
         ("DPM++ 3M",), params=_TRUE_3M),
    _dpm("dpm++3m-compat", "dpmsolver++", 3,
         "DPM-Solver++(3M) exactly as diffusers updates (measures ~2)"),
    _dpm("dpm++2m-sde", "sde-dpmsolver++", 2, "DPM-Solver++(2M) SDE (midpoint)",
         ("DPM++ 2M SDE", "k_dpmpp_2m_sde"), fixed={"solver_type": "midpoint"}),
    _dpm("dpm++2m-sde-heun", "sde-dpmsolver++", 2, "DPM-Solver++(2M) SDE (heun)",
         ("DPM++ 2M SDE Heun",), fixed={"solver_type": "heun"}),
    _dpm("dpm++3m-sde", "sde-dpmsolver++", 3, "DPM-Solver++(3M) SDE (diffusers' update)",
         ("DPM++ 3M SDE", "k_dpmpp_3m_sde")),
    _dpm("dpm++2s", "dpmsolver++", 2, "DPM-Solver++ singlestep 2nd order",
         ("DPMSolverSinglestepScheduler",), singlestep=True),
    _dpm("dpm++3s", "dpmsolver++", 3, "DPM-Solver++ singlestep 3rd order", singlestep=True),
    _k("dpm++2s-a", DPMpp2SAncestralStepper, "KDPM2AncestralDiscreteScheduler", 2, _TWO, True,
       "DPM-Solver++(2S) ancestral (k-diffusion)",
       ("DPM++ 2S a", "k_dpmpp_2s_a", "dpmpp_2s_ancestral"), params={"eta": 1.0}),
    _k("unipc", UniPCStepper, "UniPCMultistepScheduler", 3, "1", False,
       "UniPC bh2: order-2 predictor + corrector (order= 1-3)",
       ("UniPC", "uni_pc", "UniPCMultistepScheduler"), order_key="solver_order",
       params={"exact_timesteps": False}),
    _k("lcm", LCMStepper, "LCMScheduler", 1, "1", True,
       "Latent Consistency Model sampling (LCM, LCM-LoRA; 1-8 steps, guidance 1-2)",
       ("LCM", "LCMScheduler"), strength_in_schedule=True),
    _k("tcd", TCDStepper, "TCDScheduler", 1, "1", True,
       "Trajectory Consistency Distillation (TCD-LoRA); eta = gamma (0 deterministic)",
       ("TCD", "TCDScheduler"), params={"eta": 0.3}, strength_in_schedule=True),
]}
# fmt: on

_SUFFIXES = {"karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}


def _key(name: str) -> str:
    """Normalise a name: lower case, no spaces / '-' / '_', k-diffusion spellings unified."""
    key = name.strip().lower()
    if key.startswith("k_"):
        key = key[2:]
    key = "".join(ch for ch in key if ch not in " -_")
    key = key.replace("dpmpp", "dpm++")
    if key.endswith("ancestral"):
        key = key[: -len("ancestral")] + "a"
    return key


_LOOKUP: dict[str, str] = {}
for _info in SAMPLERS.values():
    for _alias in (_info.name, *_info.aliases):
        _LOOKUP[_key(_alias)] = _info.name


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """``(canonical name, options implied by the name)``; ValueError with the closest match.

    >>> resolve("DPM++ 2M Karras")
    ('dpm++2m', {'use_karras_sigmas': True})
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"sampler name must be a non-empty string, got {name!r}")
    key, implied = _key(name), {}
    if key not in _LOOKUP:
        for suffix, options in _SUFFIXES.items():
            if key.endswith(suffix) and key[: -len(suffix)] in _LOOKUP:
                key, implied = key[: -len(suffix)], dict(options)
                break
    if key in _LOOKUP:
        return _LOOKUP[key], implied
    close = difflib.get_close_matches(key, list(_LOOKUP), n=1, cutoff=0.5)
    hint = f" (closest: {_LOOKUP[close[0]]!r})" if close else ""
    raise ValueError(
        f"unknown sampler {name!r}{hint}; valid names: {', '.join(SAMPLERS)} "
        "(WebUI names such as 'DPM++ 2M Karras' or 'Euler a' work too)"
    )


def describe_samplers() -> list[dict[str, Any]]:
    """One row per sampler for ``trt-sd samplers``: name, aliases, order, model calls per
    step, deterministic/stochastic, summary."""
    return [
        {
            "name": s.name,
            "aliases": [a for a in s.aliases if not a.endswith("Scheduler")],
            "diffusers_class": s.diffusers_class,
            "order": s.order,
            "calls_per_step": s.calls_per_step,
            "kind": "stochastic" if s.stochastic else "deterministic",
            "summary": s.summary,
        }
        for s in SAMPLERS.values()
    ]
