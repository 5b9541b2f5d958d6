"""ControlNet descriptors: the ControlNet components and the UNet that reads their residuals.

A ControlNet is a copy of the UNet's down half plus a small image encoder: it reads the UNet's
own inputs (sample, timestep, context and the family's added conditioning) and a control image,
and returns one residual per skip connection of the UNet (``control_down_<i>``, the UNet's skip
``i``, see :class:`~trt_sd.models.unet_stages.UNetLayout`) and one for the mid block
(``control_mid``). The UNet of such an export takes those residuals as inputs and adds them, as
diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual`` do; zeros
make it the plain UNet, so one engine serves requests with and without control images.

The tensor names are written here once: they are the ControlNets' outputs and the UNet's
inputs alike. Everything is derived from the family's UNet descriptor and the UNet layout the
manifest records (``controlnet.layout``), so no family needs a branch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .descriptors import UNET, Component, ModelDims, TensorSpec
from .errors import ManifestError
from .unet_stages import UNetLayout, level_axis, skip_name

CONTROLNET_PREFIX = "controlnet_"
#: the control image input of a ControlNet (diffusers' argument name): pixels in [0, 1]
CONTROL_IMAGE = "controlnet_cond"
MID_RESIDUAL = "control_mid"
#: the manifest's top-level key
MANIFEST_KEY = "controlnet"


def controlnet_name(index: int) -> str:
    """Component (and engine file stem) of the ``index``-th ControlNet."""
    return f"{CONTROLNET_PREFIX}{index}"


def down_residual_name(skip: int) -> str:
    return f"{_DOWN}{skip}"


_DOWN = "control_down_"


def is_residual(name: str) -> bool:
    """A ControlNet residual (an input of the UNet, an output of every ControlNet)."""
    return name == MID_RESIDUAL or name.startswith(_DOWN)


@dataclass(frozen=True)
class ControlNetInfo:
    """What the manifest records about one exported ControlNet."""

    component: str
    conditioning_channels: int
    source: str  # the folder / file name it was exported from (for users, not opened)
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ControlNetPlan:
    """The ControlNets of one engine directory and the residual inputs of its UNet."""

    layout: UNetLayout
    base: Component  # the family's plain UNet descriptor
    models: tuple[ControlNetInfo, ...]

    @classmethod
    def create(
        cls, layout_config: Mapping[str, Any], dims: ModelDims, base: Component, models: Any
    ) -> ControlNetPlan:
        layout = UNetLayout.from_dict(layout_config, dims, base)
        return cls(layout, base, tuple(models))

    def residuals(self) -> tuple[TensorSpec, ...]:
        """The residual tensors: one per skip connection (shallowest first, diffusers'
        ``down_block_res_samples`` order), then the mid block's."""
        specs = []
        for i in range(self.layout.num_skips):
            skip = self.layout.spec(skip_name(i))
            specs.append(TensorSpec(down_residual_name(i), skip.dtype, skip.shape))
        channels = int(self.layout.config["block_out_channels"][-1])
        level = len(self.layout.config["block_out_channels"]) - 1
        mid_shape = (
            "unet_batch",
            channels,
            level_axis("latent_height", level),
            level_axis("latent_width", level),
        )
        specs.append(TensorSpec(MID_RESIDUAL, "float", mid_shape))
        return tuple(specs)

    @property
    def residual_names(self) -> list[str]:
        return [t.name for t in self.residuals()]

    def unet(self) -> Component:
        """The UNet with residual inputs after its own."""
        b = self.base
        return Component(
            b.name,
            inputs=(*b.inputs, *self.residuals()),
            outputs=b.outputs,
            description=b.description + ", plus ControlNet residuals",
            extra=dict(b.extra),
        )

    def controlnet(self, info: ControlNetInfo, dims: ModelDims) -> Component:
        """A ControlNet: the UNet's inputs plus the control image -> the residuals."""
        image = TensorSpec(
            CONTROL_IMAGE, "float", ("unet_batch", info.conditioning_channels, "height", "width")
        )
        del dims
        return Component(
            info.component,
            inputs=(*self.base.inputs, image),
            outputs=self.residuals(),
            description="ControlNetModel (residuals at conditioning scale 1)",
        )

    def components(self, dims: ModelDims) -> dict[str, Component]:
        comps = {UNET: self.unet()}
        for info in self.models:
            comps[info.component] = self.controlnet(info, dims)
        return comps

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout.to_dict(), "models": [m.to_dict() for m in self.models]}


def controlnet_plan(
    raw: Mapping[str, Any], base: Component, dims: ModelDims
) -> ControlNetPlan | None:
    """The plan of a manifest dict with ControlNets (``raw["controlnet"]``), else None."""
    section = raw.get(MANIFEST_KEY)
    if not section:
        return None
    try:
        models = [
            ControlNetInfo(
                str(m["component"]),
                int(m["conditioning_channels"]),
                str(m.get("source", "")),
                str(m.get("hash", "")),
            )
            for m in section["models"]
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"manifest controlnet section is malformed: {e}") from None
    expected = [controlnet_name(i) for i in range(len(models))]
    if [m.component for m in models] != expected:
        raise ManifestError(f"manifest controlnet models must be {', '.join(expected)} in order")
    return ControlNetPlan.create(section["layout"], dims, base, models)
