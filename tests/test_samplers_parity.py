"""trt_sd.samplers vs diffusers 0.42.1, step for step.

Every sampler runs with the same smooth dummy denoiser and the same noise (stochastic
samplers: diffusers' ``randn_tensor`` is patched to hand out the sequence our ``noise_fn``
gets) and must give the same model timesteps and the same final latents to 1e-5 (relative to
the largest magnitude). Where diffusers raises, returns NaN or trims img2img oddly, the test
pins the behaviour we chose instead (see the sampler modules' docstrings).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from trt_sd.models.scheduler_configs import sd15_scheduler_config
from trt_sd.samplers import stepper
from trt_sd.samplers.config import CLASS_DEFAULTS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD15 = sd15_scheduler_config()
SD21V = {  # stabilityai/stable-diffusion-2-1 (v-prediction) with trailing spacing
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}
ZSNR = {**SD21V, "rescale_betas_zero_snr": True}
LINEAR = {
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "timestep_spacing": "linspace",
}
COSINE = {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "leading", "steps_offset": 1}
CONFIGS = {"sd15": SD15, "sd21v": SD21V, "linear": LINEAR, "cosine": COSINE}

SHAPE = (1, 4, 8, 8)
_W = np.random.default_rng(7).standard_normal((4, 4)).astype(np.float32) * 0.6


def denoiser(x_in: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Smooth, deterministic, t-dependent: a fixed channel mix through tanh."""
    scale = (0.3 + np.asarray(t, dtype=np.float32) / 1000.0).reshape(-1, 1, 1, 1)
    mixed = np.einsum("ij,bjhw->bihw", _W, x_in.astype(np.float32))
    return (np.tanh(mixed) * scale + 0.1 * x_in).astype(np.float32)


@dataclass
class Case:
    name: str
    cls: str
    dkw: dict[str, Any] = field(default_factory=dict)
    okw: dict[str, Any] = field(default_factory=dict)
    step_kw: dict[str, Any] = field(default_factory=dict)
    karras: bool = True  # the diffusers class has use_karras_sigmas

    def __str__(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.okw.items())
        return f"{self.name}[{extra}]" if extra else self.name


