"""End-to-end parity: diffusers' StableDiffusionPipeline (torch) vs the runtime (ONNX fp32).

Same tiny checkpoint, same initial latents (standard normal, unscaled: both sides multiply by
the scheduler's init_noise_sigma themselves), same prompt, negative prompt and CFG scale. The
images must agree within 2/255 on at least 99% of the pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
from runtime_engines import SIZE, tiny_engines, tiny_model

from trt_sd.runtime import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT = "a photo of an astronaut riding a horse on the moon"
NEGATIVE = "painting"
STEPS = 8
GUIDANCE = 7.5

# trt-sd sampler -> the diffusers scheduler class it mirrors
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


def _diffusers_images(model_dir, scheduler: str, latents: np.ndarray) -> np.ndarray:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(model_dir), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    with torch.no_grad():
        out = pipe(
            [PROMPT] * len(latents),
            negative_prompt=[NEGATIVE] * len(latents),
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=torch.from_numpy(latents),
            output_type="np",
        )
    return (out.images * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil


def _within(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Fraction of pixel values that differ by at most 2/255."""
    return float((np.abs(ours.astype(int) - theirs.astype(int)) <= 2).mean())


def _assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    within = _within(ours, theirs)
    diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
    assert within >= 0.99, f"only {within:.2%} of pixels within 2/255 (max diff {diff})"


def _latents(seed: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, SIZE // 2, SIZE // 2), np.float32)


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_epsilon_model_matches_diffusers(sampler: str) -> None:
    latents = _latents(0)
    pipe = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    ours = pipe(
        PROMPT, NEGATIVE, sampler=sampler, steps=STEPS, guidance=GUIDANCE, batch=2, latents=latents
    ).images
    theirs = _diffusers_images(tiny_model(), SCHEDULERS[sampler], latents)
    _assert_close(np.stack(ours), theirs)
    if sampler == "dpm++":  # the criterion has teeth: a dropped negative prompt fails it
        wrong = pipe(
            PROMPT, "", sampler=sampler, steps=STEPS, guidance=GUIDANCE, batch=2, latents=latents
        ).images
        assert _within(np.stack(wrong), theirs) < 0.99


def test_v_prediction_model_matches_diffusers() -> None:
    latents = _latents(1, batch=1)
    pipe = Pipeline.load(tiny_engines(v_prediction=True), backend="onnxruntime-cpu")
    assert pipe.manifest.prediction_type == "v_prediction"
    ours = pipe(PROMPT, NEGATIVE, sampler="dpm++", steps=STEPS, guidance=GUIDANCE, latents=latents)
    theirs = _diffusers_images(tiny_model(v_prediction=True), SCHEDULERS["dpm++"], latents)
    _assert_close(np.stack(ours.images), theirs)
