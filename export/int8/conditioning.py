"""Prompts -> the UNet's conditioning feeds for calibration, the way the family conditions.

Calibration must feed the UNet what it sees in use. SD 1.x / 2.x take one context tensor; SDXL
takes two encoders' hidden states concatenated plus bigG's pooled embedding and the
micro-conditioning ids. So the text step here is the family spec's (each text encoder with its
own tokenizer, then the family's ``combine``), run on the fp32 torch encoders, and the result is
a dict ``{UNet input name: rows}`` in the UNet descriptor's input order. Negative prompts are
marked as such, so SDXL's ``force_zeros_for_empty_prompt`` zeroes the unconditional row as the
pipeline does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from trt_sd.models.descriptors import UNET
from trt_sd.models.families import PromptRows

from ..checkpoint import Checkpoint

#: ``{UNet input name: (rows, ...)}``, the UNet's conditioning inputs in descriptor order
Conditioning = dict[str, np.ndarray]


class PromptEncoder:
    """The family's text step on the fp32 torch text encoders (one per family encoder)."""

    def __init__(self, ckpt: Checkpoint, loader: Any, image_size: tuple[int, int]) -> None:
        from transformers import CLIPTokenizer

        family = ckpt.family_spec
        components = family.components(ckpt.dims)
        self.family = family
        self.settings = ckpt.family_config()
        self.names = family.unet_conditioning(components[UNET])
        self.size = image_size
        self.options = family.check_options({}, *image_size)
        self.max_length = ckpt.dims.text_max_length
        self.encoders = [
            (
                enc.component,
                components[enc.component].output_names,
                CLIPTokenizer.from_pretrained(str(ckpt.config_dir / enc.source_folder)),
                loader.wrapper(enc.component),
            )
            for enc in family.text_encoders
        ]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], *, negative: bool = False) -> Conditioning:
        outputs: dict[str, dict[str, np.ndarray]] = {}
        for name, output_names, tokenizer, module in self.encoders:
            ids = tokenizer(
                list(prompts), padding="max_length", max_length=self.max_length, truncation=True
            ).input_ids
            out = module(torch.tensor(ids, dtype=torch.int32))
            out = out if isinstance(out, tuple) else (out,)
            outputs[name] = {k: v.float().numpy() for k, v in zip(output_names, out, strict=True)}
        n = len(prompts)
        rows = PromptRows(tuple(prompts), (negative,) * n, (self.size,) * n, (self.options,) * n)
        feeds = self.family.combine(outputs, rows, self.settings)
        return {k: np.asarray(feeds[k], dtype=np.float32) for k in self.names}


def num_rows(conditioning: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(conditioning.values())))


def take(conditioning: Mapping[str, np.ndarray], rows: Any) -> Conditioning:
    """The same rows of every conditioning input."""
    return {k: v[rows] for k, v in conditioning.items()}


def stack(*parts: Mapping[str, np.ndarray]) -> Conditioning:
    """Row-wise concatenation of conditioning dicts with the same inputs."""
    return {k: np.concatenate([p[k] for p in parts]).astype(np.float32) for k in parts[0]}


def nbytes(conditioning: Mapping[str, np.ndarray]) -> int:
    return sum(v.nbytes for v in conditioning.values())