SIGMA_MIN = {"final_sigmas_type": "sigma_min"}
CASES = [
    Case("ddpm", "DDPMScheduler", karras=False),
    Case("ddim", "DDIMScheduler", karras=False),
    Case("ddim", "DDIMScheduler", okw={"eta": 0.7}, step_kw={"eta": 0.7}, karras=False),
    Case("pndm", "PNDMScheduler", karras=False),
    Case(
        "pndm",
        "PNDMScheduler",
        dkw={"skip_prk_steps": False},
        okw={"skip_prk_steps": False},
        karras=False,
    ),
    Case("euler", "EulerDiscreteScheduler"),
    Case("euler-a", "EulerAncestralDiscreteScheduler", karras=False),
    Case("heun", "HeunDiscreteScheduler"),
    Case("dpm2", "KDPM2DiscreteScheduler"),
    Case("dpm2-a", "KDPM2AncestralDiscreteScheduler"),
    Case("lms", "LMSDiscreteScheduler"),
    *[
        Case("dpm++", "DPMSolverMultistepScheduler", {"solver_order": o}, {"order": o})
        for o in (1, 2, 3)
    ],
    Case(
        "dpm++2m", "DPMSolverMultistepScheduler", {"solver_type": "heun"}, {"solver_type": "heun"}
    ),
    Case("dpm++3m-compat", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    *[
        Case(
            "dpm-solver",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver", "solver_order": o, **SIGMA_MIN},
            {"order": o, **SIGMA_MIN},
        )
        for o in (1, 2, 3)
    ],
    # the true third-order step is dpm-solver-3m's (samplers/dpm_solver.py); the names that
    # follow diffusers' class (dpm-solver, dpm++) keep its update, as -3m-compat does
    Case(
        "dpm-solver-3m-compat",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver", "solver_order": 3, **SIGMA_MIN},
        SIGMA_MIN,
    ),
    Case("dpm++2m-sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    Case(
        "dpm++2m-sde-heun",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
    ),
    Case(
        "dpm++3m-sde",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    ),
    Case("dpm++2s", "DPMSolverSinglestepScheduler"),
    Case("dpm++3s", "DPMSolverSinglestepScheduler", {"solver_order": 3}),
    Case(
        "dpm++3s",
        "DPMSolverSinglestepScheduler",
        {"solver_order": 3, "solver_type": "heun"},
        {"solver_type": "heun"},
    ),
    Case(
        "dpm-solver-2s",
        "DPMSolverSinglestepScheduler",
        {"algorithm_type": "dpmsolver", **SIGMA_MIN},
        SIGMA_MIN,
    ),
    Case(
        "dpm-solver-3s",
        "DPMSolverSinglestepScheduler",
        {"algorithm_type": "dpmsolver", "solver_order": 3, **SIGMA_MIN},
        SIGMA_MIN,
    ),
    *[
        Case("unipc", "UniPCMultistepScheduler", {"solver_order": o}, {"order": o})
        for o in (1, 2, 3)
    ],
    Case(
        "unipc",
        "UniPCMultistepScheduler",
        {"solver_type": "bh1", **SIGMA_MIN},
        {"solver_type": "bh1", **SIGMA_MIN},
    ),
    Case(
        "unipc",
        "UniPCMultistepScheduler",
        {"predict_x0": False, **SIGMA_MIN},
        {"predict_x0": False, **SIGMA_MIN},
    ),
]


def _both(
    name: str, cls: str, karras: bool = True, diffusers_only: dict | None = None, **settings: Any
) -> Case:
    """A case whose config settings go to both libraries alike (``diffusers_only``: what
    our sampler name already implies, e.g. its algorithm_type)."""
    return Case(name, cls, {**settings, **(diffusers_only or {})}, dict(settings), karras=karras)


THRESHOLD = {"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9}
CASES += [  # config settings beyond the defaults
    _both("ddpm", "DDPMScheduler", False, variance_type="fixed_large"),
    _both("ddim", "DDIMScheduler", False, clip_sample=True, clip_sample_range=1.5),
    _both("ddim", "DDIMScheduler", False, set_alpha_to_one=True, **THRESHOLD),
    _both("euler", "EulerDiscreteScheduler", **SIGMA_MIN),
    _both("euler", "EulerDiscreteScheduler", timestep_type="continuous"),
    _both("heun", "HeunDiscreteScheduler", clip_sample=True, clip_sample_range=1.5),
    _both("dpm++2m", "DPMSolverMultistepScheduler", **THRESHOLD),
    _both("dpm++2m", "DPMSolverMultistepScheduler", euler_at_final=True, lambda_min_clipped=-5.1),
    _both("dpm++2m", "DPMSolverMultistepScheduler", False, use_lu_lambdas=True),
    _both(
        "dpm-solver",
        "DPMSolverMultistepScheduler",
        True,
        {"algorithm_type": "dpmsolver"},
        **THRESHOLD,
        **SIGMA_MIN,
    ),
    _both("unipc", "UniPCMultistepScheduler", disable_corrector=[0, 2], **THRESHOLD),
]

_NOISE_MODULES = [
    "scheduling_ddpm",
    "scheduling_ddim",
    "scheduling_euler_ancestral_discrete",
    "scheduling_k_dpm_2_ancestral_discrete",
    "scheduling_dpmsolver_multistep",
    "scheduling_dpmsolver_singlestep",
]


def noise_sequence(n: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(n)]


def run_ours(
    case: Case,
    config: dict,
    steps: int,
    *,
    strength: float = 1.0,
    karras: bool = False,
    x0: np.ndarray | None = None,
    **extra: Any,
):
    seq = iter(noise_sequence())
    st = stepper(
        case.name,
        config,
        steps,
        karras=karras or None,
        strength=strength,
        noise_fn=lambda shape: next(seq),
        **case.okw,
        **extra,
    )
    noise = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    x = st.prepare_noise(noise) if x0 is None else st.add_noise(x0, noise)
    for i, t in enumerate(st.timesteps):
        out = denoiser(st.scale_model_input(x, i), np.full(SHAPE[0], t))
        x = st.step(out, i, x)
    return st.timesteps, x


def run_diffusers(
    case: Case,
    config: dict,
    steps: int,
    monkeypatch,
    *,
    strength: float = 1.0,
    karras: bool = False,
    x0: np.ndarray | None = None,
    begin_index: bool = False,
    **extra: Any,
):
    seq = iter(noise_sequence())

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(next(seq)).to(dtype or torch.float32)

    for module in _NOISE_MODULES:
        monkeypatch.setattr(f"diffusers.schedulers.{module}.randn_tensor", fake_randn)
    kwargs = {**case.dkw, **extra, **({"use_karras_sigmas": True} if karras else {})}
    sched = getattr(diffusers, case.cls).from_config(config, **kwargs)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    noise = torch.from_numpy(np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32))
    if x0 is None:
        x = noise * sched.init_noise_sigma
        if begin_index:
            sched.set_begin_index(0)
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        init = min(int(steps * strength), steps)
        t_start = max(steps - init, 0)
        timesteps = timesteps[t_start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        x = sched.add_noise(torch.from_numpy(x0), noise, timesteps[:1].repeat(SHAPE[0]))
    for t in timesteps:
        x_in = sched.scale_model_input(x, t)
        out = denoiser(x_in.numpy(), np.full(SHAPE[0], float(t)))
        x = sched.step(torch.from_numpy(out), t, x, **case.step_kw).prev_sample
    return timesteps.numpy(), x.numpy()


def assert_close(ours: np.ndarray, ref: np.ndarray, tol: float = 1e-5) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert np.isfinite(ref).all(), "reference is not finite"
    err = np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def check(case: Case, config: dict, steps: int, monkeypatch, tol: float = 1e-5, **kw: Any) -> None:
    begin_index = kw.pop("begin_index", False)
    ts_ours, x_ours = run_ours(case, config, steps, **kw)
    ts_ref, x_ref = run_diffusers(case, config, steps, monkeypatch, begin_index=begin_index, **kw)
    np.testing.assert_allclose(
        ts_ours.astype(np.float64), ts_ref.astype(np.float64), rtol=1e-6, atol=1e-3
    )
    assert ts_ours.dtype == ts_ref.dtype or (ts_ours.dtype.kind, ts_ref.dtype.kind) == ("f", "f")
    assert_close(x_ours, x_ref, tol)


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_txt2img_matches_diffusers(case: Case, config: str, monkeypatch) -> None:
    check(case, CONFIGS[config], 10, monkeypatch)


@pytest.mark.parametrize("case", [c for c in CASES if c.karras], ids=str)
def test_karras_matches_diffusers(case: Case, monkeypatch) -> None:
    check(case, SD15, 12, monkeypatch, karras=True)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.karras and c.cls != "LMSDiscreteScheduler"], ids=str
)
def test_exponential_sigmas_match_diffusers(case: Case, monkeypatch) -> None:
    check(case, LINEAR, 8, monkeypatch, use_exponential_sigmas=True)


