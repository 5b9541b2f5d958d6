"""Where things live by default, so `trt-sd export` and `trt-sd run` meet with no arguments."""

from __future__ import annotations

import os
from pathlib import Path

#: The bundled default model (a diffusers folder shipped inside the package).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"
DEFAULT_MODEL_NAME = "trt-sd-digits"


def cache_root() -> Path:
    """``$TRT_SD_HOME`` or ``$XDG_CACHE_HOME/trt-sd`` (``~/.cache/trt-sd``)."""
    env = os.environ.get("TRT_SD_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "trt-sd"


def default_engine_dir() -> Path:
    """The directory `trt-sd export` writes when no ``--out`` is given and `trt-sd run` reads
    when no ``--engines`` is given."""
    return cache_root() / "engines" / "default"
