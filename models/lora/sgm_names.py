"""kohya SDXL files name UNet modules the original (SGM / LDM) way: map them to diffusers paths.

sd-scripts trains SDXL on its own copy of Stability's UNet, so its SDXL LoRAs say
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` where diffusers has
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``. The block arithmetic (what
diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` does, written from the UNet's structure):
with ``L`` resnets per down block, ``input_blocks.n`` (n >= 1) is down block ``(n-1)//(L+1)``,
slot ``(n-1)%(L+1)``: slots below ``L`` hold ``.0`` a resnet and ``.1`` a transformer, slot
``L`` the downsampler (``.0.op``); ``middle_block.0/1/2`` are resnet, transformer, resnet;
up blocks have ``L+1`` resnets, so ``output_blocks.n`` is up block ``n//(L+1)``, slot
``n%(L+1)``: ``.0`` resnet, ``.1`` transformer (or the upsampler in a block without
attention), ``.2`` the upsampler. Inside a resnet ``in_layers_2`` is ``conv1``,
``out_layers_3`` ``conv2``, ``emb_layers_1`` ``time_emb_proj``, ``skip_connection``
``conv_shortcut``; transformer internals keep their names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["sgm_to_diffusers"]

_RESNET = {
    "in_layers_2": "conv1",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_TOP = {
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
}
_BLOCK = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_?(.*)$")
_MIDDLE = re.compile(r"^middle_block_(\d+)_?(.*)$")


def _resnet(rest: str) -> str:
    return _RESNET.get(rest, rest)


def sgm_to_diffusers(key: str, paths: Iterable[str]) -> str | None:
    """The diffusers flat name (``_``-joined) of SGM flat name ``key`` for a UNet with module
    ``paths``; None when ``key`` is not an SGM name."""
    if key in _TOP:
        return _TOP[key]
    paths = list(paths)
    per_down = len({p.split(".")[3] for p in paths if p.startswith("down_blocks.0.resnets.")})
    if per_down == 0:
        return None
    middle = _MIDDLE.match(key)
    if middle:
        index, rest = int(middle.group(1)), middle.group(2)
        if index == 1:
            return f"mid_block_attentions_0_{rest}"
        return f"mid_block_resnets_{index // 2}_{_resnet(rest)}"
    block = _BLOCK.match(key)
    if not block:
        return None
    kind, n, sub, rest = block.group(1), int(block.group(2)), int(block.group(3)), block.group(4)
    if kind == "input_blocks":
        i, slot = divmod(n - 1, per_down + 1)
        if slot == per_down:  # the downsampler: input_blocks.n.0.op
            return f"down_blocks_{i}_downsamplers_0_conv" if rest == "op" else None
        if sub == 0:
            return f"down_blocks_{i}_resnets_{slot}_{_resnet(rest)}"
        return f"down_blocks_{i}_attentions_{slot}_{rest}"
    i, slot = divmod(n, per_down + 1)
    has_attention = any(p.startswith(f"up_blocks.{i}.attentions.") for p in paths)
    if sub == 0:
        return f"up_blocks_{i}_resnets_{slot}_{_resnet(rest)}"
    if sub == 1 and has_attention:
        return f"up_blocks_{i}_attentions_{slot}_{rest}"
    return f"up_blocks_{i}_upsamplers_0_conv" if rest == "conv" else None