@pytest.mark.parametrize("name", ["ddim", "euler", "euler-a", "dpm++2m", "unipc"])
def test_zero_terminal_snr_matches_diffusers(name: str, monkeypatch) -> None:
    """sigma_max = 4096 here: diffusers' float32 Euler update x + d * dt cancels ~4096-sized
    terms and is itself ~2e-5 off a float64 run (ours: 4e-6), hence the looser bound."""
    case = next(c for c in CASES if c.name == name)
    check(case, ZSNR, 10, monkeypatch, tol=5e-5)


@pytest.mark.parametrize("steps", [16, 25])
@pytest.mark.parametrize("name", ["dpm++", "dpm++3m-compat", "unipc", "dpm++3s", "lms"])
def test_longer_runs_match_diffusers(name: str, steps: int, monkeypatch) -> None:
    """>= 15 steps switches off DPM-Solver's lower_order_final tail; LMS reaches order 4."""
    case = next(c for c in CASES if c.name == name)
    check(case, SD15, steps, monkeypatch, karras=steps == 25 and case.karras)


IMG2IMG = [
    "ddim",
    "ddpm",
    "euler",
    "euler-a",
    "heun",
    "dpm2",
    "dpm2-a",
    "dpm++",
    "dpm++3m-compat",
    "dpm++2m-sde",
    "dpm++2s",
    "dpm++3s",
    "unipc",
]


