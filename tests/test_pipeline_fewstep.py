"""Few-step recipes end to end: Turbo (guidance 0, Euler ancestral, trailing spacing) and LCM
through the runtime Pipeline vs diffusers' StableDiffusionPipeline on the tiny checkpoint,
same latents and the same per-step noise (diffusers' ``randn_tensor`` handed our draws)."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_engines import SIZE, tiny_engines, tiny_model
from test_pipeline_parity import PROMPT, _assert_close, _latents, _within

from trt_sd.runtime import Pipeline
from trt_sd.runtime.noise import sampler_noise_fn

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SEED = 7
_MODULES = {
    "LCMScheduler": "scheduling_lcm",
    "EulerAncestralDiscreteScheduler": "scheduling_euler_ancestral_discrete",
}


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")


def _diffusers_images(
    scheduler: str, options: dict, steps: int, guidance: float, latents: np.ndarray, monkeypatch
) -> np.ndarray:
    draw = sampler_noise_fn([SEED + i for i in range(len(latents))])  # the runtime's noise

    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(draw(tuple(shape)))

    module = _MODULES[scheduler]
    monkeypatch.setattr(f"diffusers.schedulers.{module}.randn_tensor", randn)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        str(tiny_model()), safety_checker=None, requires_safety_checker=False
    )
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config, **options)
    with torch.no_grad():
        out = ref(
            [PROMPT] * len(latents),
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=torch.from_numpy(latents),
            output_type="np",
        )
    return (out.images * 255).round().astype(np.uint8)


def _count_unet_rows(pipe: Pipeline, calls: list[int]):
    unet = pipe.engines["unet"]
    original = unet.run

    def counting_run(feeds, keep_on_device=()):
        calls.append(len(feeds["sample"]))
        return original(feeds, keep_on_device)

    unet.run = counting_run  # type: ignore[method-assign]
    return unet


@pytest.mark.parametrize("steps", [1, 2])
def test_turbo_recipe_matches_diffusers_without_a_cfg_batch(pipe, steps, monkeypatch) -> None:
    latents = _latents(2)
    calls: list[int] = []
    unet = _count_unet_rows(pipe, calls)
    try:
        ours = pipe(
            PROMPT,
            negative_prompt="ignored at guidance 0",
            sampler="Euler a",
            sampler_options={"timestep_spacing": "trailing"},
            steps=steps,
            guidance=0.0,
            seed=SEED,
            batch=2,
            latents=latents,
        )
    finally:
        del unet.run
    assert calls == [2] * steps  # guidance 0: one row per image, no unconditional batch
    theirs = _diffusers_images(
        "EulerAncestralDiscreteScheduler",
        {"timestep_spacing": "trailing"},
        steps,
        0.0,
        latents,
        monkeypatch,
    )
    _assert_close(np.stack(ours.images), theirs)


def test_lcm_matches_diffusers(pipe, monkeypatch) -> None:
    """LCM-LoRA style: the plain SD pipeline with LCMScheduler, guidance 1 (no CFG)."""
    latents = _latents(3, batch=1)
    ours = pipe(PROMPT, sampler="LCM", steps=4, guidance=1.0, seed=SEED, latents=latents)
    assert ours.unet_calls == 4 and ours.params["sampler"] == "lcm"
    theirs = _diffusers_images("LCMScheduler", {}, 4, 1.0, latents, monkeypatch)
    _assert_close(np.stack(ours.images), theirs)
    # the criterion has teeth: other injected noise (another seed, same latents) fails it
    other = pipe(PROMPT, sampler="LCM", steps=4, guidance=1.0, seed=SEED + 1, latents=latents)
    assert _within(np.stack(other.images), theirs) < 0.99
