"""The UNet as a chain of layers, and descriptors for any section of that chain.

Two features cut the UNet at layer boundaries: the multi-device pipeline (consecutive
*stages*, one engine per device) and DeepCache (a full UNet that also returns one deep feature,
and a *shallow* UNet that takes that feature instead of computing it). Both are sections of one
layer list, so both are described here, next to the component descriptors they extend.

The layer list (:class:`UNetLayout`) of a diffusers ``UNet2DConditionModel``::

    conv_in  down_0_0 down_0_0_attn .. down_0_downsample  ..  mid  ..  up_3_2 up_3_2_attn  conv_out

``conv_in`` also turns the timestep into the time embedding. A block's resnets and its
transformers are separate layers (``down_0_0`` and ``down_0_0_attn``), so cuts can balance
stages finely. Every down layer (its transformer, where the block has them) and every
downsampler produces a *skip* tensor; every up resnet (``up_*``) consumes one, last produced
first. An up block's upsampler runs at the start of the next block's
first layer (``upsample_first``), resizing to the size of the skip that layer consumes: this is
what diffusers does for sizes that are not multiples of 2**levels, it equals plain 2x nearest
upsampling otherwise, and a cut between blocks then carries the smaller, not yet upsampled state.

Tensors that cross a cut are named here and nowhere else: the UNet's own inputs and output
(from :func:`trt_sd.models.descriptors.unet`), :data:`TIME_EMBEDDING`, ``skip_<i>`` (skip
branch ``i``, as the DeepCache paper numbers them: 0 is the shallowest) and
``hidden_<layer>`` (the hidden state a layer outputs). Spatial axes of lower resolutions are
``latent_height/2``, ``latent_height/4``, ... (a stride-2 convolution rounds up, as these do).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .descriptors import CONTEXT, SAMPLE, TIMESTEP, Component, ModelDims, TensorSpec, unet
from .errors import InputError, ManifestError

TIME_EMBEDDING = "time_embedding"
STAGE_PREFIX = "unet_stage"
#: The shallow UNet of a DeepCache export; the full UNet keeps the name ``unet``.
UNET_SHALLOW = "unet_shallow"
#: The keys of the UNet config a layout depends on (what the manifest stores).
LAYOUT_KEYS = (
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "time_embed_dim",
)


def skip_name(branch: int) -> str:
    return f"skip_{branch}"


def hidden_name(layer: str) -> str:
    return f"hidden_{layer}"


def stage_name(index: int) -> str:
    return f"{STAGE_PREFIX}{index}"


def level_axis(symbol: str, level: int) -> str:
    """The axis symbol of ``symbol`` (latent_height / latent_width) at resolution ``level``."""
    return symbol if level == 0 else f"{symbol}/{2**level}"


def resolve_axis(symbol: str, sizes: Mapping[str, int]) -> int:
    """Concrete size of an axis symbol, ``name/k`` being ``ceil(sizes[name] / k)``."""
    if "/" in symbol:
        base, divisor = symbol.split("/")
        return -(-sizes[base] // int(divisor))
    return sizes[symbol]


@dataclass(frozen=True)
class Layer:
    """One cut-free piece of the UNet."""

    name: str
    kind: str  # conv_in | down | downsample | mid | up | conv_out
    block: int
    index: int  # layer index inside its block
    level: int  # resolution level of its output (0 = latent size)
    channels: int  # channels of its output
    cross_attention: bool
    produces_skip: int | None = None
    consumes_skip: int | None = None
    upsample_first: bool = False


def _per_block(value: Any, blocks: int, what: str) -> list[int]:
    values = [int(value)] * blocks if isinstance(value, int) else [int(v) for v in value]
    if len(values) != blocks:
        raise InputError(f"UNet config: {what} has {len(values)} entries for {blocks} blocks")
    return values


class UNetLayout:
    """The layer list of one UNet configuration and the tensors between its layers."""

    def __init__(
        self, config: Mapping[str, Any], dims: ModelDims, base: Component | None = None
    ) -> None:
        self.config = {k: config[k] for k in LAYOUT_KEYS}
        self.base = base or unet(dims)  # the UNet's own inputs and output
        #: inputs beside sample / timestep / context (a family's added conditioning): they
        #: join the time embedding, so ``conv_in`` reads them
        self.added = [n for n in self.base.input_names if n not in (SAMPLE, TIMESTEP, CONTEXT)]
        channels = [int(c) for c in config["block_out_channels"]]
        n = len(channels)
        down_types = list(config["down_block_types"])
        up_types = list(config["up_block_types"])
        if len(down_types) != n or len(up_types) != n:
            raise InputError("UNet config: block type lists and block_out_channels differ")
        per_block = _per_block(config["layers_per_block"], n, "layers_per_block")
        layers: list[Layer] = [Layer("conv_in", "conv_in", -1, 0, 0, channels[0], False, 0)]
        stack: list[tuple[int, int]] = [(0, channels[0])]  # (skip index, level) produced so far
        for b in range(n):
            attn = "CrossAttn" in down_types[b]
            for j in range(per_block[b]):
                skip = len(stack)
                name, c = f"down_{b}_{j}", channels[b]
                if attn:  # resnet, then its transformer (which makes the skip)
                    layers.append(Layer(name, "down", b, j, b, c, False))
                    layers.append(Layer(f"{name}_attn", "down_attn", b, j, b, c, True, skip))
                else:
                    layers.append(Layer(name, "down", b, j, b, c, False, skip))
                stack.append((skip, b))
            if b < n - 1:
                skip = len(stack)
                name = f"down_{b}_downsample"
                layers.append(
                    Layer(name, "downsample", b, per_block[b], b + 1, channels[b], False, skip)
                )
                stack.append((skip, b + 1))
        mid_type = config.get("mid_block_type")
        if mid_type:
            layers.append(Layer("mid", "mid", -1, 0, n - 1, channels[-1], "CrossAttn" in mid_type))
        reversed_per_block = per_block[::-1]
        for b in range(n):
            attn = "CrossAttn" in up_types[b]
            out_channels = channels[n - 1 - b]
            for j in range(reversed_per_block[b] + 1):
                if not stack:
                    raise InputError("UNet config: up blocks consume more skips than are made")
                skip, _ = stack.pop()
                level = n - 1 - b
                layers.append(
                    Layer(
                        f"up_{b}_{j}",
                        "up",
                        b,
                        j,
                        level,
                        out_channels,
                        False,
                        consumes_skip=skip,
                        upsample_first=b > 0 and j == 0,
                    )
                )
                if attn:
                    layers.append(
                        Layer(f"up_{b}_{j}_attn", "up_attn", b, j, level, out_channels, True)
                    )
        if stack:
            raise InputError("UNet config: some skip connections are never consumed")
        layers.append(Layer("conv_out", "conv_out", -1, 0, 0, dims.unet_out_channels, False))
        self.layers = tuple(layers)
        self.time_embed_dim = int(config["time_embed_dim"])
        self._by_name = {layer.name: i for i, layer in enumerate(self.layers)}
        self._skip_producer = {
            layer.produces_skip: layer for layer in self.layers if layer.produces_skip is not None
        }
        self._skip_consumer = {
            layer.consumes_skip: i
            for i, layer in enumerate(self.layers)
            if layer.consumes_skip is not None
        }

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_unet_config(
        cls, config: Mapping[str, Any], dims: ModelDims, base: Component | None = None
    ) -> UNetLayout:
        """From a diffusers UNet ``config.json`` (``base``: the family's UNet descriptor);
        refuses configurations whose extra inputs (class / addition embeddings, encoder
        projections) no stage could receive. SDXL's ``text_time`` addition embedding is
        modelled: its inputs (the base's added conditioning) join the time embedding."""
        added = base is not None and any(
            n not in (SAMPLE, TIMESTEP, CONTEXT) for n in base.input_names
        )
        unsupported = [
            key
            for key in (
                "class_embed_type",
                "addition_embed_type",
                "encoder_hid_dim_type",
                "time_cond_proj_dim",
            )
            if config.get(key)
            and not (key == "addition_embed_type" and added and config[key] == "text_time")
        ]
        if unsupported or config.get("time_embedding_type", "positional") != "positional":
            raise InputError(
                "splitting the UNet supports SD 1.x / 2.x UNets; this one uses "
                f"{', '.join(unsupported) or 'a non-positional time embedding'}"
            )
        channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
        full = {
            "block_out_channels": channels,
            "layers_per_block": config.get("layers_per_block", 2),
            "down_block_types": list(config["down_block_types"]),
            "up_block_types": list(config["up_block_types"]),
            "mid_block_type": config.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
            "time_embed_dim": config.get("time_embedding_dim") or 4 * int(channels[0]),
        }
        return cls(full, dims, base)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.config)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], dims: ModelDims, base: Component | None = None
    ) -> UNetLayout:
        try:
            return cls(data, dims, base)
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"manifest UNet layout is malformed: {e}") from None

    # ---- queries ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    def index(self, layer: str) -> int:
        return self._by_name[layer]

    @property
    def num_skips(self) -> int:
        return len(self._skip_producer)

    def reads(self, i: int) -> list[str]:
        """Tensors layer ``i`` reads (in the order of the section inputs they become)."""
        layer = self.layers[i]
        if layer.kind == "conv_in":
            return [SAMPLE, TIMESTEP, *self.added]
        names = [hidden_name(self.layers[i - 1].name)]
        if layer.kind in ("down", "mid", "up"):
            names.append(TIME_EMBEDDING)
        if layer.cross_attention:
            names.append(CONTEXT)
        if layer.consumes_skip is not None:
            names.append(skip_name(layer.consumes_skip))
        return names

    def writes(self, i: int) -> list[str]:
        layer = self.layers[i]
        if layer.kind == "conv_out":
            return [self.base.output_names[0]]
        names = [hidden_name(layer.name)]
        if layer.produces_skip is not None:
            names.append(skip_name(layer.produces_skip))
        if layer.kind == "conv_in":
            names.append(TIME_EMBEDDING)
        return names

    def spec(self, name: str) -> TensorSpec:
        """The descriptor of any tensor of the layout."""
        for t in (*self.base.inputs, *self.base.outputs):
            if t.name == name:
                return t
        if name == TIME_EMBEDDING:
            return TensorSpec(name, "float", ("unet_batch", self.time_embed_dim))
        if name.startswith("skip_"):
            layer = self._skip_producer[int(name[len("skip_") :])]
        elif name.startswith("hidden_"):
            layer = self.layers[self._by_name[name[len("hidden_") :]]]
        else:
            raise KeyError(name)
        return TensorSpec(
            name,
            "float",
            (
                "unet_batch",
                layer.channels,
                level_axis("latent_height", layer.level),
                level_axis("latent_width", layer.level),
            ),
        )

    def section_inputs(self, layers: Iterable[int]) -> list[str]:
        """What a section (layer indices, in order) needs from outside: UNet inputs first, in
        the UNet's order, then the time embedding, hidden states and skips."""
        written: set[str] = set()
        needed: list[str] = []
        for i in layers:
            needed += [n for n in self.reads(i) if n not in written and n not in needed]
            written.update(self.writes(i))
        base = self.base.input_names
        order = {n: k for k, n in enumerate(base)}

        def key(name: str) -> tuple[int, int, str]:
            if name in order:
                return (0, order[name], "")
            if name == TIME_EMBEDDING:
                return (1, 0, "")
            if name.startswith("hidden_"):
                return (2, 0, name)
            return (3, int(name.split("_")[1]), "")

        return sorted(needed, key=key)

    def section(
        self, name: str, layers: Sequence[int], outputs: Sequence[str], description: str
    ) -> Component:
        """The component descriptor of the section running ``layers`` and returning
        ``outputs`` (each written by one of those layers)."""
        written = {n for i in layers for n in self.writes(i)}
        missing = [n for n in outputs if n not in written]
        if missing:
            raise KeyError(f"section {name} does not compute {', '.join(missing)}")
        return Component(
            name,
            inputs=tuple(self.spec(n) for n in self.section_inputs(layers)),
            outputs=tuple(self.spec(n) for n in outputs),
            description=description,
        )

    def skip_branch_layers(self, branch: int) -> tuple[list[int], list[int]]:
        """(prefix, suffix) layer indices of DeepCache's shallow network at ``branch``: the
        layers up to the one making skip ``branch``, and from its consumer to the end."""
        if not 0 <= branch < self.num_skips:
            raise InputError(
                f"DeepCache skip branch must be 0..{self.num_skips - 1} for this UNet, got {branch}"
            )
        producer = self._by_name[self._skip_producer[branch].name]
        consumer = self._skip_consumer[branch]
        return list(range(producer + 1)), list(range(consumer, len(self.layers)))

    def hidden_before(self, i: int) -> str:
        return hidden_name(self.layers[i - 1].name)


def balanced_cuts(costs: Sequence[float], stages: int) -> list[int]:
    """Cut points (first layer of stages 1..S-1) that minimise the most expensive stage."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    # best[s][i]: minimal max-stage cost of layers[:i] in s stages; arg[s][i]: last cut.
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    arg = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], arg[s][i] = value, j
    cuts, i = [], n
    for s in range(stages, 1, -1):
        i = arg[s][i]
        cuts.append(i)
    return sorted(cuts)
