"""Float ONNX graph + calibrated ranges -> explicit Q/DQ (QuantizeLinear / DequantizeLinear) graph.

Why rewrite the exported float graph instead of exporting fake-quantized torch modules: the fp32
graph is already exported and verified, the rewrite controls exactly which tensors carry Q/DQ
(the thing both TensorRT and ONNX Runtime key their int8 kernels on), and the int8 weights are
written as int8 initializers (a 4x smaller file) rather than float weights behind a Q node that
every consumer would have to fold.

The torch exporter names every node after its module scope (``/unet/down_blocks.0/resnets.0/
conv1/Conv``), so a calibrated torch module (``unet.down_blocks.0.resnets.0.conv1``) finds its
Conv / MatMul / Gemm node by name; a planned layer that finds no node is an error, never a
silent skip.

Format (both flavours): weights int8 symmetric (zero point int8 0) per output channel (Conv:
axis 0 of ``[K, C, kh, kw]``; MatMul: axis 1 of ``[in, out]``, the output channel; Gemm: the
axis ``transB`` makes the output one); activations symmetric per tensor, one Q/DQ pair per
consuming layer. Flavours (``QDQ_FLAVOURS``):

* ``tensorrt``: Q/DQ only on the inputs of quantized layers, float bias, float output: what
  TensorRT's strongly typed / explicit-quantization builder fuses into int8 kernels (NVIDIA's
  own diffusion recipe places them the same way).
* ``onnxruntime``: the same places, plus what ONNX Runtime's CPU provider needs to pick its int8
  kernels (measured, see docs/benchmarks.md "## INT8"): its ``DQ -> Conv`` rewrite to
  ``QLinearConv`` only fires with a ``Q`` on the Conv output, so each quantized Conv's output is
  quantized too (per tensor, calibrated); and its level-1 ``MatMul + Add -> Gemm`` fusion
  swallows a Linear's bias before the int8 rewrite and leaves a float Gemm, so the bias is
  stored as ``[1, ..., N]`` (which that fusion skips) and the MatMul becomes
  ``MatMulIntegerToFloat``. Activations are uint8 with zero point 128 (the same symmetric grid,
  shifted): ONNX Runtime's x86 int8 kernels are U8S8 (VNNI ``vpdpbusd`` multiplies u8 by s8),
  and although it converts an s8 ``Q -> DQ`` pair to u8 itself, it does so only where the ``Q``
  feeds a single ``DQ``; a Conv output read by several layers then stays s8 and its
  ``QLinearConv`` fusion fails (19 of 82 SD 1.5 Convs, measured). TensorRT takes int8 Q/DQ
  only, so this flavour is for ONNX Runtime (the export also fuses its attention into
  ``com.microsoft.MultiHeadAttention``, :mod:`trt_sd.export.ort_attention`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

QDQ_FLAVOURS = ("tensorrt", "onnxruntime")
INT8_MAX = 127
#: Ops whose weight input (index 1) is quantized per output channel.
QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class LayerRanges:
    """Calibrated (or learned) ranges of one quantized layer, in float units.

    ``input_amax`` ``None`` quantizes the weights only (the layer computes in float on
    dequantized int8 weights: the file shrinks, the activations keep full precision).
    ``weight_amax`` holds one value per output channel; ``None`` means max |w| per channel
    (post-training quantization). ``output_amax`` is used by the ``onnxruntime`` flavour on
    Conv outputs only.
    """

    input_amax: float | None
    weight_amax: np.ndarray | None = None
    output_amax: float | None = None


@dataclass
class QdqSummary:
    """What the rewrite did, for the manifest and the tests."""

    flavour: str
    quantized: dict[str, str] = field(default_factory=dict)  # module -> op type
    output_quantized: list[str] = field(default_factory=list)
    weight_only: list[str] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0

    def op_counts(self) -> dict[str, int]:
        """Layers with int8 inputs and weights, per op type (weight-only ones not counted)."""
        skip = set(self.weight_only)
        return dict(Counter(op for m, op in self.quantized.items() if m not in skip))


def tensor_bytes(tensor: Any) -> int:
    """Bytes of one initializer's values, however the TensorProto stores them."""
    from onnx import helper

    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def module_of(node_name: str) -> str:
    """``/unet/down_blocks.0/resnets.0/conv1/Conv`` -> ``unet.down_blocks.0.resnets.0.conv1``."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1])


def symmetric_scale(amax: np.ndarray | float) -> np.ndarray:
    """``amax / 127``; an all-zero channel gets scale 1 (its values quantize to 0 either way)."""
    amax = np.asarray(amax, dtype=np.float32)
    return np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)


def quantize_weight(weight: np.ndarray, axis: int, amax: np.ndarray | None) -> tuple:
    """Per-channel symmetric int8 weights along ``axis``: (int8 array, float32 scales)."""
    moved = np.moveaxis(weight, axis, 0)
    if amax is None:
        amax = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scale = symmetric_scale(amax)
    if scale.shape != (moved.shape[0],):
        raise ValueError(f"weight amax has shape {scale.shape}, expected ({moved.shape[0]},)")
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.rint(weight / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def weight_axis(node: Any) -> int:
    """The output-channel axis of a node's weight (input 1)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "MatMul":
        return 1
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return 0 if trans_b else 1


