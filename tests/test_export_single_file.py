"""Single-file (.safetensors, original Stable Diffusion key layout) export.

There is no hub here, so the test writes its own single file: a tiny pipeline's weights renamed
diffusers -> LDM (:mod:`ldm_layout`, the inverse of diffusers' converters), then checks that
diffusers' converter restores them exactly and that the exported graphs compute what the
original diffusers modules compute.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from ldm_layout import clip_to_ldm, unet_to_ldm, vae_to_ldm
from tiny_pipeline import make_tiny_pipeline

from trt_sd.export import export_model


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("single")
    folder = make_tiny_pipeline(root / "model", seed=3)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    state = unet_to_ldm(unet.state_dict(), unet.config)
    state.update(vae_to_ldm(vae.state_dict(), vae.config))
    state.update(clip_to_ldm(text.state_dict(), "cond_stage_model.transformer."))
    path = root / "tiny-sd.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, folder


def test_layout_round_trips_through_diffusers(single_file):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    path, folder = single_file
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None
    )
    want = UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()
    got = pipe.unet.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_single_file_export_computes_the_original_model(single_file, tmp_path):
    from diffusers import UNet2DConditionModel

    path, folder = single_file
    manifest = export_model(path, tmp_path / "engines", config=folder, batch="1:1", progress=False)
    assert manifest.model["format"] == "single_file" and manifest.model["name"] == "tiny-sd"
    assert manifest.prediction_type == "epsilon"
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        "timestep": np.array([3.0, 700.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32),
    }
    with torch.no_grad():
        want = unet(*(torch.from_numpy(v) for v in feeds.values())).sample.numpy()
    session = ort.InferenceSession(str(tmp_path / "engines" / "unet.onnx"))
    (got,) = session.run(None, feeds)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
