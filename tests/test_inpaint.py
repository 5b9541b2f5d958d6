"""Inpainting against diffusers' StableDiffusionInpaintPipeline / StableDiffusionXLInpaintPipeline.

Tiny random checkpoints: SD 1.x with a 9-channel (inpainting) UNet and with the ordinary
4-channel UNet (latent blending), SDXL with a 9-channel UNet; fp32 ONNX on CPU. diffusers
draws its noise and VAE posterior samples with torch's RNG, we with NumPy's seeded streams
(:mod:`trt_sd.runtime.noise`); the reference gets our draws (its ``randn_tensor`` and
``retrieve_latents`` patched, in the order it calls them), so both sides run the same
arithmetic from the same numbers. Images must agree within 1/255.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
from runtime_engines import (
    SIZE,
    _root,
    tiny_engines,
    tiny_model,
    tiny_sdxl_engines,
    tiny_sdxl_model,
)

from trt_sd.models.errors import InputError
from trt_sd.runtime import Pipeline
from trt_sd.runtime.inpaint import latent_mask, load_mask
from trt_sd.runtime.noise import MASKED_IMAGE_STREAM, POSTERIOR_STREAM, initial_noise

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
sd_inpaint = pytest.importorskip(
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint"
)
xl_inpaint = pytest.importorskip(
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint"
)

PROMPT = "a photo of a cat"
NEGATIVE = "dog"
SEED = 7
SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
}


@cache
def inpaint_model() -> Path:
    from tiny_pipeline import make_tiny_pipeline

    return make_tiny_pipeline(_root() / "model-inpaint", in_channels=9)


@cache
def inpaint_engines() -> Path:
    from trt_sd.export import export_model

    out = _root() / "engines-inpaint"
    export_model(inpaint_model(), out, height=16, width=16, batch="1:2", progress=False)
    return out


@cache
def sdxl_inpaint_model() -> Path:
    from tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(_root() / "model-sdxl-inpaint", in_channels=9)


@cache
def sdxl_inpaint_engines() -> Path:
    from trt_sd.export import export_model

    out = _root() / "engines-sdxl-inpaint"
    export_model(sdxl_inpaint_model(), out, height=16, width=16, batch=1, progress=False)
    return out


@cache
def _pipe(kind: str) -> Pipeline:
    engines = {
        "sd9": inpaint_engines,
        "sd4": tiny_engines,
        "xl9": sdxl_inpaint_engines,
        "xl4": tiny_sdxl_engines,
    }[kind]
    return Pipeline.load(engines(), backend="onnxruntime-cpu")


def _image() -> np.ndarray:
    return np.random.default_rng(5).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.uint8)


def _mask(size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[3:11, 5:14] = 255  # off the 2-pixel latent grid on some edges
    return mask


def _reference(monkeypatch, kind: str, strength: float):
    """diffusers' inpaint pipeline of ``kind``, handed our noise and posterior draws."""
    module = xl_inpaint if kind.startswith("xl") else sd_inpaint
    streams = [POSTERIOR_STREAM] if kind.endswith("4") or strength < 1.0 else []
    streams.append(MASKED_IMAGE_STREAM)  # diffusers encodes the masked image even for 4 channels

    def noise(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(initial_noise([SEED], tuple(shape[1:])))

    def posterior(encoder_output, generator=None, sample_mode="sample"):
        dist = encoder_output.latent_dist
        rng = np.random.default_rng([SEED, streams.pop(0)])
        draw = rng.standard_normal(tuple(dist.mean.shape[1:]), dtype=np.float32)
        return dist.mean + dist.std * torch.from_numpy(draw)[None]

    monkeypatch.setattr(module, "randn_tensor", noise)
    monkeypatch.setattr(module, "retrieve_latents", posterior)
    if kind.startswith("xl"):
        model = sdxl_inpaint_model() if kind == "xl9" else tiny_sdxl_model()
        return diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(str(model))
    model = inpaint_model() if kind == "sd9" else tiny_model()
    return diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        str(model), safety_checker=None, requires_safety_checker=False
    )


def _theirs(ref, sampler: str, steps: int, strength: float, mask, latents=None) -> np.ndarray:
    from PIL import Image

    ref.set_progress_bar_config(disable=True)
    ref.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(ref.scheduler.config)
    with torch.no_grad():
        out = ref(
            PROMPT,
            negative_prompt=NEGATIVE,
            image=Image.fromarray(_image()),
            mask_image=mask if isinstance(mask, Image.Image) else Image.fromarray(mask),
            height=SIZE,
            width=SIZE,
            strength=strength,
            guidance_scale=5.0,
            num_inference_steps=steps,
            latents=None if latents is None else torch.from_numpy(latents),
            output_type="np",
        )
    return (out.images * 255).round().astype(np.uint8)


def _diff(ours, theirs) -> int:
    return int(np.abs(np.stack(ours).astype(int) - theirs.astype(int)).max())


CASES = [  # (engine, sampler, strength, latents given)
    ("sd9", "euler", 1.0, True),
    ("sd9", "dpm++", 0.75, False),
    ("sd4", "euler", 1.0, True),
    ("sd4", "dpm++", 0.6, False),
    ("xl9", "euler", 1.0, True),
    ("xl4", "euler", 0.7, False),
]


