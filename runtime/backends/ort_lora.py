"""ONNX Runtime sessions with patched weights (run-time LoRA), kept in a small LRU.

A patched session is created from the engine file with the LoRA-patched initializers supplied
through ``SessionOptions.add_initializer`` (it overrides a graph initializer of the same name,
inline or external data), so the graph optimisations run on the patched values exactly as on
the base ones. The optimised-graph cache (:mod:`.ort_cache`) is not used for these: its saved
graph has renamed, re-laid-out weights. Creating a session costs what a cold load does
(docs/benchmarks.md "## LoRA"), so the last few LoRA sets' sessions are kept:
``TRT_SD_LORA_SESSIONS`` (default 2) per engine; each holds its own copy of the weights.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from trt_sd.models.errors import InputError

LRU_ENV = "TRT_SD_LORA_SESSIONS"
DEFAULT_SESSIONS = 2


def lru_size() -> int:
    value = os.environ.get(LRU_ENV, "").strip()
    if not value:
        return DEFAULT_SESSIONS
    if not value.isdigit():
        raise InputError(f"{LRU_ENV} must be a non-negative integer, got {value!r}")
    return int(value)


class PatchedSessions:
    """The LRU of one backend's patched views, keyed by LoRA set."""

    def __init__(self) -> None:
        self.views: OrderedDict[Hashable, Any] = OrderedDict()
        self.lock = threading.Lock()
        self.created = 0  # sessions built (a benchmark / test reads it)


def patched_view(
    backend: Any,
    path: Any,
    providers: list[Any],
    key: Hashable,
    patches: Callable[[], dict[str, np.ndarray]],
) -> Any:
    """A shallow copy of ``backend`` running a session with ``patches()`` applied (the same
    object for the same ``key`` while it stays in the LRU)."""
    from .onnxruntime import session_options

    sessions: PatchedSessions = backend.lora_sessions
    with sessions.lock:  # one build at a time per engine: they are memory-heavy
        if key in sessions.views:
            sessions.views.move_to_end(key)
            return sessions.views[key]
        values = patches()
        if not values:
            return backend
        ort = backend._ort
        so = session_options(ort)
        keep = []
        for name, value in values.items():
            value = np.ascontiguousarray(value)
            ortvalue = ort.OrtValue.ortvalue_from_numpy(value)
            so.add_initializer(name, ortvalue)
            keep.append((value, ortvalue))  # the session reads these buffers: keep them alive
        session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        view = copy.copy(backend)
        view.session = session
        view.lora_buffers = keep
        sessions.created += 1
        limit = lru_size()
        if limit > 0:
            sessions.views[key] = view
            while len(sessions.views) > limit:
                sessions.views.popitem(last=False)
        return view
