"""The engine-backend interface every component runs through.

A backend wraps one engine file (one component: text encoder, UNet, VAE decoder or encoder) and
exposes ``run(feeds) -> outputs`` keyed by the tensor names of the component descriptor. The
pipeline never sees which library executes the graph, so ONNX Runtime (CPU, CUDA) and TensorRT
are interchangeable per component.

Device residency: ``run`` returns host NumPy arrays by default. A GPU backend may instead return
an opaque device tensor for the outputs named in ``keep_on_device`` and accept such tensors back
as feeds, so data that is reused by later calls (the text embeddings, read by every UNet step)
stays on the GPU. On the CPU backend "device" tensors are plain arrays and nothing changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trt_sd.models.descriptors import Component
from trt_sd.models.errors import InputError, ManifestError
from trt_sd.models.lora import Patch
from trt_sd.models.manifest import ComponentEntry


@dataclass(frozen=True)
class IOSpec:
    """One engine input or output: name, concrete NumPy dtype, symbolic shape."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]


def io_specs(component: Component, entry: ComponentEntry) -> tuple[tuple[IOSpec, ...], ...]:
    """(inputs, outputs) of ``entry`` checked against the descriptor of ``component``.

    Names come from the descriptor (the single source of tensor names); dtypes come from the
    manifest, which records what the exported graph really takes (float16 for fp16 graphs).
    A manifest whose names disagree with the descriptor was written by an incompatible
    exporter, so it is refused instead of failing later inside the engine.
    """
    result = []
    for side, wanted, listed in (
        ("inputs", component.inputs, entry.inputs),
        ("outputs", component.outputs, entry.outputs),
    ):
        by_name = {str(t.get("name")): t for t in listed}
        specs = []
        for spec in wanted:
            if spec.name not in by_name:
                raise ManifestError(
                    f"manifest component {entry.name!r} lacks {side[:-1]} {spec.name!r} "
                    f"(has {', '.join(by_name) or 'none'}); re-export with this trt-sd version"
                )
            dtype = by_name[spec.name].get("dtype") or spec.resolved_dtype(entry.precision)
            try:
                np_dtype = np.dtype(dtype)
            except TypeError:
                raise ManifestError(
                    f"manifest component {entry.name!r}: unknown dtype {dtype!r} for {spec.name}"
                ) from None
            specs.append(IOSpec(spec.name, np_dtype, spec.shape))
        result.append(tuple(specs))
    return result[0], result[1]


class EngineBackend(ABC):
    """One loaded engine. ``run`` is safe to call from several threads at once."""

    #: short backend name shown in timings and errors ("onnxruntime-cpu", "tensorrt", ...)
    kind: str = ""

    def __init__(self, component: Component, entry: ComponentEntry) -> None:
        self.component = component
        self.entry = entry
        self.inputs, self.outputs = io_specs(component, entry)

    @property
    def name(self) -> str:
        return self.component.name

    def cast_feeds(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Feeds in the dtype the manifest says each input takes; device tensors pass through.

        Casting here (not in the pipeline) keeps the sampler maths in float32/float64 whatever
        precision an engine was built in.
        """
        missing = [s.name for s in self.inputs if s.name not in feeds]
        if missing:
            raise InputError(f"{self.name}: missing inputs {', '.join(missing)}")
        out: dict[str, Any] = {}
        for spec in self.inputs:
            value = feeds[spec.name]
            if isinstance(value, np.ndarray):
                value = np.ascontiguousarray(value, dtype=spec.dtype)
            out[spec.name] = value
        return out

    @abstractmethod
    def run(self, feeds: Mapping[str, Any], keep_on_device: Collection[str] = ()) -> dict[str, Any]:
        """Run the engine once. Outputs are NumPy arrays except those in ``keep_on_device``,
        which the backend may return as device tensors that only its ``run`` accepts."""

    def to_host(self, value: Any) -> np.ndarray:
        """A device tensor returned by :meth:`run` as a NumPy array."""
        return np.asarray(value)

    def with_weights(self, key: Hashable, patches: Callable[[], dict[str, Patch]]) -> EngineBackend:
        """This engine with some weights replaced (run-time LoRA, :mod:`trt_sd.runtime.lora`):
        ``patches()`` gives {ONNX initializer name: (where it lives, new value)}, computed from
        the base weights;
        ``key`` identifies the set, so a backend may cache what it built for it. Backends
        that cannot patch weights refuse in one line."""
        raise InputError(
            f"{self.name}: the {self.kind} backend cannot apply run-time LoRAs; use --backend "
            "onnxruntime-cpu (or a TensorRT engine), or fuse the LoRA at export (--lora)"
        )
