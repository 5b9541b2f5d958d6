"""What the runtime loads is what the manifest recorded: containment and content checks.

Two guarantees for an untrusted engine directory:

* **Containment.** Every file a manifest names resolves inside the engine directory (after
  symlinks), and no symlink anywhere in the directory leads out of it, so a manifest cannot
  make the runtime read ``/etc/shadow`` or a user's key through a tokenizer file.
* **Integrity.** Every engine file is hashed and compared with the sha256 its manifest
  records before it is loaded; a modified graph is refused instead of silently giving a
  wrong image.

Hashing a multi-GB UNet on every start would cost seconds, so a verified file leaves a
*stamp*: its device, inode, size, mtime and ctime with the digest, kept in this process and in
``$TRT_SD_HOME/verified`` (the user's own cache, never the untrusted directory). A stamp is
only trusted while all five are unchanged; any write, replace, ``touch`` or ``chmod`` changes
at least one (ctime cannot be set from user space), and the file is hashed again. Caches keyed
on content (the ONNX Runtime optimised-graph cache) use :func:`file_digest`: the digest of
the bytes actually on disk, never the manifest's claim.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ManifestError
from .paths import cache_root

CHUNK = 1 << 20
#: an engine directory holds a handful of files; a tree far larger is not one
MAX_ENTRIES = 10_000
_memo: dict[str, tuple[tuple[int, ...], str]] = {}
_lock = threading.Lock()


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stamp_path(real: str) -> Path:
    return cache_root() / "verified" / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")


def _read_stamp(real: str, ident: tuple[int, ...]) -> str | None:
    with _lock:
        known = _memo.get(real)
    if known is not None and known[0] == ident:
        return known[1]
    try:
        data = json.loads(_stamp_path(real).read_text("utf-8"))
        if data.get("path") == real and tuple(data.get("identity", ())) == ident:
            digest = str(data["sha256"])
            with _lock:
                _memo[real] = (ident, digest)
            return digest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _write_stamp(real: str, ident: tuple[int, ...], digest: str) -> None:
    with _lock:
        _memo[real] = (ident, digest)
    path = _stamp_path(real)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps({"path": real, "identity": list(ident), "sha256": digest}))
        os.replace(tmp, path)
    except OSError:  # a read-only home only costs the fast path
        pass


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (hex), from a stamp when the file is provably unchanged since
    it was last hashed, else by reading it. OSError if it cannot be read."""
    real = os.path.realpath(path)
    ident = _identity(os.stat(real))
    digest = _read_stamp(real, ident)
    if digest is not None:
        return digest
    h = hashlib.sha256()
    with open(real, "rb") as f:
        before = _identity(os.fstat(f.fileno()))
        while chunk := f.read(CHUNK):
            h.update(chunk)
        after = _identity(os.fstat(f.fileno()))
    digest = h.hexdigest()
    if before == after == ident:  # not written while we read it: safe to remember
        _write_stamp(real, ident, digest)
    return digest


def inside(root: Path, name: str, what: str) -> Path:
    """``root/name`` if it resolves (symlinks followed) inside ``root``; ManifestError else."""
    base = root.resolve()
    path = base / name
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise ManifestError(f"{what} {name!r} cannot be resolved (a symlink loop)") from None
    if real != base and base not in real.parents:
        raise ManifestError(
            f"{what} {name!r} leads outside the engine directory; an engine directory may "
            "only refer to files inside it"
        )
    return path


def check_tree(root: Path) -> None:
    """No symlink in the engine directory leads outside it (so nothing read from it, whether
    the manifest names it or a library finds it beside a named file, comes from elsewhere)."""
    base = root.resolve()
    seen = 0
    for folder, dirs, files in os.walk(base):
        for name in (*dirs, *files):
            seen += 1
            if seen > MAX_ENTRIES:
                raise ManifestError(
                    f"engine directory {str(root)!r} holds more than {MAX_ENTRIES} entries; "
                    "not an engine directory"
                )
            full = Path(folder) / name
            if full.is_symlink():
                inside(base, str(full.relative_to(base)), "engine directory entry")


def component_files(entry: Any) -> Iterable[tuple[str, str, str]]:
    """(file, recorded sha256, role) of everything one validated component entry loads: the
    engine file, its external weights, and a TensorRT entry's source graph."""
    raw = entry.to_dict()
    yield raw["file"], raw["sha256"], "engine file"
    external = raw.get("external_data")
    if external:
        yield external["file"], external["sha256"], "external weights"
    lora_map = raw.get("lora_map")
    if lora_map:
        yield lora_map["file"], lora_map["sha256"], "LoRA weight map"
    if raw.get("onnx_file") and raw.get("onnx_sha256"):
        yield raw["onnx_file"], raw["onnx_sha256"], "source graph"


def verify_components(engine_dir: str | os.PathLike[str], manifest: Any) -> None:
    """Hash every file the manifest's components and tokenizers load and compare with the
    recorded sha256 (stamps make repeat loads free). ManifestError naming the first file that
    differs."""
    root = Path(engine_dir)
    for entry in manifest.components.values():
        for name, recorded, role in component_files(entry):
            _verify(root, name, recorded, role, f"component {entry.name}")
    for key, name, recorded in tokenizer_files(manifest.raw):
        _verify(root, name, recorded, "tokenizer file", key)


def tokenizer_files(raw: Any) -> Iterable[tuple[str, str, str]]:
    """(manifest key, file, recorded sha256) of the tokenizer files whose digests the manifest
    records (exports since the digests were added record them; older ones are only contained)."""
    for key, value in raw.items():
        if not (key == "tokenizer" or key.startswith("tokenizer_")) or not isinstance(value, dict):
            continue
        digests = value.get("sha256") or {}
        for part in ("vocab", "merges"):
            if part in digests:
                yield key, str(value[part]), str(digests[part])


def _verify(root: Path, name: str, recorded: str, role: str, owner: str) -> None:
    path = inside(root, name, f"{role} of {owner}")
    try:
        actual = file_digest(path)
    except OSError as e:
        raise ManifestError(
            f"{role} {name} ({owner}) cannot be read: {e.strerror or type(e).__name__}"
        ) from None
    if actual != recorded:
        raise ManifestError(
            f"{role} {name} ({owner}) does not match the sha256 its manifest records: the file "
            "was modified or damaged after export; re-export the engine directory"
        )
