"""Single-file (.safetensors, original Stable Diffusion key layout) export.

There is no hub here, so the test writes its own single file: a tiny pipeline's weights renamed
diffusers -> LDM (the inverse of diffusers' ``convert_ldm_*_checkpoint``), then checks that
diffusers' converter restores them exactly and that the exported graphs compute what the
original diffusers modules compute.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_pipeline import make_tiny_pipeline

from trt_sd.export import export_model

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _unet_prefixes(config) -> dict[str, str]:
    """diffusers module prefix -> LDM prefix for an SD 1.x-layout UNet of any depth."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for i in range(n):
        for j in range(per):
            out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{(per + 1) * i + j + 1}.0"
            out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{(per + 1) * i + j + 1}.1"
        for j in range(per + 1):
            out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{(per + 1) * i + j}.0"
            out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{(per + 1) * i + j}.1"
        if i < n - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(per + 1) * (i + 1)}.0.op"
            up = f"output_blocks.{(per + 1) * i + per}.{2 if up_attn[i] else 1}"
            out[f"up_blocks.{i}.upsamplers.0"] = up
    return out


def unet_to_ldm(state, config):
    prefixes = sorted(_unet_prefixes(config).items(), key=lambda kv: -len(kv[0]))
    out = {}
    for key, value in state.items():
        hf, ldm = next((h, m) for h, m in prefixes if key.startswith(h + "."))
        rest = key[len(hf) + 1 :]
        if "resnets" in hf:
            head, _, tail = rest.partition(".")
            rest = f"{_RESNET.get(head, head)}.{tail}"
        out[f"model.diffusion_model.{ldm}.{rest}"] = value
    return out


def vae_to_ldm(state, config):
    n = len(config["block_out_channels"])
    renames = [("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2.")]
    renames += [("mid_block.attentions.0.", "mid.attn_1."), ("conv_shortcut", "nin_shortcut")]
    renames += [("conv_norm_out", "norm_out")]
    for i in range(n):
        renames += [
            (f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
            (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
            (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
            (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."),
        ]
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v.")]
    attn += [("to_out.0.", "proj_out.")]
    out = {}
    for key, value in state.items():
        for a, b in renames:
            key = key.replace(a, b)
        if "mid.attn_1." in key:
            for a, b in attn:
                key = key.replace("mid.attn_1." + a, "mid.attn_1." + b)
            if key.endswith(".weight") and value.ndim == 2:  # LDM stores 1x1 convolutions
                value = value.reshape(*value.shape, 1, 1)
        out[f"first_stage_model.{key}"] = value
    return out


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
    prefix = "cond_stage_model.transformer.text_model."
    state.update({prefix + k.removeprefix("text_model."): v for k, v in text.state_dict().items()})
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
