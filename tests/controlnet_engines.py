"""Tiny ControlNets and engine directories with them, shared by the ControlNet tests.

``ControlNetModel.from_unet`` copies the UNet's down half and zero-initialises the zero
convolutions (a fresh ControlNet changes nothing); the tiny ones here give those convolutions
random weights so the residuals matter and parity checks see them. Engine directories start
as copies of the plain tiny engine directories, so the export reuses the text encoders and
VAE and only builds the UNet (now with residual inputs) and the ControlNets.
"""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

from runtime_engines import (
    _root,
    tiny_engines,
    tiny_model,
    tiny_sdxl_engines,
    tiny_sdxl_model,
)


def make_tiny_controlnet(model: Path, out: Path, seed: int) -> Path:
    """A random ControlNet for the UNet of diffusers folder ``model`` (VAE factor 2: its
    control image encoder downsamples once)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        for p in controlnet.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.2)
    controlnet.save_pretrained(out)
    return out


@cache
def tiny_controlnets() -> tuple[Path, Path]:
    return tuple(  # type: ignore[return-value]
        make_tiny_controlnet(tiny_model(), _root() / f"controlnet-{i}", 10 + i) for i in range(2)
    )


@cache
def tiny_sdxl_controlnet() -> Path:
    return make_tiny_controlnet(tiny_sdxl_model(), _root() / "controlnet-sdxl", 3)


@cache
def controlnet_engines() -> Path:
    """SD 1.x tiny engines with two ControlNets (shapes as :func:`tiny_engines`)."""
    from trt_sd.export import export_model

    out = _root() / "engines-controlnet"
    shutil.copytree(tiny_engines(), out)
    export_model(
        tiny_model(),
        out,
        height="16:24",
        width="16:24",
        batch="1:4",
        progress=False,
        controlnet=list(tiny_controlnets()),
    )
    return out


@cache
def sdxl_controlnet_engines() -> Path:
    """SDXL tiny engines with one ControlNet (shapes as :func:`tiny_sdxl_engines`)."""
    from trt_sd.export import export_model

    out = _root() / "engines-sdxl-controlnet"
    shutil.copytree(tiny_sdxl_engines(), out)
    export_model(
        tiny_sdxl_model(),
        out,
        height="16:24",
        width="16:24",
        batch="1:2",
        progress=False,
        controlnet=tiny_sdxl_controlnet(),
    )
    return out
