"""SD 1.x and SD 2.x: one CLIP text encoder whose last hidden state is the UNet's context.

The two differ only in their weights and configs (OpenCLIP-H, v-prediction, linear
projections), none of which changes a tensor name, so they share this spec's structure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..descriptors import (
    CONTEXT,
    TEXT_EMBEDDINGS,
    TEXT_ENCODER,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    Component,
    ModelDims,
    text_encoder,
    unet,
    vae_decoder,
    vae_encoder,
)
from .spec import FamilySpec, PromptRows, TextEncoding


def sd_components(d: ModelDims) -> dict[str, Component]:
    return {c.name: c for c in (text_encoder(d), unet(d), vae_decoder(d), vae_encoder(d))}


def sd_combine(
    outputs: Mapping[str, Mapping[str, Any]], rows: PromptRows, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """The last hidden state is the context, untouched (it may be a device buffer)."""
    del rows, settings
    return {CONTEXT: outputs[TEXT_ENCODER][TEXT_EMBEDDINGS]}


SD_SOURCES = {
    TEXT_ENCODER: ("text_encoder", "clip_text"),
    UNET: ("unet", "unet"),
    VAE_DECODER: ("vae", "vae_decoder"),
    VAE_ENCODER: ("vae", "vae_encoder"),
}


def _has_sd_parts(configs: Mapping[str, Mapping[str, Any]]) -> bool:
    index = configs["index"]
    return all(index.get(k) for k in ("text_encoder", "unet", "vae")) and not index.get(
        "text_encoder_2"
    )


def is_sd2(configs: Mapping[str, Mapping[str, Any]]) -> bool:
    """OpenCLIP-conditioned or v-prediction: SD 2.x (as trt-sd has always told them apart)."""
    u, t, sched = configs["unet"], configs["text_encoder"], configs["scheduler"]
    return _has_sd_parts(configs) and (
        int(u.get("cross_attention_dim", 768)) == 1024
        or bool(u.get("use_linear_projection", False))
        or t.get("hidden_act") == "gelu"
        or sched.get("prediction_type") == "v_prediction"
    )


def _sd(name: str, label: str, detect: Any) -> FamilySpec:
    return FamilySpec(
        name=name,
        label=label,
        descriptors=sd_components,
        required=(TEXT_ENCODER, UNET, VAE_DECODER),
        text_encoders=(TextEncoding(TEXT_ENCODER, "tokenizer"),),
        combine=sd_combine,
        sources=SD_SOURCES,
        diffusers_pipeline="StableDiffusionPipeline",
        detect=detect,
        passthrough=True,
        features=frozenset({"int8", "split_unet", "deepcache", "controlnet"}),
    )


SD1 = _sd("sd1", "SD 1.x", _has_sd_parts)
SD2 = _sd("sd2", "SD 2.x", is_sd2)
