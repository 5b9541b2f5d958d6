"""``trt-sd export MODEL --controlnet DIR_OR_FILE``: ControlNets as components of their own.

Each ControlNet becomes ``controlnet_<i>`` (descriptor: :mod:`trt_sd.models.controlnet`), and
the UNet is exported with the residual inputs the ControlNets feed. Both are exported and
verified against torch like every component (:func:`trt_sd.export.component_build.
build_component`); the manifest's ``controlnet`` section records the UNet layout the residuals
follow and each ControlNet's conditioning channels, so the runtime can rebuild the descriptors
and feed zeros when a request has no control image.

A ControlNet is checked against the base UNet before anything is exported: it must be for the
same family and layout (its residuals are added to this UNet's skips), read control images at
the VAE's scale, and the export must not cut the UNet (split / DeepCache sections do not take
residuals).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from trt_sd.models import InputError
from trt_sd.models.controlnet import (
    ControlNetInfo,
    ControlNetPlan,
    controlnet_name,
)
from trt_sd.models.descriptors import CONTEXT, SAMPLE, TIMESTEP, UNET
from trt_sd.models.unet_stages import UNetLayout

from .checkpoint import Checkpoint, hash_tree, sha256_file

#: UNet config keys a ControlNet must share with the base UNet (its residuals must fit the
#: UNet's skips, and it reads the same context and added conditioning)
MATCHING_KEYS = (
    "cross_attention_dim",  # first: it tells SD 1.x (768), SD 2.x (1024) and SDXL (2048) apart
    "addition_embed_type",
    "projection_class_embeddings_input_dim",
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
)
_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "cross_attention_dim": 1280,
    "addition_embed_type": None,
    "projection_class_embeddings_input_dim": None,
}


@dataclass(frozen=True)
class ControlNetSource:
    """A located ControlNet: a diffusers folder, or a single ``.safetensors`` file with a
    ``config.json`` beside it."""

    path: Path
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name if self.path.is_dir() else self.path.stem

    def weights_hash(self) -> str:
        if self.path.is_dir():
            return hash_tree(self.path)
        return sha256_file(self.path)

    def load(self) -> nn.Module:
        from diffusers import ControlNetModel

        try:
            if self.path.is_dir():
                return ControlNetModel.from_pretrained(str(self.path), use_safetensors=True)
            return ControlNetModel.from_single_file(
                str(self.path), config=str(self.path.parent), local_files_only=True
            )
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"ControlNet {self.path} could not be loaded: {first}") from None


def _list(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value


def locate_controlnet(path: str | os.PathLike[str]) -> ControlNetSource:
    """A ControlNet folder (``config.json`` + safetensors weights) or ``.safetensors`` file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"ControlNet {str(p)!r} does not exist")
    if p.is_dir():
        config = p / "config.json"
    else:
        if p.suffix.lower() != ".safetensors":
            raise InputError(
                f"ControlNet {p.name}: pass a diffusers ControlNet folder or a .safetensors file"
            )
        config = p.parent / "config.json"
    if not config.is_file():
        raise InputError(
            f"ControlNet {str(p)!r} has no config.json (a diffusers ControlNetModel folder, or a "
            ".safetensors file with its config.json beside it)"
        )
    try:
        data = json.loads(config.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"ControlNet config {config} is not readable JSON: {e}") from None
    if not isinstance(data, dict) or not str(data.get("_class_name", "ControlNetModel")).startswith(
        "ControlNet"
    ):
        raise InputError(f"{config} is not a ControlNetModel config")
    return ControlNetSource(p.resolve(), data)


def check_fits(source: ControlNetSource, ckpt: Checkpoint) -> None:
    """One-line InputError when ``source`` cannot condition this checkpoint's UNet."""
    label = ckpt.family_spec.label
    for key in MATCHING_KEYS:
        theirs = _list(source.config.get(key, _DEFAULTS[key]))
        ours = _list(ckpt.unet_config.get(key, _DEFAULTS[key]))
        if theirs != ours:
            raise InputError(
                f"ControlNet {source.name} does not fit this {label} model: its {key} is "
                f"{theirs!r}, the UNet's is {ours!r} (a ControlNet for another model family or "
                "UNet layout)"
            )
    embedding = source.config.get("conditioning_embedding_out_channels", [16, 32, 96, 256])
    scale = 2 ** (len(embedding) - 1)
    if scale != ckpt.vae_scale_factor:
        raise InputError(
            f"ControlNet {source.name} reads control images at 1/{scale} of the latent "
            f"resolution's pixels; this model's VAE scale factor is {ckpt.vae_scale_factor}"
        )
    if int(source.config.get("conditioning_channels", 3)) != 3:
        raise InputError(
            f"ControlNet {source.name} takes {source.config['conditioning_channels']}-channel "
            "control images; trt-sd supports RGB (3-channel) ControlNets"
        )
    if source.config.get("global_pool_conditions"):
        raise InputError(
            f"ControlNet {source.name} pools its conditions (shuffle-style, guess mode only); "
            "trt-sd supports ControlNets that condition every CFG row"
        )


