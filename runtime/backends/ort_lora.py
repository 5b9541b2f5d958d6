"""ONNX Runtime sessions with patched weights (run-time LoRA), kept in a small LRU.

The patched values must reach the graph BEFORE ONNX Runtime optimises it: its layout passes
(NCHWc) reorder convolution weights from the graph's own initializers, and
``SessionOptions.add_initializer`` overrides only after that (measured: a patched Conv weight
was silently ignored at ``ORT_ENABLE_ALL``). So:

* weights stored inline in the .onnx file are patched in a copy of the file's bytes, at the
  byte ranges the export recorded, and the session is created from those bytes (with the
  engine folder as the external-data folder for the rest);
* weights in the ``.data`` side file are replaced with ``add_external_initializers``, which
  swaps them in the graph itself when it is loaded.

The optimised-graph cache (:mod:`.ort_cache`) is not used for these. Creating a session costs
what a cold load does (docs/benchmarks.md "## LoRA"), so the last few LoRA sets' sessions are
kept: ``TRT_SD_LORA_SESSIONS`` (default 2) per engine; each holds its own copy of the weights.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import numpy as np

from trt_sd.models.errors import InputError
from trt_sd.models.lora import Patch

LRU_ENV = "TRT_SD_LORA_SESSIONS"
DEFAULT_SESSIONS = 2
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


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
        self.created = 0  # sessions built (benchmarks and tests read it)


def _session(ort: Any, path: Path, providers: list[Any], patches: dict[str, Patch]) -> tuple:
    """(a session with ``patches`` in its graph, the buffers it reads)."""
    from .onnxruntime import session_options

    so = session_options(ort)
    keep: list[Any] = []
    inline = {n: p for n, p in patches.items() if p.ref.file == path.name}
    external = {n: p for n, p in patches.items() if p.ref.file != path.name}
    model: Any = str(path)
    if inline:
        data = bytearray(path.read_bytes())
        for patch in inline.values():
            raw = patch.value.tobytes()
            assert len(raw) == patch.ref.length  # checked when the map was loaded
            data[patch.ref.offset : patch.ref.offset + len(raw)] = raw
        model = bytes(data)
        so.add_session_config_entry(EXTERNAL_FOLDER, str(path.parent))
    if external:
        values = [np.ascontiguousarray(p.value) for p in external.values()]
        ortvalues = [ort.OrtValue.ortvalue_from_numpy(v) for v in values]
        so.add_external_initializers(list(external), ortvalues)
        keep += [values, ortvalues]  # the session reads these buffers: keep them alive
    return ort.InferenceSession(model, sess_options=so, providers=providers), keep


def patched_view(
    backend: Any,
    path: Path,
    providers: list[Any],
    key: Hashable,
    patches: Callable[[], dict[str, Patch]],
) -> Any:
    """A shallow copy of ``backend`` running a session with ``patches()`` applied (the same
    object for the same ``key`` while it stays in the LRU)."""
    sessions: PatchedSessions = backend.lora_sessions
    with sessions.lock:  # one build at a time per engine: they are memory-heavy
        if key in sessions.views:
            sessions.views.move_to_end(key)
            return sessions.views[key]
        values = patches()
        if not values:
            return backend
        view = copy.copy(backend)
        view.session, view.lora_buffers = _session(backend._ort, path, providers, values)
        sessions.created += 1
        limit = lru_size()
        if limit > 0:
            sessions.views[key] = view
            while len(sessions.views) > limit:
                sessions.views.popitem(last=False)
        return view
