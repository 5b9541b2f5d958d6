"""``PATH[:SCALE]`` arguments and ``loras=`` lists -> (path, scale) pairs."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["LoraSpec", "normalise_loras", "parse_lora_arg"]

#: a scale far outside what any LoRA is used at is a typo (``--lora a.safetensors:80``)
MAX_SCALE = 16.0


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: its file and its strength."""

    path: Path
    scale: float = 1.0


def _scale(value: Any, where: str) -> float:
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: scale must be a number, got {value!r}") from None
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise InputError(f"{where}: scale must be finite and within ±{MAX_SCALE:g}, got {value!r}")
    return scale


def parse_lora_arg(text: str) -> LoraSpec:
    """``PATH`` or ``PATH:SCALE`` (a trailing ``:number``; a path may itself hold colons)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            float(tail)
        except ValueError:
            return LoraSpec(Path(text), 1.0)
        return LoraSpec(Path(head), _scale(tail, f"--lora {text}"))
    return LoraSpec(Path(text), 1.0)


def normalise_loras(loras: Iterable[Any] | None) -> tuple[LoraSpec, ...]:
    """``loras=`` as the API takes it (paths, ``(path, scale)`` pairs, :class:`LoraSpec`)
    -> specs; zero scales are dropped, so ``[(a, 0)]`` is exactly the base model."""
    if loras is None:
        return ()
    if isinstance(loras, str | os.PathLike):
        raise InputError("loras must be a list of (path, scale) pairs, not one path")
    out = []
    for item in loras:
        if isinstance(item, LoraSpec):
            spec = item
        elif isinstance(item, str | os.PathLike):
            spec = LoraSpec(Path(item), 1.0)
        elif isinstance(item, tuple | list) and len(item) == 2:
            spec = LoraSpec(Path(item[0]), _scale(item[1], f"LoRA {item[0]}"))
        else:
            raise InputError(f"loras entries must be (path, scale) pairs, got {item!r}")
        if spec.scale != 0.0:
            out.append(spec)
    return tuple(out)
