"""Few-step samplers (LCM, TCD) vs diffusers 0.42.1, step for step, and the Turbo recipe.

Same harness as test_samplers_parity.py: a smooth dummy denoiser, the injected noise handed to
both sides (diffusers' ``randn_tensor`` patched), timesteps equal and final latents within
1e-5 of the largest magnitude.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import test_samplers_parity as parity
from test_samplers_parity import CONFIGS, SD15, SHAPE, Case, _both, check, denoiser

from trt_sd.samplers import SAMPLERS, describe_samplers, resolve, sample, stepper

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

LCM = Case("lcm", "LCMScheduler", karras=False)
CASES = [
    LCM,
    _both("lcm", "LCMScheduler", False, original_inference_steps=100, timestep_scaling=4.0),
    _both("lcm", "LCMScheduler", False, clip_sample=True, clip_sample_range=1.5),
    _both("lcm", "LCMScheduler", False, **parity.THRESHOLD),
    Case("tcd", "TCDScheduler", karras=False),
    Case("tcd", "TCDScheduler", okw={"eta": 0.0}, step_kw={"eta": 0.0}, karras=False),
    Case("tcd", "TCDScheduler", okw={"eta": 1.0}, step_kw={"eta": 1.0}, karras=False),
    _both("tcd", "TCDScheduler", False, original_inference_steps=25),
]


@pytest.fixture(autouse=True)
def _patch_lcm_tcd_noise(monkeypatch) -> None:
    """The parity harness patches randn_tensor in the modules it lists; add ours."""
    modules = [*parity._NOISE_MODULES, "scheduling_lcm", "scheduling_tcd"]
    monkeypatch.setattr(parity, "_NOISE_MODULES", modules)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_txt2img_matches_diffusers(case: Case, config: str, steps: int, monkeypatch) -> None:
    check(case, CONFIGS[config], steps, monkeypatch)


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_sample_prediction_and_zero_snr_match_diffusers(name: str, monkeypatch) -> None:
    case = next(c for c in CASES if c.name == name)
    check(case, {**SD15, "prediction_type": "sample"}, 4, monkeypatch)
    check(case, parity.ZSNR, 4, monkeypatch, tol=5e-5)


def _diffusers_img2img(case: Case, steps: int, strength: float, x0: np.ndarray) -> Any:
    """LatentConsistencyModelImg2ImgPipeline's loop: strength goes to set_timesteps, which
    keeps all ``steps`` (the pipeline does not trim them again), noised at the first one."""
    seq = iter(parity.noise_sequence())
    sched = getattr(diffusers, case.cls).from_config(SD15, **case.dkw)
    sched.set_timesteps(steps, strength=strength)
    noise = torch.from_numpy(np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32))
    x = sched.add_noise(torch.from_numpy(x0), noise, sched.timesteps[:1])
    for t in sched.timesteps:
        out = denoiser(x.numpy(), np.full(SHAPE[0], float(t)))
        kw = {"generator": None, **case.step_kw}
        module = f"diffusers.schedulers.scheduling_{case.name}"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(f"{module}.randn_tensor", lambda *a, **k: torch.from_numpy(next(seq)))
            x = sched.step(torch.from_numpy(out), t, x, **kw).prev_sample
    return sched.timesteps.numpy(), x.numpy()


@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_img2img_matches_diffusers(name: str, strength: float) -> None:
    case = next(c for c in CASES if c.name == name)
    x0 = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    ts_ours, x_ours = parity.run_ours(case, SD15, 4, strength=strength, x0=x0)
    ts_ref, x_ref = _diffusers_img2img(case, 4, strength, x0)
    np.testing.assert_array_equal(ts_ours, ts_ref)
    assert ts_ours.size == 4  # all steps run, lower on the grid
    parity.assert_close(x_ours, x_ref)


def test_lcm_timesteps_are_the_distillation_grid() -> None:
    assert stepper("lcm", SD15, 4).timesteps.tolist() == [999, 759, 499, 259]
    assert stepper("LCM", SD15, 1).timesteps.tolist() == [999]
    assert stepper("lcm", SD15, 4, strength=0.5).timesteps.tolist() == [499, 379, 259, 139]
    # timestep_spacing does not apply (diffusers ignores it too)
    trailing = stepper("lcm", {**SD15, "timestep_spacing": "trailing"}, 4).timesteps
    assert trailing.tolist() == [999, 759, 499, 259]


def test_last_lcm_step_injects_no_noise() -> None:
    """One step is deterministic: the consistency function's output, no noise drawn."""

    def no_noise(shape: tuple[int, ...]) -> np.ndarray:
        raise AssertionError("noise drawn on the last step")

    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    st = stepper("lcm", SD15, 1, noise_fn=no_noise)
    assert not st.stochastic
    out = st.step(denoiser(x, st.timesteps[:1]), 0, x)
    assert np.isfinite(out).all()
    assert stepper("lcm", SD15, 4).stochastic and not stepper("tcd", SD15, 4, eta=0).stochastic


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("lcm", {"steps": 51}, "more than original_inference_steps=50"),
        ("lcm", {"steps": 8, "strength": 0.1}, "leaves 5 of the 50 distillation timesteps"),
        ("lcm", {"original_inference_steps": 0}, "original_inference_steps=0 must be"),
        ("lcm", {"eta": 0.5}, "eta applies only to"),
        ("lcm", {"strength": 0.0}, "strength=0.0 must be a number"),
        ("tcd", {"eta": 1.5}, "eta=1.5 \\(TCD's gamma\\) must be a number in \\[0, 1\\]"),
        ("tcd", {"foo": 1}, "option 'foo' is not known to sampler tcd"),
    ],
)
def test_bad_input_raises_value_error(name: str, kwargs: dict, match: str) -> None:
    kwargs = dict(kwargs)
    steps = kwargs.pop("steps", 4)
    with pytest.raises(ValueError, match=match):
        stepper(name, SD15, steps, **kwargs)


