"""Inpainting UNets at export: the 9-channel input assembled inside the graph.

A dedicated inpainting checkpoint's UNet takes ``cat([latents, mask, masked_image_latents])``
on the channel axis (diffusers' order). The descriptor gives the mask and the masked image's
latents inputs of their own (:func:`trt_sd.models.descriptors.inpaint_inputs`), so the runtime
feeds them as per-row conditioning: CFG doubles them, the batching engine slices them, and the
sampler only ever sees 4-channel latents. The concatenation lives here, in the graph.
"""

from __future__ import annotations

import torch
from torch import nn

from trt_sd.models import InputError
from trt_sd.models.descriptors import MASK, MASKED_IMAGE_LATENTS, ModelDims


class InpaintUNetWrapper(nn.Module):
    """``(sample, timestep, context, *added, mask, masked_image_latents)`` -> ``inner``'s
    output for ``cat([sample, mask, masked_image_latents])`` (``inner``: the plain UNet
    wrapper, :class:`trt_sd.export.modules.UNetWrapper`)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *rest: torch.Tensor,
    ) -> torch.Tensor:
        *added, mask, masked = rest
        latent_input = torch.cat([sample, mask, masked], dim=1)
        return self.inner(latent_input, timestep, encoder_hidden_states, *added)


#: the extra inputs the wrapper takes after the family's own
INPAINT_INPUTS = (MASK, MASKED_IMAGE_LATENTS)


def check_inpaint_export(
    dims: ModelDims,
    int8: bool,
    split_unet: int | None,
    deepcache: int | None,
    controlnet: bool = False,
) -> None:
    """Features whose graphs model a plain UNet's input are refused for inpainting UNets, in
    one line, before anything is exported."""
    if not dims.inpainting:
        return
    asked = [
        flag
        for flag, value in (
            ("--int8", int8),
            ("--split-unet", split_unet),
            ("--deepcache", deepcache),
            ("--controlnet", controlnet or None),
        )
        if value is not None and value is not False  # deepcache=0 is a branch, not "off"
    ]
    if asked:
        raise InputError(
            f"{', '.join(asked)} is not supported for inpainting UNets "
            f"({dims.unet_in_channels} input channels); export without it"
        )
