"""Atomic engine-directory writes and content-keyed reuse.

An export is built in a sibling temporary directory (same filesystem) and published only after
``manifest.json`` is written there, so a killed export never leaves a directory the runtime
would load: the half-built one has no manifest and is not at the output path.

**Publishing is atomic in the strict sense.** A new output is one ``rename``. An existing
engine directory is replaced by exchanging the two directories with one ``renameat2(...,
RENAME_EXCHANGE)`` call (Linux 3.15+; ext4, xfs, btrfs, tmpfs, ...): at every instant ``--out``
holds the complete old or the complete new directory, and a crash at any point loses neither
(the other one sits beside it as a temporary folder, swept by the next export). ``--out`` stays
a real directory, as existing users and ``trt-sd run --engines DIR`` know it (a symlink-swap
scheme would turn it into a symlink). Where the exchange is unsupported (other kernels, some
network filesystems) an existing directory is not replaced at all: the export refuses at the
start, before any work, and says to remove it or choose a new ``--out``.

**Only our own directories are replaced.** ``--out`` may name a new path, an empty directory,
or an engine directory this tool wrote: a valid manifest (schema and containment) and nothing
in it that the export did not write - the marker file :data:`MARKER` lists every file of the
build, and a directory from before the marker existed may hold only what its manifest names
(plus ``manifest.json`` and the tokenizer folder). Anything else is refused with one line, so
a user's folder that merely holds a file called ``manifest.json`` is never deleted.

Reuse is keyed by content: a component's cache key hashes its weights (+ config), name,
precision, opset, shape range, tool versions and the exporter revision. A component is reused
only when the previous manifest records the same key *and* its files still hash to the recorded
sha256 — never because a file merely exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from trt_sd.models import InputError, Manifest, ManifestError
from trt_sd.models.integrity import file_digest
from trt_sd.models.manifest import MANIFEST_NAME
from trt_sd.models.manifest_schema import named_files

#: Bump when the export code changes what it writes for the same inputs.
EXPORT_REVISION = 1
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.export-(?P<pid>\d+)-[0-9a-f]+$")
#: written into every engine directory: proof that it is ours, and the list of its files
MARKER = ".trt-sd-engine.json"
MARKER_KIND = "trt-sd engine directory"
#: a pre-marker engine directory's tokenizer folder holds these (export copies them)
TOKENIZER_FILES = {
    "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.json", "added_tokens.json",
}  # fmt: skip


def cache_key(parts: dict[str, Any]) -> str:
    """Stable hash of the JSON-serialisable inputs of one component build."""
    blob = json.dumps({**parts, "export_revision": EXPORT_REVISION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def real_out(out_dir: Path) -> Path:
    """The directory ``--out`` designates: a symlink is followed (its target is replaced, the
    user's link stays), so the build sits on the target's filesystem."""
    return out_dir.resolve() if out_dir.is_symlink() else out_dir


def check_output_dir(out_dir: Path) -> None:
    """Refuse an output path we could not write or must not replace (one line, before work)."""
    out_dir = real_out(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        reason = not_ours(out_dir)
        if reason:
            raise InputError(
                f"output directory {str(out_dir)!r} is not empty and not an engine directory "
                f"written by trt-sd ({reason}); choose an empty or new directory"
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
    if out_dir.is_dir() and not exchange_supported(parent):
        raise InputError(
            f"cannot replace {str(out_dir)!r} atomically on this filesystem (no "
            "renameat2 RENAME_EXCHANGE); remove it first or choose a new --out"
        )


def _listing(folder: Path) -> set[str]:
    """Every file and folder under ``folder`` (relative POSIX paths), symlinks not followed."""
    found: set[str] = set()
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            found.add((Path(root) / name).relative_to(folder).as_posix())
            if len(found) > 10_000:
                return found
    return found


def _folders(paths: set[str]) -> set[str]:
    """The parent folders of ``paths`` (they are expected when their files are)."""
    return {p.rsplit("/", i)[0] for p in paths for i in range(1, p.count("/") + 1)}


def not_ours(folder: Path) -> str | None:
    """None when ``folder`` is provably an engine directory this tool wrote (see the module
    docstring), else why not, in a few words (no file content)."""
    try:
        manifest = Manifest.load(folder)
    except ManifestError:
        return "no valid manifest.json"
    present = _listing(folder)
    try:
        marker = json.loads((folder / MARKER).read_text("utf-8"))
        ok = isinstance(marker, dict) and marker.get("kind") == MARKER_KIND
        expected = set(marker.get("files", ())) if ok else set()
    except (OSError, ValueError, TypeError):
        marker, expected = None, set()
    if marker is None:  # written before the marker existed: only what the manifest names
        expected = set(named_files(manifest.raw)) | {MANIFEST_NAME}
        for tok in (manifest.tokenizer.get("vocab"), manifest.tokenizer.get("merges")):
            folder_of = str(tok).rsplit("/", 1)[0] + "/" if "/" in str(tok) else ""
            expected |= {folder_of + name for name in TOKENIZER_FILES}
    elif not expected:
        return f"an unreadable {MARKER}"
    expected |= {MARKER} | _folders(expected)
    unexpected = sorted(present - expected)
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        return f"it also holds {unexpected[0]!r}{more}"
    return None


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
    lora_map = entry_dict.get("lora_map")
    if lora_map:
        files.append((lora_map.get("file"), lora_map.get("sha256")))
    if entry_dict.get("onnx_file"):
        files.append((entry_dict["onnx_file"], entry_dict.get("onnx_sha256")))
    return files


def files_intact(out_dir: Path, entry_dict: dict[str, Any]) -> bool:
    """Every file of a previous component entry exists and hashes to its recorded sha256."""
    for name, digest in entry_files(entry_dict):
        if not name or not digest or not (out_dir / name).is_file():
            return False
        if file_digest(out_dir / name) != digest:  # stamped: free when unchanged since last time
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
    out_dir = real_out(out_dir)
    if not out_dir.parent.is_dir():
        return
    for p in out_dir.parent.iterdir():
        m = _TMP_RE.match(p.name)
        if m and m["name"] == out_dir.name and not _pid_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)


def new_build_dir(out_dir: Path) -> Path:
    """A fresh temporary directory beside ``out_dir`` (same filesystem, so rename is atomic)."""
    out_dir = real_out(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.export-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise InputError(
            f"output directory {str(out_dir)!r} is not writable ({e.strerror})"
        ) from None
    return tmp


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> Any:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> None:
    """Swap two paths in one atomic step (``renameat2(RENAME_EXCHANGE)``); OSError if the
    kernel, C library or filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        raise OSError(38, "renameat2 is not available")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def exchange_supported(parent: Path) -> bool:
    """Whether :func:`exchange` works in ``parent`` (probed with two empty folders)."""
    a = parent / f".trt-sd-probe-{os.getpid()}-{secrets.token_hex(4)}"
    b = a.with_name(a.name + "-b")
    try:
        a.mkdir()
        b.mkdir()
        exchange(a, b)
        return True
    except OSError:
        return False
    finally:
        for p in (a, b):
            with contextlib.suppress(OSError):
                p.rmdir()


def write_marker(build_dir: Path) -> None:
    """Record that the build is ours and every file it holds (checked before a replace)."""
    files = sorted(_listing(build_dir) - {MARKER})
    (build_dir / MARKER).write_text(
        json.dumps({"kind": MARKER_KIND, "files": files}, indent=1) + "\n", "utf-8"
    )


def publish(build_dir: Path, out_dir: Path) -> None:
    """Make a finished build (manifest written last) the content of ``out_dir`` atomically:
    a rename for a new path, an exchange for an existing engine directory (re-checked as ours
    now: it may have changed during a long export). The replaced directory is then deleted."""
    if not (build_dir / MANIFEST_NAME).is_file():
        raise RuntimeError("refusing to publish a build without manifest.json")
    out_dir = real_out(out_dir)
    write_marker(build_dir)
    if not os.path.lexists(out_dir):
        try:
            os.rename(build_dir, out_dir)
            return
        except OSError:
            if not out_dir.is_dir():
                raise
    if any(out_dir.iterdir()):
        reason = not_ours(out_dir)
        if reason:
            raise InputError(
                f"output directory {str(out_dir)!r} changed during the export and is no longer "
                f"an engine directory written by trt-sd ({reason}); nothing was replaced"
            )
    try:
        exchange(build_dir, out_dir)
    except OSError as e:
        raise InputError(
            f"cannot replace {str(out_dir)!r} atomically ({e.strerror}); remove it first or "
            "choose a new --out"
        ) from None
    shutil.rmtree(build_dir, ignore_errors=True)  # now the old directory


def discard(build_dir: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(build_dir)
