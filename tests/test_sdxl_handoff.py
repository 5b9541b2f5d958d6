"""Base -> refiner hand-off (``denoising_end`` / ``denoising_start``), against diffusers'
``StableDiffusionXLPipeline(output_type="latent", denoising_end=f)`` followed by
``StableDiffusionXLImg2ImgPipeline(image=latents, denoising_start=f)`` from the same latents.
"""

from __future__ import annotations

import numpy as np
import pytest
from runtime_engines import (
    SIZE,
    tiny_engines,
    tiny_refiner_engines,
    tiny_refiner_model,
    tiny_sdxl_engines,
    tiny_sdxl_model,
)

from trt_sd.models.errors import InputError
from trt_sd.runtime import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE, GUIDANCE = "a cat", "dog", 5.0


@pytest.fixture(scope="module")
def pipes() -> tuple[Pipeline, Pipeline]:
    base = Pipeline.load(tiny_sdxl_engines(), backend="onnxruntime-cpu")
    return base, Pipeline.load(tiny_refiner_engines(), backend="onnxruntime-cpu")


@pytest.mark.parametrize(
    ("sampler", "scheduler", "steps", "fraction"),
    [
        ("euler", "EulerDiscreteScheduler", 10, 0.8),
        ("dpm++", "DPMSolverMultistepScheduler", 8, 0.7),
    ],
)
def test_handoff_matches_diffusers(pipes, sampler, scheduler, steps, fraction) -> None:
    base, refiner = pipes
    latents = np.random.default_rng(0).standard_normal((1, 4, SIZE // 2, SIZE // 2), np.float32)
    common = {"sampler": sampler, "steps": steps, "guidance": GUIDANCE}
    first = base(
        PROMPT, NEGATIVE, latents=latents, denoising_end=fraction, output_type="latent", **common
    )
    assert first.images == [] and first.latents is not None
    assert first.params["denoising_end"] == fraction
    second = refiner(PROMPT, NEGATIVE, image=first.latents, denoising_start=fraction, **common)
    assert first.unet_calls + second.unet_calls == steps

    bd = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model()))
    rd = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_refiner_model()))
    for d in (bd, rd):
        d.set_progress_bar_config(disable=True)
        d.scheduler = getattr(diffusers, scheduler).from_config(d.scheduler.config)
    kw = {"negative_prompt": NEGATIVE, "num_inference_steps": steps, "guidance_scale": GUIDANCE}
    with torch.no_grad():
        handed = bd(
            PROMPT,
            height=SIZE,
            width=SIZE,
            latents=torch.from_numpy(latents),
            denoising_end=fraction,
            output_type="latent",
            **kw,
        ).images
        theirs = rd(PROMPT, image=handed, denoising_start=fraction, output_type="np", **kw).images
    assert float(np.abs(handed.numpy() - first.latents).max()) < 1e-4
    theirs = (theirs * 255).round().astype(np.uint8)
    assert int(np.abs(np.stack(second.images).astype(int) - theirs.astype(int)).max()) <= 1


def test_handoff_bad_input(pipes) -> None:
    base, refiner = pipes
    latents = np.zeros((1, 4, SIZE // 2, SIZE // 2), np.float32)
    with pytest.raises(InputError, match="denoising_start continues from latents"):
        refiner(PROMPT, image=np.zeros((SIZE, SIZE, 3), np.uint8), denoising_start=0.8, steps=4)
    with pytest.raises(InputError, match="latents as image need denoising_start"):
        refiner(PROMPT, image=latents, steps=4)
    with pytest.raises(InputError, match=r"denoising_end must be in \(0, 1\)"):
        base(PROMPT, steps=4, denoising_end=1.5)
    with pytest.raises(InputError, match="one model call per step"):
        refiner(PROMPT, image=latents, denoising_start=0.5, steps=4, sampler="heun")
    with pytest.raises(InputError, match="output_type must be"):
        base(PROMPT, steps=4, output_type="pil")


def test_handoff_works_for_sd_too() -> None:
    """Nothing in the hand-off is SDXL's: an SD 1.x pipeline hands off to itself."""
    pipe = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    common = {"sampler": "euler", "steps": 6, "guidance": 5.0, "seed": 3}
    whole = pipe(PROMPT, **common)
    first = pipe(PROMPT, denoising_end=0.5, output_type="latent", **common)
    second = pipe(PROMPT, image=first.latents, denoising_start=0.5, **common)
    assert first.unet_calls + second.unet_calls == 6
    diff = np.abs(np.stack(whole.images).astype(int) - np.stack(second.images).astype(int))
    assert int(diff.max()) <= 1


def test_a_result_hands_over_whole_and_mixing_families_is_refused(pipes) -> None:
    base, refiner = pipes
    common = {"sampler": "euler", "steps": 6, "guidance": GUIDANCE, "seed": 4}
    first = base(PROMPT, denoising_end=0.5, output_type="latent", **common)
    by_array = refiner(PROMPT, image=first.latents, denoising_start=0.5, **common)
    by_result = refiner(PROMPT, image=first, denoising_start=0.5, **common)
    assert np.array_equal(np.stack(by_array.images), np.stack(by_result.images))
    sd = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    sd_latents = sd(PROMPT, denoising_end=0.5, output_type="latent", **common)
    with pytest.raises(InputError, match="'sd' latent space; this SDXL refiner engine directory"):
        refiner(PROMPT, image=sd_latents, denoising_start=0.5, **common)
    with pytest.raises(InputError, match="no latents"):
        refiner(PROMPT, image=base(PROMPT, **common), denoising_start=0.5, **common)
