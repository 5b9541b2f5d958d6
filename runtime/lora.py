"""Run-time LoRA: the same engines, other weights, no re-export.

``Pipeline.__call__(..., loras=[(path, scale), ...])`` runs one call on engines whose
LoRA-targetable weights are ``base + sum(scale * delta)``. How:

* the export recorded, per engine, where each Linear / Conv weight lives (``lora_map``,
  :mod:`trt_sd.models.lora.weights`); LoRA layers are matched to those modules by name;
* the patched values are computed in NumPy from the memory-mapped BASE weights every time, so
  a LoRA set's weights never depend on what ran before (A -> B -> A is A, ``[]`` is the base);
* each backend turns them into an engine view (:meth:`EngineBackend.with_weights`): ONNX
  Runtime creates a session with the patched initializers and keeps a few in an LRU keyed by
  the LoRA set; TensorRT refits its engine from the base weights.

The call runs on a shallow copy of the pipeline whose ``engines`` are those views, so concurrent
calls with different LoRA sets never share weights and the pipeline itself is never modified.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trt_sd.models.errors import InputError
from trt_sd.models.lora import (
    LoraFile,
    LoraSpec,
    Patch,
    WeightMap,
    bind,
    load_weight_map,
    normalise_loras,
    patched_weights,
    read_lora,
)

__all__ = ["LoraSet", "LoraSupport", "apply_loras", "lora_params"]

#: parsed LoRA files kept in memory (a service alternates between a few)
FILE_CACHE = 16


@dataclass(frozen=True)
class LoraSet:
    """The resolved LoRAs of one call: files (parsed), scales, and the set's identity."""

    files: tuple[tuple[LoraFile, float], ...]

    @property
    def key(self) -> tuple[tuple[str, float], ...]:
        return tuple((f.sha256, scale) for f, scale in self.files)

    def params(self) -> list[dict[str, Any]]:
        return [{"name": f.name, "scale": scale, "hash": f.short_hash} for f, scale in self.files]


class LoraSupport:
    """One pipeline's LoRA state: its engines' weight maps and a cache of parsed files."""

    def __init__(self, engine_dir: Path, manifest: Any) -> None:
        self.engine_dir = Path(engine_dir)
        self.maps_files = {
            name: entry.extra["lora_map"]["file"]
            for name, entry in manifest.components.items()
            if isinstance(entry.extra.get("lora_map"), dict)
        }
        self._maps: dict[str, WeightMap] = {}
        self._files: OrderedDict[tuple, LoraFile] = OrderedDict()
        self._lock = threading.Lock()

    def maps(self) -> dict[str, WeightMap]:
        with self._lock:
            for name, file in self.maps_files.items():
                if name not in self._maps:
                    self._maps[name] = load_weight_map(self.engine_dir, file, name)
            return dict(self._maps)

    def read(self, path: Path) -> LoraFile:
        """A parsed LoRA file, from the cache while the file is unchanged."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise InputError(f"LoRA file {path} does not exist") from None
        except OSError as e:
            raise InputError(f"LoRA file {path} cannot be read ({e.strerror})") from None
        ident = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            if ident in self._files:
                self._files.move_to_end(ident)
                return self._files[ident]
        lora = read_lora(path)
        with self._lock:
            self._files[ident] = lora
            while len(self._files) > FILE_CACHE:
                self._files.popitem(last=False)
        return lora

    def resolve(self, loras: Any) -> LoraSet:
        specs: tuple[LoraSpec, ...] = normalise_loras(loras)
        return LoraSet(tuple((self.read(s.path), s.scale) for s in specs))

    def patches(self, lora_set: LoraSet) -> dict[str, dict[str, Patch]]:
        """{component: {initializer: patched weight}}; every file is bound (checked against
        the model) before anything is computed, so a bad file fails the call cleanly."""
        maps = self.maps()
        if not maps:
            raise InputError(
                "this engine directory has no LoRA weight maps (exported before run-time LoRA "
                "support, or as INT8 / a split UNet); re-export it, or fuse the LoRA with "
                "`trt-sd export --lora`"
            )
        bound = [(scale, bind(lora, maps)) for lora, scale in lora_set.files]
        out: dict[str, dict[str, Patch]] = {}
        for component, wmap in maps.items():
            layers = [(scale, b[component]) for scale, b in bound if component in b]
            if layers:
                out[component] = patched_weights(wmap, layers)
        return out


def apply_loras(pipe: Any, loras: Any) -> tuple[Any, LoraSet]:
    """(the pipeline to run this call on, the resolved set): ``pipe`` itself for no LoRAs,
    else a shallow copy whose patched components are engine views with the LoRA weights."""
    support: LoraSupport = pipe.lora_support
    lora_set = support.resolve(loras)
    if not lora_set.files:
        return pipe, lora_set
    cache: dict[str, Any] = {}

    def patches_for(component: str) -> dict[str, Patch]:
        if "all" not in cache:
            cache["all"] = support.patches(lora_set)
        return cache["all"].get(component, {})

    touched = _touched_components(support, lora_set)
    others = [n for n in pipe.engines if n.startswith("unet") and n != "unet"]
    if others and "unet" in touched:
        raise InputError(
            f"run-time LoRA patches the whole UNet only; this engine directory also has "
            f"{', '.join(others)} (DeepCache / split UNet): load it without those, or fuse the "
            "LoRA at export (trt-sd export --lora)"
        )
    engines = dict(pipe.engines)
    for name in touched:
        if not hasattr(pipe.engines[name], "with_weights"):
            raise InputError(
                f"{name} is split across devices / stages; run-time LoRA needs it whole"
            )
        engines[name] = pipe.engines[name].with_weights(lora_set.key, lambda n=name: patches_for(n))
    view = copy.copy(pipe)
    view.engines = engines
    return view, lora_set


def _touched_components(support: LoraSupport, lora_set: LoraSet) -> list[str]:
    """Components some LoRA of the set adapts (binding checks every file first)."""
    maps = support.maps()
    if not maps:
        support.patches(lora_set)  # raises the "no weight maps" InputError
    touched: set[str] = set()
    for lora, _ in lora_set.files:
        touched.update(bind(lora, maps))
    return sorted(touched)


def lora_params(lora_set: LoraSet) -> dict[str, Any]:
    """What a result's params (and its PNG infotext) record about the LoRAs."""
    return {"loras": lora_set.params()} if lora_set.files else {}
