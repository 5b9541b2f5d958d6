"""Single-file export for the OpenCLIP families: SDXL base (CLIP-L + bigG), the SDXL
refiner (bigG alone) and SD 2.x (ViT-H), in the original (SGM / LDM) key layout.

There is no hub here, so the test writes its own single files: each tiny diffusers pipeline's
weights renamed to the original layout (:mod:`ldm_layout`, the inverse of diffusers'
single-file converters). diffusers' ``from_single_file`` must restore them exactly, and the
engines exported from the file with ``--config`` must give the images the diffusers-folder
export gives (same weights, same graphs: the same pixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ldm_layout import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm
from runtime_engines import (
    SIZE,
    tiny_engines,
    tiny_model,
    tiny_refiner_engines,
    tiny_refiner_model,
    tiny_sdxl_engines,
    tiny_sdxl_model,
)

from trt_sd.export import export_model
from trt_sd.runtime import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

#: the text encoders of each family: diffusers subfolder -> (layout, original prefix)
TEXT_LAYOUT = {
    "sdxl": {
        "text_encoder": (clip_to_ldm, "conditioner.embedders.0.transformer."),
        "text_encoder_2": (open_clip_to_ldm, "conditioner.embedders.1.model."),
    },
    "refiner": {"text_encoder_2": (open_clip_to_ldm, "conditioner.embedders.0.model.")},
    "sd2": {"text_encoder": (open_clip_to_ldm, "cond_stage_model.model.")},
}
PIPELINE = {
    "sdxl": "StableDiffusionXLPipeline",
    "refiner": "StableDiffusionXLImg2ImgPipeline",
    "sd2": "StableDiffusionPipeline",
}
#: the same export ranges as tests/runtime_engines.py's folder exports
RANGES = {
    "sdxl": {"height": "16:24", "width": "16:24", "batch": "1:2"},
    "refiner": {"height": "16:24", "width": "16:24", "batch": "1:2"},
    "sd2": {"precision": "fp32", "height": "16:24", "width": "16:24", "batch": "1:4"},
}


def _folder(family: str) -> Path:
    return {
        "sdxl": tiny_sdxl_model,
        "refiner": tiny_refiner_model,
        "sd2": lambda: tiny_model(v_prediction=True),
    }[family]()


def write_single_file(family: str, path: Path) -> tuple[Path, Path]:
    """The family's tiny diffusers folder as one original-layout ``.safetensors``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    import transformers

    folder = _folder(family)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    state = unet_to_ldm(unet.state_dict(), unet.config)
    state.update(vae_to_ldm(vae.state_dict(), vae.config))
    for sub, (layout, prefix) in TEXT_LAYOUT[family].items():
        name = "CLIPTextModelWithProjection" if sub == "text_encoder_2" else "CLIPTextModel"
        text = getattr(transformers, name).from_pretrained(folder / sub)
        state.update(layout(text.state_dict(), prefix))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, folder


@pytest.fixture(scope="module", params=["sdxl", "refiner", "sd2"])
def single_file(request, tmp_path_factory):
    family = request.param
    path = tmp_path_factory.mktemp(family) / f"tiny-{family}.safetensors"
    return (family, *write_single_file(family, path))


def test_layout_round_trips_through_diffusers(single_file) -> None:
    """diffusers reads our original-layout file back to the very same tensors, so the
    layout is the one real SDXL / SD 2.x single files have."""
    family, path, folder = single_file
    cls = getattr(diffusers, PIPELINE[family])
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd2" else {}
    loaded = cls.from_single_file(str(path), config=str(folder), local_files_only=True, **extra)
    reference = cls.from_pretrained(str(folder), **extra)
    for sub in ("unet", "vae", *TEXT_LAYOUT[family]):
        want, got = getattr(reference, sub).state_dict(), getattr(loaded, sub).state_dict()
        assert set(got) == set(want), sub
        assert all(torch.equal(got[k], want[k]) for k in want), sub


def _images(pipe: Pipeline, family: str) -> np.ndarray:
    latents = np.random.default_rng(4).standard_normal((1, 4, SIZE // 2, SIZE // 2), np.float32)
    kw = {"sampler": "euler", "steps": 4, "guidance": 5.0, "seed": 7}
    if family == "refiner":
        image = np.random.default_rng(5).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.uint8)
        return np.stack(pipe("a cat", "dog", image=image, strength=0.6, **kw).images)
    return np.stack(pipe("a photo of a cat", "dog", latents=latents, **kw).images)


def test_single_file_engines_equal_the_folder_engines(single_file, tmp_path) -> None:
    family, path, folder = single_file
    out = tmp_path / "engines"
    manifest = export_model(path, out, config=folder, progress=False, **RANGES[family])
    assert manifest.model["format"] == "single_file" and manifest.model["name"] == path.stem
    by_folder = {
        "sdxl": tiny_sdxl_engines,
        "refiner": tiny_refiner_engines,
        "sd2": lambda: tiny_engines(v_prediction=True),
    }[family]()
    ours = Pipeline.load(out, backend="onnxruntime-cpu")
    theirs = Pipeline.load(by_folder, backend="onnxruntime-cpu")
    assert ours.manifest.family.name == theirs.manifest.family.name
    assert np.array_equal(_images(ours, family), _images(theirs, family))
