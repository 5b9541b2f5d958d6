"""Fake-quantized Conv2d / Linear for quantization-aware training (torch's own kernels).

Each quantized layer is wrapped by :class:`QuantLayer`: its input (per tensor), its weight (per
output channel) and, for the ``onnxruntime`` flavour's Convs, its output pass through
:class:`FakeQuant`, which rounds to the exact grid the Q/DQ graph uses (int8 symmetric,
weights clipped to +-127, activations to [-128, 127]), so the trained model is the graph.

Scales are learnable LSQ-style (Esser et al. 2020): ``torch._fake_quantize_learnable_per_*``
give the straight-through gradient for the input and the LSQ gradient for the scale, scaled by
``1 / sqrt(elements_per_scale * 127)``. These are torch's CPU kernels; nvidia-modelopt's
fake-quant has no CPU backward.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from .qdq_graph import INT8_MAX, LayerRanges

MIN_SCALE = 1e-8


class FakeQuant(nn.Module):
    """Symmetric int8 fake quantization with a learnable scale (per tensor or per channel).

    The scale is stored as its logarithm: Adam then moves every scale by a similar *relative*
    step whatever its magnitude (weight scales of small layers are ~1e-4, activation scales
    ~1e-1; one absolute learning rate cannot serve both)."""

    def __init__(self, amax: torch.Tensor, *, axis: int | None, narrow: bool) -> None:
        super().__init__()
        amax = amax.detach().float().reshape(-1)
        self.log_scale = nn.Parameter(torch.log((amax / INT8_MAX).clamp(min=MIN_SCALE)))
        self.zero_point: torch.Tensor
        self.register_buffer("zero_point", torch.zeros_like(amax))
        self.axis = axis
        self.quant_min = -INT8_MAX if narrow else -INT8_MAX - 1
        self.quant_max = INT8_MAX

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.log_scale.exp()
        per_scale = x.numel() / scale.numel()
        grad_factor = 1.0 / math.sqrt(per_scale * self.quant_max)
        if self.axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, scale, self.zero_point, self.quant_min, self.quant_max, grad_factor
            )
        return torch._fake_quantize_learnable_per_channel_affine(
            x, scale, self.zero_point, self.axis, self.quant_min, self.quant_max, grad_factor
        )

    def amax(self) -> torch.Tensor:
        return self.log_scale.detach().exp() * INT8_MAX


class QuantLayer(nn.Module):
    """A Conv2d / Linear computing on fake-quantized input and weight (and output); weight only
    when its ranges have no ``input_amax``."""

    def __init__(self, inner: nn.Conv2d | nn.Linear, ranges: LayerRanges) -> None:
        super().__init__()
        self.inner = inner
        weight = inner.weight.detach()
        w_amax = (
            torch.as_tensor(ranges.weight_amax)
            if ranges.weight_amax is not None
            else weight.abs().reshape(weight.shape[0], -1).amax(dim=1)
        )
        self.input_quant = (
            FakeQuant(torch.tensor(ranges.input_amax), axis=None, narrow=False)
            if ranges.input_amax is not None
            else None
        )
        self.weight_quant = FakeQuant(w_amax, axis=0, narrow=True)
        self.output_quant = (
            FakeQuant(torch.tensor(ranges.output_amax), axis=None, narrow=False)
            if ranges.output_amax is not None
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        if self.input_quant is not None:
            x = self.input_quant(x)
        w = self.weight_quant(inner.weight)
        if isinstance(inner, nn.Conv2d):
            y = inner._conv_forward(x, w, inner.bias)
        else:
            y = nn.functional.linear(x, w, inner.bias)
        return self.output_quant(y) if self.output_quant is not None else y

    def ranges(self) -> LayerRanges:
        """The (possibly trained) ranges in the form the graph rewrite takes."""
        return LayerRanges(
            input_amax=float(self.input_quant.amax()) if self.input_quant else None,
            weight_amax=self.weight_quant.amax().numpy().astype("float32"),
            output_amax=float(self.output_quant.amax()) if self.output_quant else None,
        )


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def attach(model: nn.Module, ranges: dict[str, LayerRanges]) -> dict[str, QuantLayer]:
    """Replace each named layer of ``model`` by its :class:`QuantLayer` (in place)."""
    layers = {}
    for name, r in ranges.items():
        parent, attr = _parent(model, name)
        layer = QuantLayer(getattr(parent, attr), r)
        setattr(parent, attr, layer)
        layers[name] = layer
    return layers


def detach(model: nn.Module, layers: dict[str, QuantLayer]) -> None:
    """Put the (fine-tuned) original layers back: the model is a plain float model again."""
    for name, layer in layers.items():
        parent, attr = _parent(model, name)
        setattr(parent, attr, layer.inner)


def scale_parameters(layers: dict[str, QuantLayer]) -> Iterator[nn.Parameter]:
    for layer in layers.values():
        for module in (layer.input_quant, layer.weight_quant, layer.output_quant):
            if module is not None:
                yield module.log_scale
