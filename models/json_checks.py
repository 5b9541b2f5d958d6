"""Composable JSON value checks: the vocabulary :mod:`.manifest_schema` is written in.

Each check is ``check(value, where) -> None`` and raises :class:`ManifestError` naming the
field (``where``), what it must be and what it is. Values are described by :func:`shown`,
which never prints more than a short quote, so a message cannot leak a file's content.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from .errors import ManifestError

Check = Callable[[Any, str], None]
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def shown(value: Any, limit: int = 32) -> str:
    """A short, safe description of a value for an error message (type, and a truncated repr
    of short scalars only): never a file's content."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= limit else f"a {len(text)}-digit number"
    if isinstance(value, str):
        text = repr(value[:limit]) + ("..." if len(value) > limit else "")
        return f"string {text}"
    if isinstance(value, dict):
        return "an object"
    return "an array" if isinstance(value, list) else type(value).__name__


def fail(where: str, wanted: str, value: Any) -> ManifestError:
    return ManifestError(f"manifest field {where} must be {wanted}, got {shown(value)}")


# ---- value checks ---------------------------------------------------------------------------
def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(value: Any, where: str) -> None:
        wanted = "an integer" + _bounds(lo, hi)
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(where, wanted, value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise fail(where, wanted, value)

    return check


def number(lo: float | None = None, hi: float | None = None, open_lo: bool = False) -> Check:
    def check(value: Any, where: str) -> None:
        wanted = "a finite number" + _bounds(lo, hi, open_lo)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail(where, wanted, value)
        if not math.isfinite(value):
            raise fail(where, wanted, value)
        if lo is not None and (value < lo or (open_lo and value == lo)):
            raise fail(where, wanted, value)
        if hi is not None and value > hi:
            raise fail(where, wanted, value)

    return check


def _bounds(lo: float | None, hi: float | None, open_lo: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if open_lo else '['}{lo}, {hi}]"
    if lo is not None:
        return f" {'>' if open_lo else '>='} {lo}"
    return "" if hi is None else f" <= {hi}"


def string(choices: tuple[str, ...] | None = None, max_len: int = 4096) -> Check:
    def check(value: Any, where: str) -> None:
        wanted = f"one of {', '.join(choices)}" if choices else "a string"
        if not isinstance(value, str) or len(value) > max_len:
            raise fail(where, wanted, value)
        if choices is not None and value not in choices:
            raise fail(where, wanted, value)

    return check


def boolean(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise fail(where, "true or false", value)


def sha256(value: Any, where: str) -> None:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise fail(where, "a sha256 digest (64 lowercase hex digits)", value)


def relpath(value: Any, where: str) -> None:
    """A file name relative to the engine directory that cannot leave it: no absolute path,
    no ``..``, no backslashes or drive letters (read the same on every OS). Symlinks that lead
    out are refused when the directory is loaded (:func:`trt_sd.models.integrity`)."""
    wanted = "a relative path inside the engine directory"
    if not isinstance(value, str) or not value or len(value) > 1024 or "\x00" in value:
        raise fail(where, wanted, value)
    parts = PurePosixPath(value).parts
    if (
        value.startswith("/")
        or "\\" in value
        or ":" in value
        or any(p in ("..", ".") for p in value.split("/"))
        or not parts
    ):
        raise fail(where, wanted, value)


def array(item: Check, min_len: int = 0, max_len: int = 1 << 16) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, list) or not min_len <= len(value) <= max_len:
            raise fail(where, f"an array of {min_len}..{max_len} items", value)
        for i, v in enumerate(value):
            item(v, f"{where}[{i}]")

    return check


def nullable(check: Check) -> Check:
    """``null`` allowed (export writes it for absent optional parts)."""

    def inner(value: Any, where: str) -> None:
        if value is not None:
            check(value, where)

    return inner


def any_json(value: Any, where: str) -> None:
    """Free-form data the runtime only reports (tool versions, timings)."""


@dataclass(frozen=True)
class Field:
    check: Check
    required: bool = False


def obj(fields: Mapping[str, Field], values: Check | None = None, files: bool = True) -> Check:
    """A JSON object whose named keys follow ``fields``; other keys follow ``values`` when
    given, else pass - but with ``files`` a key that names a file (``*_file``) is always checked
    as a path. Informational sections (export provenance, tool versions, reports) pass
    ``files=False``: the runtime opens nothing they name."""

    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise fail(where, "an object", value)
        missing = [k for k, f in fields.items() if f.required and k not in value]
        if missing:
            place = f"field {where}" if where else "manifest.json"
            raise ManifestError(f"{place} lacks required keys: {', '.join(missing)}")
        for key, v in value.items():
            if not isinstance(key, str):  # pragma: no cover - JSON keys are strings
                raise fail(where, "an object with string keys", key)
            sub = f"{where}.{key}" if where else key
            if key in fields:
                fields[key].check(v, sub)
            elif values is not None:
                values(v, sub)
            elif files and is_file_key(key) and v is not None:
                relpath(v, sub)

    return check


def is_file_key(key: str) -> bool:
    """Keys that name files in the engine directory (``file``, ``onnx_file``, ...)."""
    return key == "file" or key.endswith("_file")


def req(check: Check) -> Field:
    return Field(check, required=True)


def opt(check: Check) -> Field:
    return Field(check)


def one_of(*checks: Check) -> Check:
    """The first check that accepts the value's JSON type decides (int or list, ...)."""

    def check(value: Any, where: str) -> None:
        errors = []
        for c in checks:
            try:
                c(value, where)
                return
            except ManifestError as e:
                errors.append(e)
        raise errors[0]

    return check
