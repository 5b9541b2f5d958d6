"""Atomic engine-directory writes and content-keyed reuse.

An export is built in a sibling temporary directory (same filesystem) and renamed into place
only after ``manifest.json`` is written there, so a killed export never leaves a directory the
runtime would load: the half-built one has no manifest and is not at the output path.

Reuse is keyed by content: a component's cache key hashes its weights (+ config), name,
precision, opset, shape range, tool versions and the exporter revision. A component is reused
only when the previous manifest records the same key *and* its files still hash to the recorded
sha256 — never because a file merely exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from trt_sd.models import InputError, Manifest, ManifestError
from trt_sd.models.manifest import MANIFEST_NAME

from .checkpoint import sha256_file

#: Bump when the export code changes what it writes for the same inputs.
EXPORT_REVISION = 1
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.export-(?P<pid>\d+)-[0-9a-f]+$")


def cache_key(parts: dict[str, Any]) -> str:
    """Stable hash of the JSON-serialisable inputs of one component build."""
    blob = json.dumps({**parts, "export_revision": EXPORT_REVISION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_output_dir(out_dir: Path) -> None:
    """Refuse an output path we could not write or must not replace."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise InputError(
            f"output directory {str(out_dir)!r} is not empty and holds no engine directory; "
            "choose an empty or new directory"
        )
    parent = out_dir.parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise InputError(f"cannot write {str(out_dir)!r}: {str(blocker)!r} is a file")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output directory {str(parent)!r}: {e.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK) or (
        out_dir.is_dir() and not os.access(out_dir, os.W_OK | os.X_OK)
    ):
        raise InputError(f"output directory {str(out_dir)!r} is not writable")


def previous_manifest(out_dir: Path) -> Manifest | None:
    try:
        return Manifest.load(out_dir)
    except ManifestError:
        return None


def entry_files(entry_dict: dict[str, Any]) -> list[tuple[str | None, str | None]]:
    """(file, sha256) of everything a component entry owns: the engine file, the ONNX
    external-data file, and for TensorRT entries the ONNX graph the engine was built from."""
    files = [(entry_dict.get("file"), entry_dict.get("sha256"))]
    ext = entry_dict.get("external_data")
    if ext:
        files.append((ext.get("file"), ext.get("sha256")))
    if entry_dict.get("onnx_file"):
        files.append((entry_dict["onnx_file"], entry_dict.get("onnx_sha256")))
    return files


def files_intact(out_dir: Path, entry_dict: dict[str, Any]) -> bool:
    """Every file of a previous component entry exists and hashes to its recorded sha256."""
    for name, digest in entry_files(entry_dict):
        if not name or not digest or not (out_dir / name).is_file():
            return False
        if sha256_file(out_dir / name) != digest:
            return False
    return True


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (free, same filesystem) or copy a reused file into the new build."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_builds(out_dir: Path) -> None:
    """Delete temporary build folders left by killed exports to the same output."""
    if not out_dir.parent.is_dir():
        return
    for p in out_dir.parent.iterdir():
        m = _TMP_RE.match(p.name)
        if m and m["name"] == out_dir.name and not _pid_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)


def new_build_dir(out_dir: Path) -> Path:
    """A fresh temporary directory beside ``out_dir`` (same filesystem, so rename is atomic)."""
    tmp = out_dir.parent / f".{out_dir.name}.export-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise InputError(
            f"output directory {str(out_dir)!r} is not writable ({e.strerror})"
        ) from None
    return tmp


def publish(build_dir: Path, out_dir: Path) -> None:
    """Move a finished build (manifest written last) to ``out_dir``, replacing an old one."""
    if not (build_dir / MANIFEST_NAME).is_file():
        raise RuntimeError("refusing to publish a build without manifest.json")
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.export-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(out_dir, old)
    os.replace(build_dir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard(build_dir: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(build_dir)