@pytest.mark.parametrize(("kind", "sampler", "strength", "given"), CASES)
def test_inpaint_matches_diffusers(monkeypatch, kind, sampler, strength, given) -> None:
    pipe = _pipe(kind)
    latents = initial_noise([SEED + 100], (4, SIZE // 2, SIZE // 2)) if given else None
    steps = 6
    kwargs = {"image": _image(), "mask": _mask(), "strength": strength, "sampler": sampler}
    kwargs.update(steps=steps, guidance=5.0, seed=SEED, latents=latents)
    ours = pipe(PROMPT, NEGATIVE, **kwargs)
    theirs = _theirs(
        _reference(monkeypatch, kind, strength), sampler, steps, strength, _mask(), latents
    )
    assert _diff(ours.images, theirs) <= 1
    # the criterion has teeth: another mask gives another image
    kwargs.update(mask=255 - _mask())
    assert _diff(pipe(PROMPT, NEGATIVE, **kwargs).images, theirs) > 8


def test_mask_blur_matches_diffusers_blur(monkeypatch) -> None:
    from PIL import Image

    blurred = diffusers.image_processor.VaeImageProcessor.blur(Image.fromarray(_mask()), 2)
    pipe = _pipe("sd9")
    latents = initial_noise([SEED], (4, SIZE // 2, SIZE // 2))
    ours = pipe(
        PROMPT,
        NEGATIVE,
        image=_image(),
        mask=_mask(),
        mask_blur=2,
        sampler="euler",
        steps=4,
        guidance=5.0,
        seed=SEED,
        latents=latents,
    )
    theirs = _theirs(_reference(monkeypatch, "sd9", 1.0), "euler", 4, 1.0, blurred, latents)
    assert _diff(ours.images, theirs) <= 1
    assert ours.params["mask_blur"] == 2.0
    sharp = load_mask(_mask(), SIZE, SIZE)
    soft = load_mask(_mask(), SIZE, SIZE, blur=2)
    assert soft.sum() < sharp.sum()  # the blur rounds the corners off once binarised


def test_mask_preprocessing_matches_diffusers() -> None:
    from PIL import Image

    processor = diffusers.image_processor.VaeImageProcessor(
        vae_scale_factor=2, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
    rgb = np.random.default_rng(1).uniform(0, 255, (20, 28, 3)).astype(np.uint8)
    theirs = processor.preprocess(Image.fromarray(rgb), height=16, width=24)
    ours = load_mask(rgb, 24, 16)
    np.testing.assert_array_equal(ours, theirs.numpy())
    small = torch.nn.functional.interpolate(theirs, size=(8, 12))
    np.testing.assert_array_equal(latent_mask(ours, 8, 12), small.numpy())


@pytest.mark.parametrize(
    ("kind", "kwargs", "message"),
    [
        ("sd9", {"image": "IMAGE"}, "inpainting engine .* pass an image and a mask"),
        ("sd9", {}, "inpainting engine"),
        ("sd4", {"mask": "MASK"}, "pass the image to repaint too"),
        ("sd4", {"image": "IMAGE", "mask": np.zeros((SIZE, SIZE), np.uint8)}, "no white pixels"),
        ("sd4", {"image": "IMAGE", "mask": _mask(24)}, "mask is 24x24 but the image is 16x16"),
        ("sd4", {"image": "IMAGE", "mask": "MASK", "mask_blur": -1}, "mask_blur must be in"),
        ("sd4", {"image": "IMAGE", "mask_blur": 2}, "mask_blur applies to inpainting"),
        (
            "sd4",
            {"image": "IMAGE", "mask": np.zeros((SIZE, SIZE, 2), np.uint8)},
            "mask array must be",
        ),
    ],
)
def test_bad_inpaint_input(kind, kwargs, message) -> None:
    values = {"IMAGE": _image(), "MASK": _mask()}
    kwargs = {k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(InputError, match=message):
        _pipe(kind)(PROMPT, steps=2, seed=0, **kwargs)


def test_inpainting_engine_directory() -> None:
    manifest = _pipe("sd9").manifest
    unet = {t["name"]: t["shape"] for t in manifest.components["unet"].inputs}
    assert manifest.dims.unet_in_channels == 9 and manifest.dims.inpainting
    assert unet["sample"][1] == 4  # the runtime's latents; the graph concatenates the rest
    assert unet["mask"] == ["unet_batch", 1, "latent_height", "latent_width"]
    assert unet["masked_image_latents"] == ["unet_batch", 4, "latent_height", "latent_width"]
    assert "mask" not in {t["name"] for t in _pipe("sd4").manifest.components["unet"].inputs}


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [({"deepcache": 0}, "--deepcache"), ({"split_unet": 2}, "--split-unet"),
     ({"precision": "int8"}, "--int8")],
)  # fmt: skip
def test_export_refuses_features_inpainting_unets_lack(tmp_path, kwargs, flag) -> None:
    from trt_sd.export import export_model

    with pytest.raises(InputError, match=f"{flag} is not supported for inpainting UNets"):
        export_model(inpaint_model(), tmp_path / "out", height=16, width=16, **kwargs)
    assert not (tmp_path / "out").exists()


def test_batch_rows_are_each_images_own() -> None:
    """Image i of a batch is the image its seed makes alone (CFG doubles the mask rows to
    [m0, m1, m0, m1]; each image has its own posterior draws)."""
    pipe = _pipe("sd9")
    kwargs = {"image": _image(), "mask": _mask(), "steps": 3, "sampler": "euler", "guidance": 5.0}
    batch = pipe(PROMPT, NEGATIVE, seed=SEED, batch=2, strength=0.8, **kwargs)
    for i in range(2):
        alone = pipe(PROMPT, NEGATIVE, seed=SEED + i, strength=0.8, **kwargs)
        assert _diff([batch.images[i]], alone.images[0][None]) <= 1
    assert _diff([batch.images[0]], batch.images[1][None]) > 8
