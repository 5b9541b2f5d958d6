"""Where a component's LoRA-targetable weights live in its engine, and the patched values.

The export writes, per engine, ``<component>.lora.json``: for every Linear / Conv module of
the torch model it found in the graph, the ONNX initializer holding its weight, that weight's
layout (a torch ``Linear`` becomes ``MatMul`` with the TRANSPOSED weight; ``Gemm`` and ``Conv``
keep torch's), dtype, shape and byte range in the engine file (or its ``.data`` side file).
The runtime memory-maps those ranges with NumPy (no ``onnx`` import) and computes
``base + sum(scale * delta)`` in float32, cast back to the engine's dtype; it always starts
from the base bytes, so switching LoRAs never accumulates (A -> B -> A gives A exactly).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import InputError, ManifestError
from .formats import LoraFile, LoraLayer
from .sgm_names import sgm_to_diffusers

__all__ = [
    "MAP_VERSION",
    "Patch",
    "WeightMap",
    "WeightRef",
    "bind",
    "layer_delta",
    "load_weight_map",
]

MAP_VERSION = 1
_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class WeightRef:
    """One targetable weight in an engine file."""

    initializer: str
    file: str  # relative to the engine directory
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]  # as stored in the engine
    transposed: bool  # the engine holds W.T (torch Linear as MatMul)

    @property
    def module_shape(self) -> tuple[int, ...]:
        """The torch module's weight shape ((out, in) or OIHW)."""
        return self.shape[::-1] if self.transposed else self.shape

    def to_json(self) -> dict:
        return {
            "initializer": self.initializer,
            "file": self.file,
            "offset": self.offset,
            "length": self.length,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "transposed": self.transposed,
        }


@dataclass(frozen=True)
class WeightMap:
    """A component's targetable weights, keyed by diffusers module path."""

    component: str
    engine_dir: Path
    weights: dict[str, WeightRef]
    #: modules of the model with no weight in the graph (pruned: no output depends on them)
    absent: frozenset[str] = frozenset()

    def flat_index(self) -> dict[str, str]:
        """kohya's ``_``-joined module name -> module path."""
        return {path.replace(".", "_"): path for path in (*self.weights, *self.absent)}

    def base(self, path: str) -> np.ndarray:
        """The base weight of module ``path`` in the engine's layout (a read-only memory map)."""
        ref = self.weights[path]
        return np.memmap(
            self.engine_dir / ref.file, ref.dtype, "r", ref.offset, ref.shape, order="C"
        )


