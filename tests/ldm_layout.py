"""diffusers -> original (LDM / SGM) key layout, the inverse of diffusers' single-file
converters, so tests can write their own single-file checkpoints (there is no hub here).

Key names follow what diffusers' ``loaders/single_file_utils.py`` reads back
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``) and the public
``scripts/convert_diffusers_to_original_sdxl.py``:

* UNet under ``model.diffusion_model.`` (``input_blocks`` / ``middle_block`` /
  ``output_blocks``; SDXL's ``add_embedding`` is ``label_emb.0``);
* VAE under ``first_stage_model.``;
* CLIP-L (Hugging Face layout) under ``cond_stage_model.transformer.`` (SD 1.x) or
  ``conditioner.embedders.0.transformer.`` (SDXL base);
* OpenCLIP (``resblocks``, fused ``in_proj``, ``text_projection`` stored transposed) under
  ``cond_stage_model.model.`` (SD 2.x, ViT-H), ``conditioner.embedders.1.model.`` (SDXL base,
  bigG) or ``conditioner.embedders.0.model.`` (SDXL refiner, bigG alone).
"""

from __future__ import annotations

from typing import Any

import torch

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _unet_prefixes(config: Any) -> dict[str, str]:
    """diffusers module prefix -> LDM prefix for an SD / SDXL UNet of any depth."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text-time conditioning
        "add_embedding.linear_2": "label_emb.0.2",
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


def unet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
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


def vae_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
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


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP text model keeps its names under ``prefix`` + ``text_model.``
    (transformers >= 5.6 dropped the ``text_model.`` level from ``CLIPTextModel``)."""
    return {f"{prefix}text_model.{k.removeprefix('text_model.')}": v for k, v in state.items()}


_OPEN_CLIP_LAYER = [
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
]


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP text model (with or without projection) -> OpenCLIP's names: one
    fused ``in_proj`` per layer (q, k, v stacked), ``text_projection`` as (width, dim)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    state.pop("embeddings.position_ids", None)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
        for key in [k for k in state if k.startswith(src)]:
            name = key[len(src) :]
            for a, b in _OPEN_CLIP_LAYER:
                name = name.replace(a, b)
            out[dst + name] = state.pop(key)
    if state:
        raise KeyError(f"no OpenCLIP name for {sorted(state)}")
    return out