class _Graph:
    """Index of one ONNX graph: initializers by name, consumers per tensor, unique names."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in self.graph.output}
        self._names = {n.name for n in self.graph.node} | set(self.inits)
        self._names |= {o for n in self.graph.node for o in n.output}
        self.new_nodes: dict[int, list[Any]] = {}  # insert before node index

    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def add_init(self, base: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.unique(base)
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name])

    def drop_init_if_unused(self, name: str) -> None:
        if self.consumers.get(name):
            return
        tensor = self.inits.pop(name, None)
        if tensor is not None:
            self.graph.initializer.remove(tensor)


def _qdq_pair(
    g: _Graph, tensor: str, amax: float, prefix: str, unsigned: bool
) -> tuple[list[Any], str]:
    """Q -> DQ nodes for one activation tensor; returns (nodes, dequantized tensor name).

    ``unsigned``: uint8 with zero point 128 (the same symmetric grid shifted by 128), else
    int8 with zero point 0."""
    from onnx import helper

    scale = g.add_init(f"{prefix}.s", symmetric_scale(amax).reshape(()))
    zero_point = np.full((), 128, np.uint8) if unsigned else np.zeros((), np.int8)
    zero = g.add_init(f"{prefix}.z", zero_point)
    q_out, dq_out = g.unique(f"{prefix}.q"), g.unique(f"{prefix}.dq")
    nodes = [
        helper.make_node(
            "QuantizeLinear", [tensor, scale, zero], [q_out], name=g.unique(f"{prefix}/Q")
        ),
        helper.make_node(
            "DequantizeLinear", [q_out, scale, zero], [dq_out], name=g.unique(f"{prefix}/DQ")
        ),
    ]
    return nodes, dq_out


def _quantize_weight_input(g: _Graph, node: Any, ranges: LayerRanges, prefix: str) -> list[Any]:
    from onnx import helper

    w_name = node.input[1]
    if w_name not in g.inits:
        raise ValueError(f"{node.name}: weight {w_name!r} is not a constant; cannot quantize")
    weight = g.array(w_name).astype(np.float32)
    axis = weight_axis(node)
    q, scale = quantize_weight(weight, axis, ranges.weight_amax)
    q_name = g.add_init(f"{prefix}.w8", q)
    s_name = g.add_init(f"{prefix}.ws", scale)
    z_name = g.add_init(f"{prefix}.wz", np.zeros(scale.shape, np.int8))
    dq_out = g.unique(f"{prefix}.wdq")
    g.consumers[w_name].remove(node)
    node.input[1] = dq_out
    g.drop_init_if_unused(w_name)
    dq = helper.make_node(
        "DequantizeLinear",
        [q_name, s_name, z_name],
        [dq_out],
        name=g.unique(f"{prefix}/wDQ"),
        axis=axis,
    )
    return [dq]


def _reshape_linear_bias(g: _Graph, node: Any) -> None:
    """``MatMul -> Add(bias[N])``: store the bias as ``[1, ..., 1, N]`` (see module docstring)."""
    consumers = g.consumers.get(node.output[0], [])
    if len(consumers) != 1 or consumers[0].op_type != "Add":
        return
    add = consumers[0]
    other = [i for i in add.input if i != node.output[0]]
    if len(other) != 1 or other[0] not in g.inits:
        return
    bias = g.array(other[0])
    if bias.ndim != 1:
        return
    rank = 3  # diffusers' Linear layers run on (batch, tokens, channels)
    name = g.add_init(f"{other[0]}_rank{rank}", bias.reshape((1,) * (rank - 1) + (-1,)))
    idx = list(add.input).index(other[0])
    g.consumers[other[0]].remove(add)
    g.drop_init_if_unused(other[0])
    add.input[idx] = name
    g.consumers.setdefault(name, []).append(add)


def _quantize_output(g: _Graph, node: Any, amax: float, prefix: str, unsigned: bool) -> list[Any]:
    """Insert Q -> DQ after ``node`` and rewire its consumers to the dequantized tensor."""
    out = node.output[0]
    consumers = list(g.consumers.get(out, []))
    nodes, dq_out = _qdq_pair(g, out, amax, f"{prefix}.out", unsigned)
    for consumer in consumers:
        for i, name in enumerate(consumer.input):
            if name == out:
                consumer.input[i] = dq_out
    g.consumers[out] = [nodes[0]]
    g.consumers[dq_out] = consumers
    return nodes


def insert_qdq(model: Any, plan: dict[str, LayerRanges], flavour: str = "tensorrt") -> QdqSummary:
    """Rewrite ``model`` (an ``onnx.ModelProto``, modified in place) so every layer named in
    ``plan`` (torch module name -> ranges) runs on int8 inputs and weights."""
    if flavour not in QDQ_FLAVOURS:
        raise ValueError(f"unknown Q/DQ flavour {flavour!r}; choose from {', '.join(QDQ_FLAVOURS)}")
    g = _Graph(model)
    unsigned = flavour == "onnxruntime"
    summary = QdqSummary(flavour=flavour)
    summary.weight_bytes_before = sum(tensor_bytes(t) for t in g.inits.values())
    original = list(g.graph.node)
    inserted: dict[int, tuple[list[Any], list[Any]]] = {}
    for index, node in enumerate(original):
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        module = module_of(node.name)
        ranges = plan.get(module)
        if ranges is None or node.input[1] not in g.inits:
            continue
        if module in summary.quantized:
            raise ValueError(f"two {node.op_type} nodes map to module {module!r}")
        prefix = module
        before = _quantize_weight_input(g, node, ranges, prefix)
        after: list[Any] = []
        summary.quantized[module] = node.op_type
        if ranges.input_amax is None:
            summary.weight_only.append(module)
            inserted[index] = (before, after)
            continue
        act_nodes, dq_out = _qdq_pair(g, node.input[0], ranges.input_amax, f"{prefix}.in", unsigned)
        g.consumers[node.input[0]].remove(node)
        node.input[0] = dq_out
        before += act_nodes
        if flavour == "onnxruntime":
            if node.op_type == "Conv" and node.output[0] not in g.outputs:
                if ranges.output_amax is None:
                    raise ValueError(f"{module}: the onnxruntime flavour needs an output range")
                after = _quantize_output(g, node, ranges.output_amax, prefix, unsigned)
                summary.output_quantized.append(module)
            elif node.op_type == "MatMul":
                _reshape_linear_bias(g, node)
        inserted[index] = (before, after)
    missing = sorted(set(plan) - set(summary.quantized))
    if missing:
        raise ValueError(
            f"{len(missing)} planned layers have no quantizable node in the graph "
            f"(first: {missing[0]!r}); the exporter's node names changed?"
        )
    ordered: list[Any] = []
    for index, node in enumerate(original):
        before, after = inserted.get(index, ([], []))
        ordered += [*before, node, *after]
    del g.graph.node[:]
    g.graph.node.extend(ordered)
    # Intermediate shape annotations of the float export: optional (ONNX Runtime and TensorRT
    # infer shapes), stale where Q/DQ now sit, and ~3% of a small model's file.
    del g.graph.value_info[:]
    summary.weight_bytes_after = sum(tensor_bytes(t) for t in g.inits.values())
    return summary
