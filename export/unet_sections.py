"""Torch modules that run a section of the UNet's layer list (see
:mod:`trt_sd.models.unet_stages`), for exporting stages and DeepCache's two UNets.

A section keeps a reference to the whole diffusers UNet and calls its submodules directly, layer
by layer, exactly as ``UNet2DConditionModel.forward`` does for SD 1.x / 2.x UNets (no class or
addition embeddings, no adapters / ControlNet residuals, FreeU off). Chaining the sections of a
partition therefore computes the same numbers as the whole UNet: the tracer records only the
submodules a section calls, so each exported graph holds only its own weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trt_sd.models.descriptors import CONTEXT
from trt_sd.models.unet_stages import TIME_EMBEDDING, Layer, UNetLayout


class UNetSection(nn.Module):
    """Runs ``layers`` (indices into ``layout``) of ``unet``; ``forward`` takes the section's
    inputs in ``input_names`` order and returns ``output_names`` (a tensor if just one)."""

    def __init__(
        self,
        unet: nn.Module,
        layout: UNetLayout,
        layers: Sequence[int],
        input_names: Sequence[str],
        output_names: Sequence[str],
    ) -> None:
        super().__init__()
        self.unet = unet
        self.layout = layout
        self.layers = list(layers)
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def forward(self, *inputs: torch.Tensor) -> Any:
        env = dict(zip(self.input_names, inputs, strict=True))
        for i in self.layers:
            run_layer(self.unet, self.layout, i, env)
        outputs = tuple(env[n] for n in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs


def run_layer(unet: Any, layout: UNetLayout, i: int, env: dict[str, torch.Tensor]) -> None:
    """Run layer ``i``: read its inputs from ``env``, write its outputs there."""
    layer: Layer = layout.layers[i]
    reads = layout.reads(i)
    names = layout.writes(i)
    if layer.kind == "conv_in":
        sample, timestep = env[reads[0]], env[reads[1]]
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        if layout.added:  # the family's added conditioning, by diffusers' added_cond_kwargs keys
            added = {n: env[n] for n in layout.added}
            aug = unet.get_aug_embed(
                emb=emb, encoder_hidden_states=env.get(CONTEXT), added_cond_kwargs=added
            )
            emb = emb if aug is None else emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.conv_in(sample)
        env.update({names[0]: hidden, names[1]: hidden, TIME_EMBEDDING: emb})
        return
    hidden = env[reads[0]]
    emb = env.get(TIME_EMBEDDING)
    context = env[CONTEXT] if layer.cross_attention else None
    if layer.kind == "down":
        hidden = unet.down_blocks[layer.block].resnets[layer.index](hidden, emb)
    elif layer.kind in ("down_attn", "up_attn"):
        blocks = unet.down_blocks if layer.kind == "down_attn" else unet.up_blocks
        attention = blocks[layer.block].attentions[layer.index]
        hidden = attention(hidden, encoder_hidden_states=context, return_dict=False)[0]
    elif layer.kind == "downsample":
        for downsampler in unet.down_blocks[layer.block].downsamplers:
            hidden = downsampler(hidden)
    elif layer.kind == "mid":
        if layer.cross_attention:
            hidden = unet.mid_block(hidden, emb, encoder_hidden_states=context)
        else:
            hidden = unet.mid_block(hidden, emb)
    elif layer.kind == "up":
        skip = env[reads[-1]]
        if layer.upsample_first:
            # The previous block's upsampler, sized to this layer's skip (diffusers'
            # forward_upsample_size path; plain 2x when the latent size allows).
            for upsampler in unet.up_blocks[layer.block - 1].upsamplers:
                hidden = upsampler(hidden, skip.shape[2:])
        block = unet.up_blocks[layer.block]
        hidden = block.resnets[layer.index](torch.cat([hidden, skip], dim=1), emb)
    elif layer.kind == "conv_out":
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        hidden = unet.conv_out(hidden)
    else:
        raise ValueError(f"unknown UNet layer kind {layer.kind!r}")
    for name in names:
        env[name] = hidden


def check_supported(unet: Any) -> None:
    """Refuse UNets whose forward does more than the layer list models (FreeU switched on)."""
    for block in unet.up_blocks:
        if all(getattr(block, k, None) for k in ("s1", "s2", "b1", "b2")):
            raise ValueError("FreeU is enabled on this UNet; sections do not model it")


def layer_costs(unet: Any, layout: UNetLayout, feeds: dict[str, torch.Tensor]) -> list[float]:
    """GFLOP of each layer on ``feeds`` (the UNet inputs at the shape to balance for),
    counted by torch's FLOP counter (convolutions, matmuls, attention)."""
    env = dict(feeds)
    costs = []
    with torch.no_grad():
        for i in range(len(layout)):
            counter = FlopCounterMode(display=False)
            with counter:
                run_layer(unet, layout, i, env)
            costs.append(counter.get_total_flops() / 1e9)
    return costs


def torch_feeds(feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """NumPy feeds as fp32 torch tensors (integer arrays kept as they are)."""
    out = {}
    for name, value in feeds.items():
        t = torch.from_numpy(np.ascontiguousarray(value))
        out[name] = t.float() if t.is_floating_point() else t
    return out


def torch_env(unet: Any, layout: UNetLayout, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor of the layout (UNet inputs, time embedding, skips, hidden states, model
    output) computed by the fp32 torch UNet on ``feeds``, as NumPy arrays."""
    env = torch_feeds(feeds)
    with torch.no_grad():
        for i in range(len(layout)):
            run_layer(unet, layout, i, env)
    return {name: value.numpy() for name, value in env.items()}