@pytest.mark.parametrize("name", IMG2IMG)
def test_img2img_matches_diffusers(name: str, monkeypatch) -> None:
    case = next(c for c in CASES if c.name == name)
    x0 = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    check(case, SD15, 10, monkeypatch, strength=0.65, x0=x0)


def test_class_defaults_match_diffusers() -> None:
    for cls_name, defaults in CLASS_DEFAULTS.items():
        params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
        theirs = {k: p.default for k, p in params.items() if k != "self"}
        assert theirs == defaults, cls_name


def test_trailing_never_yields_an_extra_timestep() -> None:
    """diffusers' trailing spacing gives 62 timesteps ending in -1 for 61 steps; we give 61."""
    ref = diffusers.DDIMScheduler.from_config(SD21V)
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and int(ref.timesteps[-1]) == -1
    ours = stepper("ddim", SD21V, 61).timesteps
    np.testing.assert_array_equal(ours, ref.timesteps.numpy()[:61])


@pytest.mark.parametrize(
    "name,cls", [("dpm++2m", "DPMSolverMultistepScheduler"), ("unipc", "UniPCMultistepScheduler")]
)
def test_cosine_karras_runs_where_diffusers_loses_its_place(name, cls, monkeypatch) -> None:
    """diffusers' timestep->index lookup trips on the repeated integer timesteps of a cosine
    Karras grid (IndexError / AssertionError); stepping by call index we match what it gives
    when told its position with set_begin_index(0)."""
    sched = getattr(diffusers, cls).from_config(COSINE, use_karras_sigmas=True)
    sched.set_timesteps(10)
    with pytest.raises((IndexError, AssertionError)):
        x = torch.zeros(SHAPE)
        for t in sched.timesteps:
            x = sched.step(
                torch.from_numpy(denoiser(x.numpy(), np.full(1, float(t)))), t, x
            ).prev_sample
    case = next(c for c in CASES if c.name == name)
    check(case, COSINE, 10, monkeypatch, karras=True, begin_index=True)


def test_kdpm2_ancestral_stays_finite_where_diffusers_gives_nan(monkeypatch) -> None:
    """float32 rounding makes diffusers take sqrt(<0) for sigma_down on a cosine linspace grid."""
    case = next(c for c in CASES if c.name == "dpm2-a")
    config = {**COSINE, "timestep_spacing": "linspace"}
    _, ref = run_diffusers(case, config, 10, monkeypatch)
    assert not np.isfinite(ref).all()
    _, ours = run_ours(case, config, 10)
    assert np.isfinite(ours).all()


def test_unipc_bh1_to_sigma_zero_is_finite(monkeypatch) -> None:
    """diffusers' bh1 multiplies B(h) = -inf by a zero residual on the last step (NaN); the
    last step of ours is the first-order update to sigma 0, which lands on the predicted x0."""
    case = Case("unipc", "UniPCMultistepScheduler", {"solver_type": "bh1"}, {"solver_type": "bh1"})
    _, ref = run_diffusers(case, SD15, 10, monkeypatch)
    assert not np.isfinite(ref).all()
    _, ours = run_ours(case, SD15, 10)
    assert np.isfinite(ours).all()


@pytest.mark.parametrize(
    "name", ["ddpm", "ddim", "euler", "heun", "lms", "dpm++", "dpm-solver", "dpm++2s", "unipc"]
)
def test_sample_prediction_matches_diffusers(name: str, monkeypatch) -> None:
    """prediction_type="sample" (the model predicts x0), where diffusers implements it."""
    case = next(c for c in CASES if c.name == name)
    check(case, {**SD15, "prediction_type": "sample"}, 10, monkeypatch)
