"""Post-training quantization: calibrate activation ranges on real sampler trajectories.

The fp32 UNet samples ``calib_size`` trajectories of ``calib_steps`` DPM++ 2M steps with
classifier-free guidance; hooks on every layer to be quantized record |input| (and, for the
``onnxruntime`` flavour, the Conv outputs that also get a Q/DQ pair). The calibrator turns those
statistics into one ``amax`` per tensor; weights get per-channel max |w| when the graph is
rewritten. The captured trajectories are kept: QAT trains on them and the fp32 outputs recorded
with them are its distillation targets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .layers import LayerSelection, select_layers
from .observe import INPUT, OUTPUT, RangeObserver
from .qdq_graph import LayerRanges
from .recipe import ResolvedRecipe
from .trajectories import Trajectories, UnetFn, sample_trajectories, torch_unet_fn

#: Rows per UNet call when the captured inputs are replayed for histograms.
REPLAY_ROWS = 64


@dataclass
class Calibration:
    """The calibrated ranges (keys: module names relative to the UNet) and how they came."""

    selection: LayerSelection
    ranges: dict[str, LayerRanges]
    trajectories: Trajectories
    raw_amax: dict[str, float]  # max |input| seen, before the calibrator clipped it

    def plan(self, prefix: str = "unet.") -> dict[str, LayerRanges]:
        """Ranges keyed as the exported graph names its modules (the wrapper's attribute)."""
        return {prefix + name: r for name, r in self.ranges.items()}

    def summary(self) -> dict[str, Any]:
        """Manifest-sized statistics of the calibration."""
        ratios = [
            amax / self.raw_amax[n]
            for n, r in self.ranges.items()
            if (amax := r.input_amax) is not None and self.raw_amax.get(n, 0) > 0
        ]
        steps = np.unique(self.trajectories.step_index)
        return {
            "unet_rows": len(self.trajectories),
            "timesteps_covered": len(steps),
            "quantized_layers": len(self.selection.quantized),
            "excluded_layers": list(self.selection.excluded),
            "weight_only_layers": sorted(n for n, r in self.ranges.items() if r.input_amax is None),
            "input_amax_over_max_median": round(float(np.median(ratios)), 4) if ratios else None,
        }


def conv_layers(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    modules = dict(model.named_modules())
    return [n for n in names if isinstance(modules[n], nn.Conv2d)]


def replay(unet_fn: UnetFn, trajectories: Trajectories, rows: int = REPLAY_ROWS) -> None:
    """Run the UNet once more over every captured row (the hooks see them again)."""
    for start in range(0, len(trajectories), rows):
        index = np.arange(start, min(start + rows, len(trajectories)))
        unet_fn(*trajectories.inputs(index))


def calibrate(
    wrapper: nn.Module,
    conditioning: Mapping[str, np.ndarray],
    uncond: Mapping[str, np.ndarray],
    scheduler_config: dict,
    resolved: ResolvedRecipe,
    latent_shape: tuple[int, ...],
    on_chunk: Callable[[int], None] | None = None,
) -> Calibration:
    """Sample the calibration trajectories with observers attached and compute the ranges.

    ``wrapper`` is the descriptor-shaped UNet module (its ``.unet`` holds the diffusers model).
    """
    recipe = resolved.recipe
    unet = wrapper.get_submodule("unet")
    selection = select_layers(unet, recipe.exclude)
    outputs_of = (
        conv_layers(unet, selection.quantized) if recipe.qdq_flavour == "onnxruntime" else []
    )
    unet_fn = torch_unet_fn(wrapper)
    with RangeObserver(unet, selection.quantized, outputs_of) as observer, torch.no_grad():
        trajectories = sample_trajectories(
            unet_fn,
            conditioning,
            uncond,
            scheduler_config,
            latent_shape=latent_shape,
            steps=recipe.calib_steps,
            guidance=float(recipe.guidance or 0.0),
            seed=recipe.seed,
            on_chunk=on_chunk,
        )
        if recipe.calibrator != "minmax":
            observer.mode = "hist"
            replay(unet_fn, trajectories)
        ranges, raw = {}, {}
        for name in selection.quantized:
            args = (recipe.calibrator, recipe.percentile)
            out = observer.amax(name, OUTPUT, *args) if name in outputs_of else None
            ranges[name] = LayerRanges(
                input_amax=observer.amax(name, INPUT, *args), output_amax=out
            )
            raw[name] = observer.stats[(name, INPUT)].amax
    if recipe.excluded_weights == "int8":
        ranges.update({name: LayerRanges(input_amax=None) for name in selection.excluded})
    return Calibration(selection, ranges, trajectories, raw)
