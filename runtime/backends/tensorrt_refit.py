"""Run-time LoRA on TensorRT / TensorRT-RTX: refit a refittable engine, always from the base.

Engines exported with ``--refittable`` keep their weights replaceable. A LoRA set is applied
with ``trt.Refitter.set_named_weights`` (the ONNX initializer names the export recorded in the
component's ``lora_map``, in the graph's layout and dtype) and ``refit_cuda_engine``. Every refit
writes, for each weight the previous set had patched and this one does not, the BASE value
back (memory-mapped from the ONNX file the engine was built from), and the new set's values are
computed from the base too (:mod:`trt_sd.runtime.lora`): A -> B -> A gives exactly A and
``[]`` exactly the base, whatever ran before.

One engine holds one weight set at a time, so each call checks, under the engine's refit lock,
that the engine holds its set and refits if not (a captured CUDA graph is dropped: the refit
may move weights). Calls alternating between sets therefore pay a refit each; the service's
batching groups requests by LoRA set, so a set runs its calls back to back.

Needs a GPU: written against the TensorRT 10 / TensorRT-RTX API (type-checked in CI), run by
tests/test_lora_tensorrt.py where one is present.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Hashable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trt_sd.models.errors import BackendUnavailableError, InputError
from trt_sd.models.lora import Patch

from .base import EngineBackend

#: mypy: ``--always-true TRT_RTX_TYPES`` checks the calls against the TensorRT-RTX bindings.
TRT_RTX_TYPES = False
BASE_KEY: tuple = ()


class RefitState:
    """What one engine holds: the key of its weight set and the patched names' base refs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: Hashable = BASE_KEY
        self.patched: dict[str, Patch] = {}  # name -> patch (its ref locates the base value)
        self.refits = 0


def _base_value(engine_dir: Path, patch: Patch) -> np.ndarray:
    ref = patch.ref
    return np.ascontiguousarray(
        np.memmap(engine_dir / ref.file, ref.dtype, "r", ref.offset, ref.shape, order="C")
    )


def refit(backend: Any, key: Hashable, patches: Callable[[], dict[str, Patch]]) -> None:
    """(Refit lock held.) Make ``backend``'s engine hold ``key``'s weights."""
    if TYPE_CHECKING:  # one code path, type-checked against each flavour's API
        if TRT_RTX_TYPES:
            import tensorrt_rtx as trt
        else:
            import tensorrt as trt
    else:
        from trt_sd.models.tensorrt_check import import_tensorrt

        trt = import_tensorrt(backend.flavour)
    state: RefitState = backend.refit_state
    new = patches() if key != BASE_KEY else {}
    engine_dir = Path(backend.engine_path).parent
    values: dict[str, np.ndarray] = {
        n: _base_value(engine_dir, p) for n, p in state.patched.items()
    }
    values.update({n: np.ascontiguousarray(p.value) for n, p in new.items()})
    if values:
        refitter = trt.Refitter(backend.engine, backend._logger)
        for name, value in values.items():  # the arrays stay alive until the refit returns
            dtype = trt.DataType.HALF if value.dtype == np.float16 else trt.DataType.FLOAT
            weights = trt.Weights(dtype, int(value.ctypes.data), int(value.size))
            if not refitter.set_named_weights(name, weights):
                raise InputError(
                    f"{backend.name}: the engine has no refittable weight {name!r}; re-export "
                    "with --refittable"
                )
        if not refitter.refit_cuda_engine():
            raise BackendUnavailableError(f"TensorRT could not refit the {backend.name} engine")
        backend._graph = None  # recapture: a refit may move weights
        state.refits += 1
    state.key, state.patched = key, dict(new)


class RefitView(EngineBackend):
    """The engine as seen by one LoRA set: each call first makes the engine hold the set."""

    def __init__(
        self, backend: Any, key: Hashable, patches: Callable[[], dict[str, Patch]]
    ) -> None:
        self.component, self.entry = backend.component, backend.entry
        self.inputs, self.outputs = backend.inputs, backend.outputs
        self.kind = backend.kind
        self.backend, self.key, self.patches = backend, key, patches

    def run(self, feeds: Mapping[str, Any], keep_on_device: Collection[str] = ()) -> dict[str, Any]:
        return self.backend.run_with_weights(self.key, self.patches, feeds, keep_on_device)

    def to_host(self, value: Any) -> np.ndarray:
        return self.backend.to_host(value)


def check_refittable(backend: Any) -> None:
    if not backend.entry.extra.get("refittable"):
        raise InputError(
            f"{backend.name}: run-time LoRA on TensorRT needs a refittable engine; re-export "
            "with --refittable (or fuse the LoRA with trt-sd export --lora)"
        )
