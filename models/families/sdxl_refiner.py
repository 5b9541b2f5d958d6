"""SDXL refiner: OpenCLIP-bigG alone, micro-conditioning with an aesthetic score.

As diffusers' ``StableDiffusionXLImg2ImgPipeline`` conditions a refiner UNet
(``requires_aesthetics_score``):

* context: bigG's penultimate hidden state (1280 wide); ``text_embeds``: its projected pooled
  embedding;
* ``time_ids``: ``original_size + crops_coords_top_left + (aesthetic_score,)`` (5 numbers);
  negative rows: ``negative_original_size`` (default: ``original_size``),
  ``negative_crops_coords_top_left`` (default ``(0, 0)``) and ``negative_aesthetic_score``.
  Defaults: sizes = the image size, aesthetic scores 6.0 / 2.5.

The refiner's only tokenizer (the checkpoint's ``tokenizer_2``) is the engine directory's
``tokenizer``. It is an img2img model: ``vae_encoder`` is required.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..descriptors import (
    CONTEXT,
    TEXT_EMBEDDINGS,
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
from .sdxl import TEXT_EMBEDS, TEXT_ENCODER_2, TIME_IDS, resolve_sdxl_options
from .spec import FamilySpec, PromptRows, TextEncoding

SCORES = {"aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}
OPTIONS = (
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
    *SCORES,
)


def refiner_components(d: ModelDims) -> dict[str, Component]:
    added = (
        TensorSpec(TEXT_EMBEDS, "float", ("unet_batch", d.text_pooled_size)),
        TensorSpec(TIME_IDS, "float", ("unet_batch", d.time_ids_size)),
    )
    comps = (
        text_encoder(d, name=TEXT_ENCODER_2, hidden_layer=-2, pooled_output=TEXT_EMBEDS),
        unet(d, added),
        vae_decoder(d),
        vae_encoder(d),
    )
    return {c.name: c for c in comps}


def resolve_refiner_options(options: Mapping[str, Any], height: int, width: int) -> dict:
    sizes = {k: v for k, v in options.items() if k not in SCORES}
    out = resolve_sdxl_options(sizes, height, width)
    for key, default in SCORES.items():
        value = options.get(key, default)
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{key} must be a number, got {value!r}") from None
    return out


def refiner_time_ids(options: Mapping[str, Any], negative: bool) -> list[float]:
    """One row's micro-conditioning (diffusers' img2img ``_get_add_time_ids``)."""
    if not negative:
        values = (
            *options["original_size"],
            *options["crops_coords_top_left"],
            options["aesthetic_score"],
        )
    else:
        values = (
            *(options.get("negative_original_size") or options["original_size"]),
            *(options.get("negative_crops_coords_top_left") or (0, 0)),
            options["negative_aesthetic_score"],
        )
    return [float(v) for v in values]


def refiner_combine(
    outputs: Mapping[str, Mapping[str, Any]], rows: PromptRows, settings: Mapping[str, Any]
) -> dict[str, Any]:
    enc = outputs[TEXT_ENCODER_2]
    context = np.array(enc[TEXT_EMBEDDINGS], dtype=np.float32)
    pooled = np.array(enc[TEXT_EMBEDS], dtype=np.float32)
    if settings.get("force_zeros_for_empty_prompt", True):
        pairs = zip(rows.negative, rows.texts, strict=True)
        zero = [i for i, (neg, text) in enumerate(pairs) if neg and not text]
        context[zero] = 0.0
        pooled[zero] = 0.0
    ids = [refiner_time_ids(o, n) for o, n in zip(rows.options, rows.negative, strict=True)]
    return {CONTEXT: context, TEXT_EMBEDS: pooled, TIME_IDS: np.asarray(ids, dtype=np.float32)}


def is_refiner(configs: Mapping[str, Mapping[str, Any]]) -> bool:
    """bigG alone, a text-time UNet and the pipeline's ``requires_aesthetics_score``."""
    index, u = configs["index"], configs["unet"]
    return (
        all(index.get(k) for k in ("text_encoder_2", "unet", "vae"))
        and not index.get("text_encoder")
        and u.get("addition_embed_type") == "text_time"
        and bool(index.get("requires_aesthetics_score"))
    )


SDXL_REFINER = FamilySpec(
    name="sdxl-refiner",
    label="SDXL refiner",
    descriptors=refiner_components,
    required=(TEXT_ENCODER_2, UNET, VAE_DECODER, VAE_ENCODER),
    text_encoders=(TextEncoding(TEXT_ENCODER_2, "tokenizer", source="tokenizer_2"),),
    combine=refiner_combine,
    sources={
        TEXT_ENCODER_2: ("text_encoder_2", "clip_text_projection"),
        UNET: ("unet", "unet"),
        VAE_DECODER: ("vae", "vae_decoder"),
        VAE_ENCODER: ("vae", "vae_encoder"),
    },
    diffusers_pipeline="StableDiffusionXLImg2ImgPipeline",
    detect=is_refiner,
    options=OPTIONS,
    resolve_options=resolve_refiner_options,
    features=frozenset({"int8", "split_unet", "deepcache"}),
    latent_space="sdxl",
    single_file_text=("conditioner.embedders.0.model.",),
    settings={"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": True},
)