def load_weight_map(engine_dir: Path, file: str, component: str) -> WeightMap:
    """Read and check ``engine_dir/file`` (untrusted like the manifest: every range must lie
    inside its file and match its dtype and shape). ManifestError on anything else."""
    where = f"LoRA weight map {file} ({component})"
    try:
        data = json.loads((engine_dir / file).read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise ManifestError(f"{where} cannot be read: {e}") from None
    if not isinstance(data, dict) or data.get("version") != MAP_VERSION:
        raise ManifestError(f"{where}: unknown version; re-export with this trt-sd version")
    sizes: dict[str, int] = {}
    weights: dict[str, WeightRef] = {}
    for path, entry in (data.get("weights") or {}).items():
        try:
            ref = WeightRef(
                str(entry["initializer"]),
                str(entry["file"]),
                int(entry["offset"]),
                int(entry["length"]),
                str(entry["dtype"]),
                tuple(int(d) for d in entry["shape"]),
                bool(entry["transposed"]),
            )
        except (KeyError, TypeError, ValueError):
            raise ManifestError(f"{where}: malformed entry for {path!r}") from None
        name = os.path.normpath(ref.file)
        if name.startswith("..") or os.path.isabs(name) or os.sep in name:
            raise ManifestError(f"{where}: {path!r} points outside the engine directory")
        if ref.file not in sizes:
            try:
                sizes[ref.file] = (engine_dir / ref.file).stat().st_size
            except OSError:
                raise ManifestError(f"{where}: {ref.file} is missing") from None
        expected = int(np.prod(ref.shape)) * (4 if ref.dtype == "float32" else 2)
        if (
            ref.dtype not in _DTYPES
            or len(ref.shape) not in (2, 4)
            or ref.offset < 0
            or ref.length != expected
            or ref.offset + ref.length > sizes[ref.file]
        ):
            raise ManifestError(f"{where}: entry for {path!r} does not fit its file")
        weights[str(path)] = ref
    absent = data.get("absent") or []
    if not isinstance(absent, list) or not all(isinstance(a, str) for a in absent):
        raise ManifestError(f"{where}: 'absent' must be a list of module paths")
    return WeightMap(component, engine_dir, weights, frozenset(absent))


def layer_delta(layer: LoraLayer, shape: tuple[int, ...]) -> np.ndarray:
    """``up @ down`` (times alpha / rank) in the module's weight shape ``shape``."""
    rank = layer.down.shape[0]
    down = layer.down.reshape(rank, -1)
    up = layer.up.reshape(layer.up.shape[0], rank)
    if layer.mid is None:
        delta = up @ down
        if layer.down.ndim == 4:  # conv: (out, in*kh*kw) -> OIHW
            delta = delta.reshape(up.shape[0], *layer.down.shape[1:])
    else:  # LoCon Tucker: up (out, r), mid (r, r, kh, kw), down (r, in)
        delta = np.einsum("or,rshw,si->oihw", up, layer.mid, down, optimize=True)
    return np.asarray(delta, np.float32).reshape(shape) * np.float32(layer.scale)


def _lookup(wmap: WeightMap, flat_index: dict[str, str], key: str, flat: bool) -> str | bool | None:
    """The module path ``key`` names; False for a module the graph pruned (the layer has no
    effect); None if the model has no such module. CLIP's modules sit under ``text_model.``
    in some transformers versions and not in others, and files name them either way: both
    are tried."""
    prefix = "text_model_" if flat else "text_model."
    other = key[len(prefix) :] if key.startswith(prefix) else prefix + key
    if flat and wmap.component == "unet":  # kohya SDXL: original (SGM) block names
        other = sgm_to_diffusers(key, (*wmap.weights, *wmap.absent)) or other
    for candidate in (key, other):
        path = flat_index.get(candidate) if flat else candidate
        if path is not None and path in wmap.weights:
            return path
        if path is not None and path in wmap.absent:
            return False
    return None


def bind(lora: LoraFile, maps: dict[str, WeightMap]) -> dict[str, list[tuple[str, LoraLayer]]]:
    """Match every layer of ``lora`` to a weight of the model: {component: [(module path,
    layer)]}. InputError naming the file when a layer targets a component or module this
    model lacks, or its delta does not fit the weight (a LoRA for another architecture)."""
    out: dict[str, list[tuple[str, LoraLayer]]] = {}
    missing: list[str] = []
    indexes = {name: m.flat_index() for name, m in maps.items()}
    for layer in lora.layers:
        if layer.component not in maps:
            raise InputError(
                f"LoRA file {lora.path.name}: it adapts {layer.component}, which this engine "
                f"directory has no LoRA-patchable engine for (patchable: "
                f"{', '.join(sorted(maps)) or 'none'}); a LoRA for another model family?"
            )
        wmap = maps[layer.component]
        path = _lookup(wmap, indexes[layer.component], layer.key, layer.flat)
        if path is False:
            continue  # pruned from the graph: no output depends on it
        if not isinstance(path, str):
            missing.append(layer.label)
            continue
        shape = wmap.weights[path].module_shape
        down, up = layer.down.shape, layer.up.shape
        fits = up[0] == shape[0] and int(np.prod(down[1:])) * (
            1 if layer.mid is None else int(np.prod(layer.mid.shape[2:]))
        ) == int(np.prod(shape[1:]))
        if not fits:
            raise InputError(
                f"LoRA file {lora.path.name}: layer {layer.label} (down {down}, up {up}) does "
                f"not fit the model's weight {shape}; a LoRA for another architecture?"
            )
        out.setdefault(layer.component, []).append((path, layer))
    if missing:
        raise InputError(
            f"LoRA file {lora.path.name}: {len(missing)} of {len(lora.layers)} layers adapt "
            f"modules this model does not have (first: {missing[0]}); a LoRA for another "
            "model family or architecture?"
        )
    return out


class Patch(NamedTuple):
    """A patched weight: where it lives in the engine, and its new value (engine layout)."""

    ref: WeightRef
    value: np.ndarray


def patched_weights(
    wmap: WeightMap, bound: Sequence[tuple[float, list[tuple[str, LoraLayer]]]]
) -> dict[str, Patch]:
    """{initializer name: base + sum(scale * delta)} in the engine's layout and dtype for the
    modules the LoRAs in ``bound`` ((user scale, bound layers) per LoRA) touch."""
    sums: dict[str, np.ndarray] = {}
    for scale, layers in bound:
        for path, layer in layers:
            ref = wmap.weights[path]
            delta = layer_delta(layer, ref.module_shape) * np.float32(scale)
            sums[path] = delta if path not in sums else sums[path] + delta
    out: dict[str, Patch] = {}
    for path, delta in sums.items():
        ref = wmap.weights[path]
        engine_delta = delta.T if ref.transposed else delta
        value = np.asarray(wmap.base(path), np.float32) + engine_delta
        out[ref.initializer] = Patch(ref, np.ascontiguousarray(value.astype(ref.dtype)))
    return out
