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
``DIR``. A service whose replicas restart or scale out is the user it is for.

Writing is safe with many replicas starting at once: one process holds an entry's lock file
and writes it into a temporary folder that is renamed into place when complete (with the file
sizes it wrote); the others load the plain way meanwhile. A killed writer's lock and folder are
swept once stale. An entry whose files do not match their recorded sizes is removed and
rebuilt; a load that fails on intact files (memory, limits) falls back to the plain load and
leaves the entry for the others. Only the CPU provider is cached: the CUDA provider's
optimisations are cheap.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trt_sd.models.errors import InputError
from trt_sd.models.integrity import file_digest
from trt_sd.models.manifest import ComponentEntry
from trt_sd.models.paths import cache_root

CACHE_ENV = "TRT_SD_ORT_CACHE"
MODEL = "model.onnx"
COMPLETE = "complete.json"
ON = ("1", "true", "yes", "on")
OFF = ("", "0", "false", "no", "off")
#: A lock or staging folder older than this belongs to a process that died while writing.
STALE_S = 3 * 3600


def cache_dir(setting: str | None = None) -> Path | None:
    """The cache folder a setting (default: ``$TRT_SD_ORT_CACHE``) asks for: None when off
    (unset, empty, 0/false/no/off); the default folder for 1/true/yes/on; else that folder,
    made absolute. InputError for a file or an engine directory."""
    raw = (os.environ.get(CACHE_ENV, "") if setting is None else setting).strip()
    if raw.lower() in OFF:
        return None
    if raw.lower() in ON:
        return cache_root() / "ort-cache"
    path = Path(raw).expanduser().absolute()
    where = f"the ONNX Runtime cache setting ({CACHE_ENV}, --ort-cache)"
    if path.exists() and not path.is_dir():
        raise InputError(f"{where} must be 1, 0 or a folder; {raw!r} is a file")
    if (path / "manifest.json").is_file():
        raise InputError(f"{where} names an engine directory ({raw!r}); give the cache its own")
    return path


def replica_setting(setting: str) -> str:
    """``setting`` as a process elsewhere must read it: "0", "1", or an absolute folder (a
    relative one would resolve against that process's working directory)."""
    if setting.strip().lower() in OFF:
        return "0"
    if setting.strip().lower() in ON:
        return "1"  # each machine's own default folder
    return str(cache_dir(setting))


@functools.cache
def cpu_fingerprint() -> str:
    """What the optimised graph's layouts depend on: the CPU model and its feature flags (read
    once per process, not once per component)."""
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


def _sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.name != COMPLETE}


def _remove(folder: Path) -> None:
    """Delete a folder without ever leaving a partly deleted one under its name: rename it
    aside (atomic), then remove the renamed copy."""
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        folder.rename(trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


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

    @property
    def _lock(self) -> Path:
        return self.folder.with_name(f".{self.folder.name}.lock")

    def intact(self) -> bool:
        """Every file the writer recorded is there with its size (a truncated or deleted
        weights file is not trusted; a load failure with intact files is not the entry's)."""
        try:
            record = json.loads((self.folder / COMPLETE).read_text("utf-8"))
            return bool(record.get("files")) and _sizes(self.folder) == record["files"]
        except (OSError, ValueError):
            return False

    def discard(self) -> None:
        _remove(self.folder)

    def lock(self) -> bool:
        """Become the one process writing this entry (False: another is, load the plain way);
        a lock left by a process that died is taken over once it is stale."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                os.close(os.open(self._lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return True
            except FileExistsError:
                try:
                    if time.time() - self._lock.stat().st_mtime < STALE_S:
                        return False
                    self._lock.unlink()
                except OSError:
                    return False
        return False

    def unlock(self) -> None:
        self._lock.unlink(missing_ok=True)

    def staging(self) -> Path:
        """A fresh temporary folder beside the entry (after sweeping stale ones of this entry
        that a killed writer left behind)."""
        cutoff = time.time() - STALE_S
        for old in self.folder.parent.glob(f".{self.folder.name}.*"):
            try:
                if old.is_dir() and old.stat().st_mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
        return Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", dir=self.folder.parent))

    def commit(self, staged: Path, record: dict[str, Any]) -> bool:
        """Publish a staged folder as this entry; never raises (False: not published)."""
        try:
            (staged / COMPLETE).write_text(
                json.dumps({**record, "files": _sizes(staged)}, indent=1), "utf-8"
            )
            if self.folder.exists():  # a damaged entry another process has not removed yet
                _remove(self.folder)
            staged.rename(self.folder)
            return True
        except OSError:  # a full disk, or another process published it first
            shutil.rmtree(staged, ignore_errors=True)
            return False


def entry_for(root: Path, entry: ComponentEntry, ort_version: str, path: Path) -> CacheEntry:
    """The cache entry of one engine file on this machine and ONNX Runtime version, keyed on
    the sha256 of the bytes at ``path`` (and of its external weights), not on the manifest's
    claim: a modified copy of an engine directory gets its own entry and cannot poison the
    genuine directory's (:func:`trt_sd.models.integrity.file_digest` stamps keep this free on
    repeat loads). OSError if a file cannot be read."""
    external = (entry.extra.get("external_data") or {}).get("file")
    key = {
        "sha256": file_digest(path),
        "external_data": file_digest(path.parent / external) if external else None,
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
