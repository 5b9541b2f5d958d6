"""Record, per exported engine, where each LoRA-targetable weight went (``<name>.lora.json``).

The TorchScript exporter names most weights after their module (``...conv1.weight``), but a
``Linear`` traced as ``MatMul`` gets its weight transposed and constant-folded into an
anonymous initializer (``onnx::MatMul_1234``), so names cannot be trusted. Weights are matched
by value instead: the torch module's weight (in the export dtype), and its transpose for 2-D
weights, are hashed before the module is freed; every float initializer of the final graph is
hashed from the bytes on disk and looked up. A value found twice (tied or identical weights) is
left out rather than guessed: patching it would change both users.

The attention fusion for ONNX Runtime (:mod:`.ort_attention`) feeds ``MultiHeadAttention`` the
projected q, k, v, so the projection weights stay separate initializers and need no packing.

The map also records each weight's byte range in the engine file (inline protobuf
``raw_data``, found by walking the wire format) or in its ``.data`` side file, so the runtime
memory-maps the base weights with NumPy, without ``onnx``.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from trt_sd.models.lora import MAP_VERSION, WeightRef

from .lora_fuse import LORA_COMPONENTS

__all__ = ["LORA_COMPONENTS", "MAP_SUFFIX", "lora_fingerprints", "write_lora_map"]

MAP_SUFFIX = ".lora.json"

Fingerprints = dict[bytes, list[tuple[str, bool]]]


def _digest(array: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(array.shape).encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.digest()


def lora_fingerprints(wrapper: nn.Module, fp16: bool) -> Fingerprints:
    """{hash of an engine-layout weight: [(module path, transposed)]} for every Linear and
    Conv2d under the export wrapper (paths relative to the wrapped diffusers / transformers
    model, as LoRA files name them)."""
    dtype = np.float16 if fp16 else np.float32
    out: Fingerprints = {}
    for name, module in wrapper.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d) or "." not in name:
            continue
        path = name.split(".", 1)[1]
        weight = module.weight.detach().float().cpu().numpy().astype(dtype)
        out.setdefault(_digest(weight), []).append((path, False))
        if weight.ndim == 2:
            out.setdefault(_digest(weight.T), []).append((path, True))
    return out


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: Any, start: int, end: int):  # type: ignore[no-untyped-def]
    """(field number, wire type, value start, value end) of one protobuf message."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            _, nxt = _varint(buf, pos)
        elif wire == 1:
            nxt = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            nxt = pos + length
        elif wire == 5:
            nxt = pos + 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield tag >> 3, wire, pos, nxt
        pos = nxt


def inline_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """{initializer name: (offset, length) of its ``raw_data`` in the .onnx file}
    (ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.name = 8, raw_data = 9)."""
    out: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field, wire, start, end in _fields(buf, 0, len(buf)):
            if field != 7 or wire != 2:
                continue
            for gfield, gwire, gstart, gend in _fields(buf, start, end):
                if gfield != 5 or gwire != 2:
                    continue
                name, raw = None, None
                for tfield, _, tstart, tend in _fields(buf, gstart, gend):
                    if tfield == 8:
                        name = bytes(buf[tstart:tend]).decode()
                    elif tfield == 9:
                        raw = (tstart, tend - tstart)
                if name is not None and raw is not None:
                    out[name] = raw
    return out


def write_lora_map(fingerprints: Fingerprints, path: Path, component: str) -> dict[str, Any]:
    """Match the graph at ``path`` against ``fingerprints`` and write ``<path stem>.lora.json``
    beside it; returns the manifest entry fields (``lora_map``: file, and how many modules)."""
    import onnx

    from .checkpoint import sha256_file

    model = onnx.load(str(path), load_external_data=False)
    inline = inline_ranges(path)
    dtypes = {onnx.TensorProto.FLOAT: ("float32", 4), onnx.TensorProto.FLOAT16: ("float16", 2)}
    found: dict[str, list[WeightRef]] = {}
    maps: dict[str, mmap.mmap] = {}
    handles = []
    try:
        for tensor in model.graph.initializer:
            if tensor.data_type not in dtypes or len(tensor.dims) not in (2, 4):
                continue
            dtype, size = dtypes[tensor.data_type]
            shape = tuple(int(d) for d in tensor.dims)
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                file, offset = info["location"], int(info.get("offset", 0))
                length = int(info.get("length", int(np.prod(shape)) * size))
            elif tensor.name in inline:
                file, (offset, length) = path.name, inline[tensor.name]
            else:
                continue  # float_data etc.: never the layout of a large weight
            if length != int(np.prod(shape)) * size:
                continue
            if file not in maps:
                handle = open(path.parent / file, "rb")  # noqa: SIM115 (closed below)
                handles.append(handle)
                maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            value = np.frombuffer(maps[file], dtype, int(np.prod(shape)), offset).reshape(shape)
            for module_path, transposed in fingerprints.get(_digest(value), []):
                ref = WeightRef(tensor.name, file, offset, length, dtype, shape, transposed)
                found.setdefault(module_path, []).append(ref)
    finally:  # the maps close when the last array view of them is gone
        for handle in handles:
            handle.close()
    owners: dict[str, int] = {}
    for refs in found.values():
        for ref in refs:
            owners[ref.initializer] = owners.get(ref.initializer, 0) + 1
    weights = {
        module: refs[0].to_json()
        for module, refs in sorted(found.items())
        if len(refs) == 1 and owners[refs[0].initializer] == 1
    }
    # Modules of the torch model with no weight in the graph: the exporter pruned them because
    # no output depends on them (SDXL's first text encoder ends at its penultimate layer). A
    # LoRA layer on one changes nothing, so the runtime skips it, as diffusers' result shows.
    # Found more than once (ambiguous) is not absent: patching those is refused.
    everything = {p for owners_ in fingerprints.values() for p, _ in owners_}
    absent = sorted(everything - set(found))
    target = path.with_name(path.stem + MAP_SUFFIX)
    data = {"version": MAP_VERSION, "component": component, "weights": weights, "absent": absent}
    target.write_text(json.dumps(data), "utf-8")
    return {
        "lora_map": {"file": target.name, "sha256": sha256_file(target)},
        "lora_modules": len(weights),
    }
