"""Which UNet layers run in int8, and which stay float (and why).

Quantized: every ``Conv2d`` and ``Linear`` (the ops that hold nearly all of the UNet's FLOPs and
weights) except the ones known to break image quality when quantized (Q-Diffusion, NVIDIA's
diffusion INT8 recipe, and our own per-layer measurements agree on these):

* the time embedding (``time_embedding.*``, each ResNet's ``time_emb_proj``, SDXL's
  ``add_embedding``): sinusoidal features spanning orders of magnitude drive every block's
  bias; they are tiny matrix-vector products, so keeping them float costs nothing;
* ``conv_in`` / ``conv_out``: the first sees raw latents whose range changes with the noise
  level, the last writes the prediction itself; both have 4 channels on one side, so int8 buys
  no speed there;
* ResNet ``conv_shortcut``: in the up blocks it reads the concatenation of the skip tensor and
  the upsampled path, two differently scaled distributions that one per-tensor scale serves
  badly (Q-Diffusion's "shortcut splitting" problem).

Never quantized by construction: group / layer norms, the attention score and value matmuls
(activation x activation) and the softmax between them; they stay float in both Q/DQ flavours.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Module-name patterns (fnmatch, relative to the UNet) that stay float by default.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "time_embedding.*",
    "*time_emb_proj",
    "add_embedding.*",
    "conv_in",
    "conv_out",
    "*conv_shortcut",
)
#: Always float: not Conv2d / Linear, recorded in the manifest so the recipe is complete.
FLOAT_BY_CONSTRUCTION: tuple[str, ...] = (
    "GroupNorm",
    "LayerNorm",
    "attention QK^T / softmax / PV matmuls",
)


@dataclass(frozen=True)
class LayerSelection:
    """Names (relative to the UNet) of the quantized and the deliberately excluded layers."""

    quantized: tuple[str, ...]
    excluded: tuple[str, ...]
    patterns: tuple[str, ...]


def excluded_by(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_layers(unet: object, patterns: Sequence[str] = DEFAULT_EXCLUDE) -> LayerSelection:
    """Split the UNet's Conv2d / Linear modules into quantized and excluded ones."""
    from torch import nn

    quantized: list[str] = []
    excluded: list[str] = []
    for name, module in unet.named_modules():  # type: ignore[attr-defined]
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        (excluded if excluded_by(name, patterns) else quantized).append(name)
    return LayerSelection(tuple(quantized), tuple(excluded), tuple(patterns))