def resolve_controlnets(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    ckpt: Checkpoint,
    *,
    precision: str,
    split_unet: Any,
    deepcache: Any,
) -> tuple[ControlNetPlan, list[ControlNetSource]] | None:
    """The plan and sources of ``--controlnet`` (None without any), refused in one line where
    the model or the other export options cannot take them."""
    if paths is None:
        return None
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not items:
        return None
    family = ckpt.family_spec
    if "controlnet" not in family.features:
        raise InputError(f"--controlnet is not available for {family.label} models")
    if split_unet is not None or deepcache is not None:
        raise InputError(
            "--controlnet cannot be combined with --split-unet or --deepcache (UNet sections "
            "take no ControlNet residuals); export without them"
        )
    sources = [locate_controlnet(p) for p in items]
    for source in sources:
        check_fits(source, ckpt)
    base = family.components(ckpt.dims)[UNET]
    layout = UNetLayout.from_unet_config(ckpt.unet_config, ckpt.dims, base)
    infos = [ControlNetInfo(controlnet_name(i), 3, s.name, "") for i, s in enumerate(sources)]
    return ControlNetPlan(layout, base, tuple(infos)), sources


class ControlNetWrapper(nn.Module):
    """The descriptor's inputs (the UNet's, then the control image) -> every residual at
    conditioning scale 1 (the runtime scales per row)."""

    def __init__(self, controlnet: nn.Module, added: tuple[str, ...]) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.added = added

    def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any, *rest: Any) -> Any:
        *added, image = rest
        kwargs = dict(zip(self.added, added, strict=True)) or None
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond=image,
            conditioning_scale=1.0,
            added_cond_kwargs=kwargs,
            return_dict=False,
        )
        return (*down, mid)


def register_modules(loader: Any, plan: ControlNetPlan, sources: list[ControlNetSource]) -> None:
    """Teach the export's module loader the ControlNet components (loaded on use)."""
    added = tuple(n for n in plan.base.input_names if n not in (SAMPLE, TIMESTEP, CONTEXT))
    for info, source in zip(plan.models, sources, strict=True):
        loader.factories[info.component] = lambda s=source: ControlNetWrapper(s.load(), added)


def build_controlnets(
    ctx: Any, plan: ControlNetPlan, sources: list[ControlNetSource]
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(manifest entries, reused names) of the ControlNet components; records the plan with
    each ControlNet's hash in ``ctx.unet_records`` (the manifest's ``controlnet``)."""
    from .component_build import build_component

    register_modules(ctx.loader(), plan, sources)
    entries: dict[str, dict[str, Any]] = {}
    reused: list[str] = []
    infos = []
    for info, source in zip(plan.models, sources, strict=True):
        digest = source.weights_hash()
        infos.append(
            ControlNetInfo(info.component, info.conditioning_channels, info.source, digest)
        )
        component = plan.controlnet(info, ctx.ckpt.dims)
        unet_precision = ctx.precisions[UNET]  # an INT8 UNet's ControlNets stay fp32
        ctx.precisions[info.component] = "fp32" if unet_precision == "int8" else unet_precision
        key = ctx.cache_key(component, {"weights": digest, "controlnet": info.component})
        entry = ctx.reusable(info.component, key)
        if entry is not None:
            reused.append(info.component)
            ctx.log(f"{info.component}: unchanged, reused from {ctx.out}")
        else:
            entry = build_component(ctx, component, key)
        entries[info.component] = entry
    final = ControlNetPlan(plan.layout, plan.base, tuple(infos))
    ctx.unet_records["controlnet"] = final.to_dict()
    return entries, reused
