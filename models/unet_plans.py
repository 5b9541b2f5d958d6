"""The two ways an engine directory may cut its UNet, as the manifest records them.

* :class:`UNetPartition` (manifest key ``unet_partition``): consecutive stages
  ``unet_stage0 .. unet_stageN-1`` that chain to the whole UNet; the multi-device runtime puts
  stage k on device k. Each stage takes what it needs from the UNet inputs or from any earlier
  stage (a skip made in stage 0 and used in stage 2 goes straight there), and the manifest
  lists every tensor with the stage that makes it and the stages that read it.
* :class:`DeepCachePlan` (manifest key ``unet_deepcache``): the full UNet (component ``unet``)
  also returns the hidden state entering the up layer of skip branch ``branch``; the shallow
  UNet (``unet_shallow``) runs only the layers down to that branch and back up, reading that
  feature from the cache instead of the deep layers.

Both are rebuilt from the stored layout and checked against the stored names on load, so a
manifest written by another version is refused instead of misread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .descriptors import UNET, Component, ModelDims
from .errors import InputError, ManifestError
from .unet_stages import UNET_SHALLOW, UNetLayout, balanced_cuts, stage_name

#: Where a tensor comes from when no stage makes it (the UNet's own inputs).
FROM_INPUT = "input"


@dataclass(frozen=True)
class UNetPartition:
    """Consecutive stages cut at ``cuts`` (index of each stage's first layer, stages 1..)."""

    layout: UNetLayout
    cuts: tuple[int, ...]
    costs: tuple[float, ...] = field(default=(), compare=False)  # GFLOP per layer, informative

    def __post_init__(self) -> None:
        n = len(self.layout)
        if list(self.cuts) != sorted(set(self.cuts)) or any(not 0 < c < n for c in self.cuts):
            raise InputError(f"UNet cut points must increase within 1..{n - 1}, got {self.cuts}")

    @classmethod
    def balanced(cls, layout: UNetLayout, stages: int, costs: Sequence[float]) -> UNetPartition:
        """``stages`` stages of near-equal cost (``costs``: one per layer)."""
        check_split_count(layout, stages)
        return cls(layout, tuple(balanced_cuts(costs, stages)), tuple(costs))

    @property
    def num_stages(self) -> int:
        return len(self.cuts) + 1

    def stage_layers(self, k: int) -> list[int]:
        bounds = [0, *self.cuts, len(self.layout)]
        return list(range(bounds[k], bounds[k + 1]))

    def stage_inputs(self, k: int) -> list[str]:
        return self.layout.section_inputs(self.stage_layers(k))

    def producers(self) -> dict[str, int]:
        """Tensor name -> the stage that writes it."""
        return {
            name: k
            for k in range(self.num_stages)
            for i in self.stage_layers(k)
            for name in self.layout.writes(i)
        }

    def stage_outputs(self, k: int) -> list[str]:
        """What stage ``k`` hands on: tensors it writes that a later stage reads, and the
        model output from the last stage."""
        if k == self.num_stages - 1:
            return list(self.layout.base.output_names)
        made = {n for i in self.stage_layers(k) for n in self.layout.writes(i)}
        later = [n for s in range(k + 1, self.num_stages) for n in self.stage_inputs(s)]
        return [n for n in dict.fromkeys(later) if n in made]

    def components(self) -> list[Component]:
        return [
            self.layout.section(
                stage_name(k),
                self.stage_layers(k),
                self.stage_outputs(k),
                f"UNet stage {k + 1} of {self.num_stages}",
            )
            for k in range(self.num_stages)
        ]

    def tensors(self) -> list[dict[str, Any]]:
        """Every tensor read by a stage: who makes it and who reads it."""
        producers = self.producers()
        flows: dict[str, dict[str, Any]] = {}
        for k in range(self.num_stages):
            for name in self.stage_inputs(k):
                source = producers.get(name)
                entry = flows.setdefault(
                    name,
                    {"name": name, "from": FROM_INPUT if source is None else stage_name(source)},
                )
                entry.setdefault("to", []).append(stage_name(k))
        return list(flows.values())

    def to_dict(self) -> dict[str, Any]:
        comps = self.components()
        stages = []
        for k, comp in enumerate(comps):
            layers = self.stage_layers(k)
            stage: dict[str, Any] = {
                "component": comp.name,
                "layers": [self.layout.layers[layers[0]].name, self.layout.layers[layers[-1]].name],
                "inputs": comp.input_names,
                "outputs": comp.output_names,
            }
            if self.costs:
                stage["gflop"] = round(sum(self.costs[i] for i in layers), 3)
            stages.append(stage)
        return {
            "kind": "pipeline",
            "layout": self.layout.to_dict(),
            "cuts": list(self.cuts),
            "stages": stages,
            "tensors": self.tensors(),
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], dims: ModelDims, base: Component | None = None
    ) -> UNetPartition:
        """Rebuild from the manifest and check the recorded stages against the descriptors
        (``base``: the family's UNet descriptor)."""
        try:
            layout = UNetLayout.from_dict(data["layout"], dims, base)
            plan = cls(layout, tuple(int(c) for c in data["cuts"]))
            recorded = [(s["component"], s["inputs"], s["outputs"]) for s in data["stages"]]
        except (KeyError, TypeError, ValueError, InputError) as e:
            raise ManifestError(f"manifest unet_partition is malformed: {e}") from None
        expected = [(c.name, c.input_names, c.output_names) for c in plan.components()]
        if recorded != expected:
            raise ManifestError(
                "manifest unet_partition stages do not match this trt-sd's UNet stage "
                "descriptors; re-export with this version"
            )
        return plan