def test_listed_with_webui_names() -> None:
    rows = {r["name"]: r for r in describe_samplers()}
    assert "LCM" in rows["lcm"]["aliases"] and "TCD" in rows["tcd"]["aliases"]
    assert rows["lcm"]["kind"] == "stochastic"
    assert resolve("LCM") == ("lcm", {}) and resolve("TCDScheduler") == ("tcd", {})
    assert SAMPLERS["lcm"].diffusers_class == "LCMScheduler"
    from trt_sd.runtime.infotext import webui_sampler_name

    assert webui_sampler_name("lcm", None) == "LCM"


# --- the Turbo recipe: Euler ancestral, trailing spacing, 1-4 steps (guidance 0: no CFG) ---
TURBO = {  # stabilityai/sdxl-turbo's scheduler_config.json (the keys that matter)
    "_class_name": "EulerAncestralDiscreteScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_turbo_recipe_matches_diffusers(steps: int, monkeypatch) -> None:
    case = Case("euler-a", "EulerAncestralDiscreteScheduler", karras=False)
    check(case, TURBO, steps, monkeypatch)
    assert stepper("Euler a", TURBO, 1).timesteps.tolist() == [999.0]


def test_one_step_turbo_is_deterministic() -> None:
    """The single Euler-ancestral step goes to sigma 0, so its noise weight is 0."""
    noise = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    a = sample("euler-a", denoiser, noise, TURBO, 1, rng=np.random.default_rng(1))
    b = sample("euler-a", denoiser, noise, TURBO, 1, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dim", [256, 33])
def test_guidance_scale_embedding_matches_diffusers(dim: int) -> None:
    from diffusers import LatentConsistencyModelPipeline

    from trt_sd.samplers.consistency import guidance_scale_embedding

    w = torch.tensor([8.0 - 1.0, 1.5 - 1.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    ours = np.concatenate([guidance_scale_embedding(8.0, dim), guidance_scale_embedding(1.5, dim)])
    assert ours.shape == (2, dim) and ours.dtype == np.float32
    # sin / cos arguments reach 7000 rad, where one float32 ulp of the argument is 5e-4:
    # diffusers' float32 values are up to 4e-4 from the exact ones (ours: 2.5e-4)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=1e-3)
    assert np.mean(ours == ref.numpy()) > 0.8  # most entries agree to the bit
    assert guidance_scale_embedding(4.0, dim, rows=3).shape == (3, dim)
