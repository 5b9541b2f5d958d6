"""SDXL refiner as its own engine directory: export, then img2img against diffusers'
``StableDiffusionXLImg2ImgPipeline``.

diffusers draws its img2img noise and VAE posterior sample with torch's RNG, we with NumPy's
seeded streams (:mod:`trt_sd.runtime.noise`); the test hands diffusers our draws (its
``randn_tensor`` and ``retrieve_latents`` patched), so both run the same arithmetic from the
same numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
from runtime_engines import SIZE, tiny_refiner_engines, tiny_refiner_model

from trt_sd.models.errors import InputError
from trt_sd.runtime import Pipeline
from trt_sd.runtime.noise import POSTERIOR_STREAM, initial_noise

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
img2img = pytest.importorskip(
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img"
)

PROMPT = "a photo of a cat"
SEED = 11
COMMON = {"strength": 0.6, "guidance": 5.0}


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(tiny_refiner_engines(), backend="onnxruntime-cpu")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(5).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.uint8)


@pytest.fixture
def reference(monkeypatch):
    def noise(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(initial_noise([SEED], tuple(shape[1:])))

    def posterior(encoder_output, generator=None, sample_mode="sample"):
        dist = encoder_output.latent_dist
        rng = np.random.default_rng([SEED, POSTERIOR_STREAM])
        draw = rng.standard_normal(tuple(dist.mean.shape[1:]), dtype=np.float32)
        return dist.mean + dist.std * torch.from_numpy(draw)[None]

    monkeypatch.setattr(img2img, "randn_tensor", noise)
    monkeypatch.setattr(img2img, "retrieve_latents", posterior)
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_refiner_model()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs(reference, image, negative, steps, **kwargs) -> np.ndarray:
    from PIL import Image

    with torch.no_grad():
        out = reference(
            PROMPT,
            negative_prompt=negative,
            image=Image.fromarray(image),
            strength=COMMON["strength"],
            guidance_scale=COMMON["guidance"],
            num_inference_steps=steps,
            output_type="np",
            **kwargs,
        )
    return (out.images * 255).round().astype(np.uint8)


def test_refiner_engine_directory(pipe: Pipeline) -> None:
    manifest = pipe.manifest
    assert manifest.model["family"] == "sdxl-refiner"
    assert set(manifest.components) == {"text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert manifest.raw["family_config"] == {
        "force_zeros_for_empty_prompt": False,
        "requires_aesthetics_score": True,
    }
    assert (
        manifest.tokenizer["vocab"] == "tokenizer/vocab.json"
    )  # from the checkpoint's tokenizer_2
    assert manifest.components["unet"].inputs[4]["shape"] == ["unet_batch", 5]  # + aesthetic score
    # the context: bigG alone
    assert manifest.components["unet"].inputs[2]["shape"] == ["unet_batch", "text_length", 48]


@pytest.mark.parametrize(
    ("negative", "options"),
    [
        ("", {}),  # not zeroed: the refiner ships force_zeros_for_empty_prompt = false
        ("dog", {}),
        (
            "dog",
            {
                "aesthetic_score": 8.0,
                "negative_aesthetic_score": 1.0,
                "original_size": (32, 32),
                "crops_coords_top_left": (2, 2),
            },
        ),
    ],
)
def test_img2img_matches_diffusers(pipe, reference, image, negative, options) -> None:
    ours = pipe(
        PROMPT, negative, image=image, sampler="euler", steps=6, seed=SEED, **COMMON, **options
    )
    theirs = _theirs(reference, image, negative, 6, **options)
    assert int(np.abs(np.stack(ours.images).astype(int) - theirs.astype(int)).max()) <= 1
    if options:
        assert ours.params["aesthetic_score"] == 8.0
        plain = pipe(PROMPT, negative, image=image, sampler="euler", steps=6, seed=SEED, **COMMON)
        assert int(np.abs(np.stack(plain.images).astype(int) - theirs.astype(int)).max()) > 2


def test_refiner_options_are_checked(pipe, image) -> None:
    with pytest.raises(InputError, match="aesthetic_score must be a number"):
        pipe(PROMPT, image=image, steps=2, aesthetic_score="high")