def check_split_count(layout: UNetLayout, stages: Any) -> int:
    """A split count this UNet can take: 2 .. its number of layers."""
    n = len(layout)
    if isinstance(stages, bool) or not isinstance(stages, int) or not 2 <= stages <= n:
        raise InputError(
            f"--split-unet must be an integer from 2 to {n} (this UNet has {n} layers), "
            f"got {stages!r}"
        )
    return stages


@dataclass(frozen=True)
class DeepCachePlan:
    """Full UNet + feature at skip branch ``branch``, and the shallow UNet that reads it."""

    layout: UNetLayout
    branch: int = 0

    def __post_init__(self) -> None:
        self.layout.skip_branch_layers(self.branch)  # validates the branch

    @property
    def shallow_layers(self) -> list[int]:
        prefix, suffix = self.layout.skip_branch_layers(self.branch)
        return prefix + suffix

    @property
    def feature(self) -> str:
        """The cached tensor: the hidden state entering the first suffix layer."""
        _, suffix = self.layout.skip_branch_layers(self.branch)
        return self.layout.hidden_before(suffix[0])

    def full(self) -> Component:
        out = self.layout.base.output_names[0]
        return self.layout.section(
            UNET,
            range(len(self.layout)),
            [out, self.feature],
            "UNet2DConditionModel that also returns the DeepCache feature",
        )

    def shallow(self) -> Component:
        return self.layout.section(
            UNET_SHALLOW,
            self.shallow_layers,
            self.layout.base.output_names,
            f"DeepCache shallow UNet (skip branch {self.branch}, cached {self.feature})",
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "branch": self.branch,
            "full": UNET,
            "shallow": UNET_SHALLOW,
            "feature": self.feature,
            "shallow_layers": [self.layout.layers[i].name for i in self.shallow_layers],
            "layout": self.layout.to_dict(),
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], dims: ModelDims, base: Component | None = None
    ) -> DeepCachePlan:
        try:
            plan = cls(UNetLayout.from_dict(data["layout"], dims, base), int(data["branch"]))
        except (KeyError, TypeError, ValueError, InputError) as e:
            raise ManifestError(f"manifest unet_deepcache is malformed: {e}") from None
        if data.get("feature") != plan.feature:
            raise ManifestError(
                "manifest unet_deepcache does not match this trt-sd's UNet layout; re-export "
                "with this version"
            )
        return plan
