"""A per-machine cache of ONNX Runtime's optimised CPU graphs: ``Pipeline.load`` in ~1 s, not ~10.

Creating a CPU session with ``ORT_ENABLE_ALL`` spends most of its time in the layout passes
(the NCHWc transform reorders every convolution weight): 8.0 s of the SD 1.5 UNet's load
against 1.0 s with optimisation off (docs/benchmarks.md "## Runtime"). ONNX Runtime can save
the graph it optimised (``optimized_model_filepath``); loaded back with optimisation off it runs
at the same speed and gives bit-identical outputs, in 0.8 s. The saved graph may hold
hardware-specific kernels' layouts, so it is only valid on the same CPU and ONNX Runtime
version: both are in the cache key with the engine file's hashes.

Opt-in, because it costs disk (a second copy of the weights, 3.4 GB for the SD 1.5 UNet fp32)
and the first load pays for writing it: ``TRT_SD_ORT_CACHE=1`` caches under
``$TRT_SD_HOME/ort-cache`` (``~/.cache/trt-sd/ort-cache``), ``TRT_SD_ORT_CACHE=DIR`` under
``DIR``. A service whose replicas restart or scale out is the user it is for. Entries are
written to a temporary folder and renamed into place when complete, so concurrent replicas
and interrupted writes never leave a half entry that a later load would trust. Only the CPU
provider is cached: the CUDA provider's optimisations are cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trt_sd.models.errors import InputError
from trt_sd.models.manifest import ComponentEntry
from trt_sd.models.paths import cache_root

CACHE_ENV = "TRT_SD_ORT_CACHE"
MODEL = "model.onnx"
COMPLETE = "complete.json"


def cache_dir(setting: str | None = None) -> Path | None:
    """The cache folder a setting (default: ``$TRT_SD_ORT_CACHE``) asks for: None for unset,
    empty or ``0``; the default folder for ``1``; else that folder."""
    value = (os.environ.get(CACHE_ENV, "") if setting is None else setting).strip()
    if value in ("", "0"):
        return None
    if value == "1":
        return cache_root() / "ort-cache"
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(
            f"the ONNX Runtime cache setting ({CACHE_ENV}, --ort-cache) must be 1, 0 or a "
            f"folder; {value!r} is a file"
        )
    return path


def cpu_fingerprint() -> str:
    """What the optimised graph's layouts depend on: the CPU model and its feature flags."""
    text = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    text += line
                elif not line.strip() and text:
                    break  # the first processor is enough
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{text}"


@dataclass(frozen=True)
class CacheEntry:
    """One component's optimised graph in the cache (``folder/model.onnx`` + weights)."""

    folder: Path

    @property
    def model(self) -> Path:
        return self.folder / MODEL

    @property
    def ready(self) -> bool:
        return (self.folder / COMPLETE).is_file()

    def staging(self) -> Path:
        """A fresh temporary folder beside the entry to write a new one into."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", dir=self.folder.parent))

    def commit(self, staged: Path, record: dict[str, Any]) -> bool:
        """Publish a staged folder as this entry (False if another process was first)."""
        (staged / COMPLETE).write_text(json.dumps(record, indent=1), "utf-8")
        try:
            staged.rename(self.folder)
        except OSError:  # another replica published it first, or the disk said no
            shutil.rmtree(staged, ignore_errors=True)
            return self.ready
        return True


def entry_for(root: Path, entry: ComponentEntry, ort_version: str) -> CacheEntry:
    """The cache entry of one engine file on this machine and ONNX Runtime version."""
    key = {
        "file": entry.file,
        "sha256": entry.sha256,
        "external_data": (entry.extra.get("external_data") or {}).get("sha256"),
        "onnxruntime": ort_version,
        "cpu": cpu_fingerprint(),
        "level": "ORT_ENABLE_ALL",
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return CacheEntry(root / f"{entry.name}-{digest}")


def save_options(so: Any, target: Path) -> None:
    """Make session creation with ``so`` also write its optimised graph to ``target`` (the
    weights to ``target.data``: protobuf cannot hold a graph over 2 GB)."""
    so.optimized_model_filepath = str(target)
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", target.name + ".data"
    )
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
    )
