"""Fuse diffusers' attention into ONNX Runtime's ``com.microsoft.MultiHeadAttention`` (CPU).

The traced attention is ~20 nodes per layer: reshape/transpose of q, k, v to heads, a scale
``Mul`` on q and on k, ``MatMul -> Softmax -> MatMul``, transpose/reshape back. ONNX Runtime's
CPU provider runs that as separate kernels with the full ``heads x L x S`` score tensor in
memory; its ``MultiHeadAttention`` kernel takes the projected ``q, k, v`` (``[B, L, C]``) and
computes the same thing tiled. Measured on SD 1.5 at 32x32 latents (docs/benchmarks.md "## INT8"):
attention is ~20% of the INT8 UNet's time once the convolutions and projections run in int8,
and the fused kernel is ~35% faster on the 1024-token self-attention.

The export applies it to every fp32 and fp16 graph written for ``--backend onnxruntime`` (on
the fp32 SD 1.5 UNet it lifts ONNX Runtime CPU from 95% to 97% of its matmul peak on a quiet
machine, "## INT8" again; the CPU and CUDA providers both have fp16 kernels) and to the INT8
``onnxruntime`` Q/DQ flavour. Only for ONNX Runtime: TensorRT has no ``com.microsoft`` ops (it
fuses attention itself), so TensorRT exports and the ``tensorrt`` Q/DQ flavour never get it.

The export verifies the fused graph against torch like any other; if verification rejects it,
the plain graph is kept and verified instead (export/component_build.py), so the pass cannot
fail the export of a whole component. (The sections of a split / DeepCache UNet are verified
as a chain and have no such fallback: a rejected fusion fails that export, naming the stage.)

Matching is by the exporter's node names within one attention scope
(``.../attn1/to_q/MatMul``, ``.../attn1/Softmax``, ...); a scope that does not match the
expected shape, or whose q/k/v do not flow into the attention matmuls, is left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MS_DOMAIN = "com.microsoft"
#: Part of the export's content key: bump it when the pass matches or writes something new, so
#: engine directories exported by an older pass are rebuilt instead of reused.
REVISION = 2  # 2: projections with bias (the VAE's attention)


def _const_value(name: str, producers: dict[str, Any], inits: dict[str, Any]) -> Any:
    from onnx import numpy_helper

    if name in inits:
        tensor = inits[name]
        if tensor.data_location == tensor.EXTERNAL:  # a weight in the side file, not a scale
            return None
        return numpy_helper.to_array(tensor)
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
    return None


def _scale_of(scores: Any, producers: dict[str, Any], inits: dict[str, Any]) -> float | None:
    """The product of the constant ``Mul`` factors on both inputs of the score ``MatMul`` (the
    exporter scales q and k by ``head_dim ** -0.25`` each); None when the pattern differs."""
    scale = 1.0
    for name in scores.input:
        mul = producers.get(name)
        if mul is None or mul.op_type != "Mul":
            return None
        values = [_const_value(i, producers, inits) for i in mul.input]
        factor = next((v for v in values if v is not None and np.size(v) == 1), None)
        if factor is None:
            return None
        scale *= float(np.ravel(factor)[0])
    return scale


def _projection(nodes: dict[str, Any], proj: str) -> str:
    """The output of a q/k/v projection: its ``MatMul``, or the bias ``Add`` after it (the
    UNet's projections have no bias, the VAE's attention has)."""
    matmul = nodes[f"{proj}/MatMul"]
    add = nodes.get(f"{proj}/Add")
    if add is not None and matmul.output[0] in add.input:
        return str(add.output[0])
    return str(matmul.output[0])


#: Ops between a projection and the attention matmuls that only move or scale data.
_PASS_THROUGH = {"Mul", "Div", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast", "Identity"}
_PASS_THROUGH |= {"QuantizeLinear", "DequantizeLinear"}


def _reaches(name: str, source: str, producers: dict[str, Any], depth: int = 12) -> bool:
    """Whether ``name`` is ``source`` seen through up to ``depth`` reshapes / transposes /
    constant scalings (following each node's data input, its first)."""
    for _ in range(depth + 1):
        if name == source:
            return True
        node = producers.get(name)
        if node is None or node.op_type not in _PASS_THROUGH or not node.input:
            return False
        name = node.input[0]
    return False


def _float_source(name: str, producers: dict[str, Any]) -> str:
    """The float tensor behind ``name``: through a ``Q -> DQ`` pair when the layer reading it
    is quantized (the attention output must replace that tensor, not the dequantized copy)."""
    dq = producers.get(name)
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = producers.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            return str(q.input[0])
    return name


def _scopes(graph: Any) -> dict[str, dict[str, Any]]:
    """Module scopes (``/unet/.../attn1``, ``/decoder/mid_block/attentions.0``) -> their nodes
    by local name, the q/k/v/out projections' nodes included (``to_q/MatMul``)."""
    scopes: dict[str, dict[str, Any]] = {}
    for node in graph.node:
        scope, _, local = node.name.rpartition("/")
        if scope.rpartition("/")[2] not in ("to_q", "to_k", "to_v", "to_out.0"):
            scopes.setdefault(scope, {})[local] = node
        else:
            parent, _, proj = scope.rpartition("/")
            scopes.setdefault(parent, {})[f"{proj}/{local}"] = node
    return scopes


def fuse_attention(model: Any) -> int:
    """Replace every matching attention in ``model`` (in place); returns how many."""
    from onnx import helper

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in graph.initializer}
    replacements: dict[int, Any] = {}
    for scope, nodes in _scopes(graph).items():
        try:
            q, k, v = (_projection(nodes, p) for p in ("to_q", "to_k", "to_v"))
            softmax = nodes["Softmax"]
            scores = producers[softmax.input[0]]
            out_proj = nodes["to_out.0/MatMul"]
        except KeyError:
            continue
        if scores.op_type != "MatMul" or len(consumers.get(softmax.output[0], [])) != 1:
            continue
        (weighted,) = consumers[softmax.output[0]]
        # The data must flow q -> scores <- k and v -> (softmax @ v), not just the names match:
        # a variant (normalised q/k, extra projections) is left unfused rather than fused wrong.
        if not (
            weighted.op_type == "MatMul"
            and weighted.input[0] == softmax.output[0]
            and _reaches(scores.input[0], q, producers)
            and _reaches(scores.input[1], k, producers)
            and _reaches(weighted.input[1], v, producers)
            and _reaches(out_proj.input[0], weighted.output[0], producers)
        ):
            continue
        # The exporter scales q and k by head_dim ** -0.25 each (a constant Mul on both).
        scale = _scale_of(scores, producers, inits)
        if scale is None:
            continue
        head_dim = round(scale**-2)
        w_name = nodes["to_q/MatMul"].input[1]
        dq = producers.get(w_name)
        if dq is not None and dq.op_type == "DequantizeLinear":  # int8 weights
            w_name = dq.input[0]
        weight = inits.get(w_name)
        if weight is None or head_dim <= 0 or weight.dims[-1] % head_dim:
            continue
        heads = int(weight.dims[-1]) // head_dim
        attention_out = _float_source(out_proj.input[0], producers)
        old = producers.get(attention_out)
        if old is None:
            continue
        # The fused node takes the place of the node that produced the attention output (the
        # final reshape): its inputs, the q/k/v projections, are computed before that point.
        replacements[id(old)] = helper.make_node(
            "MultiHeadAttention",
            [q, k, v],
            [attention_out],
            name=f"{scope}/MultiHeadAttention",
            domain=MS_DOMAIN,
            num_heads=heads,
            scale=scale,
        )
    if not replacements:
        return 0
    order = [replacements.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(_live(order, {o.name for o in graph.output}))
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    used = {i for n in graph.node for i in n.input}
    dead_inits = [t for t in graph.initializer if t.name not in used]
    for t in dead_inits:
        graph.initializer.remove(t)
    return len(replacements)


def fuse_attention_file(path: Path, target: Path | None = None) -> int:
    """:func:`fuse_attention` on a saved ONNX file; the fused graph goes to ``target`` (default:
    ``path`` itself, replaced atomically), written only when something was fused.

    Weights in a ``.data`` side file stay where they are: only the graph is loaded and saved,
    and the fused nodes reference no new tensors. The few initializers the pass drops (the
    reshape shapes around attention) are small enough to be stored inline. ``target`` must sit
    beside ``path`` so the side file's relative location still resolves.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    fused = fuse_attention(model)
    if fused:
        partial = path.with_name(path.name + ".partial")
        onnx.save(model, str(partial))
        partial.replace(target or path)
    return fused


def _live(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """Nodes that contribute to ``outputs``, in their original order."""
    needed = set(outputs)
    live = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    return live[::-1]
