"""SDXL base: two CLIP text encoders, pooled text embedding and micro-conditioning.

As diffusers' ``StableDiffusionXLPipeline`` conditions its UNet:

* context: CLIP-L's and OpenCLIP-bigG's *penultimate* hidden states, concatenated on the
  feature axis (768 + 1280 = 2048 wide);
* ``text_embeds``: bigG's projected pooled embedding (1280);
* ``time_ids``: ``original_size + crops_coords_top_left + target_size`` (6 numbers per row),
  by default ``(H, W, 0, 0, H, W)``; the negative rows use the ``negative_*`` values when both
  ``negative_original_size`` and ``negative_target_size`` are given, else the positive ones.

``force_zeros_for_empty_prompt`` (the checkpoint's ``model_index.json``, default on): an
empty negative prompt is encoded as zeros (context and pooled), not as the text ``""``. Our
API's negative prompt defaults to ``""``, so an empty negative prompt here is diffusers'
``negative_prompt=None``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..descriptors import (
    CONTEXT,
    TEXT_EMBEDDINGS,
    TEXT_ENCODER,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    Component,
    ModelDims,
    TensorSpec,
    text_encoder,
    unet,
    vae_decoder,
    vae_encoder,
)
from ..errors import InputError
from .spec import FamilySpec, PromptRows, TextEncoding

TEXT_ENCODER_2 = "text_encoder_2"
#: bigG's projected pooled embedding; the text encoder's output and the UNet's input alike.
TEXT_EMBEDS = "text_embeds"
TIME_IDS = "time_ids"
SIZE_OPTIONS = ("original_size", "crops_coords_top_left", "target_size")
OPTIONS = (*SIZE_OPTIONS, *(f"negative_{k}" for k in SIZE_OPTIONS))


def sdxl_components(d: ModelDims) -> dict[str, Component]:
    added = (
        TensorSpec(TEXT_EMBEDS, "float", ("unet_batch", d.text_pooled_size)),
        TensorSpec(TIME_IDS, "float", ("unet_batch", d.time_ids_size)),
    )
    comps = (
        text_encoder(d, hidden_layer=-2),
        text_encoder(
            d,
            name=TEXT_ENCODER_2,
            hidden_size=d.text_hidden_size_2,
            hidden_layer=-2,
            pooled_output=TEXT_EMBEDS,
        ),
        unet(d, added),
        vae_decoder(d),
        vae_encoder(d),
    )
    return {c.name: c for c in comps}


def _pair(value: Any, what: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be two integers (height, width), got {value!r}") from None
    if a < 0 or b < 0:
        raise InputError(f"{what} must not be negative, got {value!r}")
    return a, b


def resolve_sdxl_options(options: Mapping[str, Any], height: int, width: int) -> dict[str, Any]:
    """diffusers' defaults: sizes = the image size, crop (0, 0); negatives unset."""
    out: dict[str, Any] = {
        "original_size": (height, width),
        "crops_coords_top_left": (0, 0),
        "target_size": (height, width),
    }
    for key in OPTIONS:
        if options.get(key) is not None:
            out[key] = _pair(options[key], key)
    return out


def time_ids(options: Mapping[str, Any], negative: bool) -> list[float]:
    """One row's micro-conditioning (diffusers' ``_get_add_time_ids``)."""
    prefix = ""
    if negative and all(options.get(f"negative_{k}") for k in ("original_size", "target_size")):
        prefix = "negative_"
    crops = options.get(f"{prefix}crops_coords_top_left") or (0, 0)
    values = (*options[f"{prefix}original_size"], *crops, *options[f"{prefix}target_size"])
    return [float(v) for v in values]


def sdxl_combine(
    outputs: Mapping[str, Mapping[str, Any]], rows: PromptRows, settings: Mapping[str, Any]
) -> dict[str, Any]:
    first = np.asarray(outputs[TEXT_ENCODER][TEXT_EMBEDDINGS], dtype=np.float32)
    second = outputs[TEXT_ENCODER_2]
    context = np.concatenate([first, np.asarray(second[TEXT_EMBEDDINGS], np.float32)], axis=-1)
    pooled = np.array(second[TEXT_EMBEDS], dtype=np.float32)
    if settings.get("force_zeros_for_empty_prompt", True):
        zero = [
            i for i, (n, t) in enumerate(zip(rows.negative, rows.texts, strict=True)) if n and not t
        ]
        context[zero] = 0.0
        pooled[zero] = 0.0
    ids = [time_ids(o, n) for o, n in zip(rows.options, rows.negative, strict=True)]
    return {CONTEXT: context, TEXT_EMBEDS: pooled, TIME_IDS: np.asarray(ids, dtype=np.float32)}


def is_sdxl(configs: Mapping[str, Mapping[str, Any]]) -> bool:
    """Both text encoders and a UNet with text-time added conditioning."""
    index = configs["index"]
    return (
        all(index.get(k) for k in ("text_encoder", "text_encoder_2", "unet", "vae"))
        and configs["unet"].get("addition_embed_type") == "text_time"
        and not index.get("requires_aesthetics_score")
    )


SDXL = FamilySpec(
    name="sdxl",
    label="SDXL",
    descriptors=sdxl_components,
    required=(TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER),
    text_encoders=(
        TextEncoding(TEXT_ENCODER, "tokenizer"),
        TextEncoding(TEXT_ENCODER_2, "tokenizer_2"),
    ),
    combine=sdxl_combine,
    sources={
        TEXT_ENCODER: ("text_encoder", "clip_text"),
        TEXT_ENCODER_2: ("text_encoder_2", "clip_text_projection"),
        UNET: ("unet", "unet"),
        VAE_DECODER: ("vae", "vae_decoder"),
        VAE_ENCODER: ("vae", "vae_encoder"),
    },
    diffusers_pipeline="StableDiffusionXLPipeline",
    detect=is_sdxl,
    settings={"force_zeros_for_empty_prompt": True},
    options=OPTIONS,
    resolve_options=resolve_sdxl_options,
    features=frozenset({"int8", "split_unet", "deepcache", "controlnet"}),
    latent_space="sdxl",
    single_file_text=("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
)
