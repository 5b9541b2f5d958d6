"""Single-file export for the OpenCLIP families: SDXL base (CLIP-L + bigG), the SDXL
refiner (bigG alone) and SD 2.x (ViT-H), in the original (SGM / LDM) key layout.

There is no hub here, so the test writes its own single files: each tiny diffusers pipeline's
weights renamed to the original layout (:mod:`ldm_layout`, the inverse of diffusers'
single-file converters). diffusers' ``from_single_file`` must restore them exactly, the exporter's
loader must read the folder's weights from them, and (SDXL) the engines exported from the
file with ``--config`` must give the images the diffusers-folder export gives (same weights,
same graphs: the same pixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ldm_layout import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm
from runtime_engines import SIZE, tiny_model, tiny_refiner_model, tiny_sdxl_engines, tiny_sdxl_model

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


def _folder(family: str) -> Path:
    return {
        "sdxl": tiny_sdxl_model,
        "refiner": tiny_refiner_model,
        "sd2": lambda: tiny_model(v_prediction=True),
    }[family]()


def write_single_file(family: str, path: Path) -> tuple[Path, Path]:
    """The family's tiny diffusers folder as one original-layout ``.safetensors``."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

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


def test_our_loader_reads_the_file_as_the_folder(single_file) -> None:
    """The exporter's own loader (family told from ``--config``, diffusers' single-file
    conversion) gives every component the folder's weights: what export traces is the
    folder's model. (For SDXL the engines are compared as well, below.)"""
    from trt_sd.export.checkpoint import locate
    from trt_sd.export.modules import ModuleLoader

    _, path, folder = single_file
    ckpt, by_folder = locate(path, config=folder), locate(folder)
    assert ckpt.kind == "single_file" and ckpt.family == by_folder.family
    assert ckpt.dims == by_folder.dims
    ours, theirs = ModuleLoader(ckpt), ModuleLoader(by_folder)
    for sub, kind in dict(ckpt.family_spec.sources.values()).items():
        want = theirs._submodel(sub, kind).state_dict()
        got = ours._submodel(sub, kind).state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), sub


def test_sdxl_single_file_engines_equal_the_folder_engines(tmp_path) -> None:
    path, folder = write_single_file("sdxl", tmp_path / "tiny-sdxl.safetensors")
    out = tmp_path / "engines"
    kw = {"height": "16:24", "width": "16:24", "batch": "1:2", "progress": False}
    manifest = export_model(path, out, config=folder, **kw)
    assert manifest.model["format"] == "single_file" and manifest.model["name"] == "tiny-sdxl"
    ours = Pipeline.load(out, backend="onnxruntime-cpu")
    theirs = Pipeline.load(tiny_sdxl_engines(), backend="onnxruntime-cpu")
    assert ours.manifest.family.name == "sdxl"
    latents = np.random.default_rng(4).standard_normal((2, 4, SIZE // 2, SIZE // 2), np.float32)
    kw = {"sampler": "euler", "steps": 4, "guidance": 5.0, "batch": 2, "latents": latents}
    kw["original_size"] = (24, 24)
    a = np.stack(ours("a photo of a cat", "dog", **kw).images)
    b = np.stack(theirs("a photo of a cat", "dog", **kw).images)
    assert a.std() > 0 and np.array_equal(a, b)


def test_a_file_of_another_family_is_refused_in_one_line(tmp_path) -> None:
    """An SD 2.x file with the SDXL config (and the reverse) names both families; no torch
    loading, no diffusers shape error."""
    from trt_sd.export.checkpoint import locate
    from trt_sd.models.errors import InputError

    sd2, _ = write_single_file("sd2", tmp_path / "sd2.safetensors")
    with pytest.raises(
        InputError,
        match=r"^sd2.safetensors is an SD 1.x / 2.x checkpoint, but "
        r"the --config folder is SDXL \(its text encoders would be under "
        r"conditioner.embedders.0.transformer.\*, conditioner.embedders.1.model.",
    ):
        locate(sd2, config=tiny_sdxl_model())
    xl, _ = write_single_file("sdxl", tmp_path / "xl.safetensors")
    with pytest.raises(
        InputError,
        match="^xl.safetensors is an SDXL base checkpoint, but the "
        r"--config folder is SD 2.x \(its text encoders would be under "
        r"cond_stage_model.\*\)",
    ):
        locate(xl, config=tiny_model(v_prediction=True))
    with pytest.raises(InputError, match="SDXL refiner"):
        locate(xl, config=tiny_refiner_model())
