"""LoRAs named by a service request: the ``loras`` field and the WebUI prompt syntax.

A request names LoRAs from the server's ``--lora-dir`` (``TRT_SD_LORA_DIR`` in a replica's
environment), never by path: ``"loras": [{"name": "x", "scale": 0.8}]`` (or ``["x", 0.8]``
pairs) and, as AUTOMATIC1111 reads prompts, ``<lora:name:0.8>`` tags in the prompt, which are
removed from the text the text encoder sees (``<lora:name>`` is scale 1). A name is a file
stem in that folder (``name.safetensors``); anything with a path separator is refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from trt_sd.models.errors import InputError
from trt_sd.models.lora import LoraSpec

__all__ = ["LORA_DIR_ENV", "MAX_LORAS", "lora_dir", "request_loras"]

LORA_DIR_ENV = "TRT_SD_LORA_DIR"
#: LoRAs one request may stack (each costs a patched session the first time)
MAX_LORAS = 8
_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>")
_NAME = re.compile(r"^[\w.\- ]{1,128}$")


def lora_dir() -> Path | None:
    value = os.environ.get(LORA_DIR_ENV, "").strip()
    return Path(value) if value else None


def _resolve(name: str, scale: Any, folder: Path | None) -> LoraSpec:
    if folder is None:
        raise InputError(f"LoRA {name!r} requested, but this server has no --lora-dir")
    if not isinstance(name, str) or not _NAME.match(name) or name.startswith("."):
        raise InputError(f"LoRA names are file stems in the server's LoRA folder, got {name!r}")
    path = folder / f"{name}.safetensors"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.safetensors"))[:20]
        raise InputError(f"unknown LoRA {name!r}; available: {', '.join(known) or 'none'}")
    try:
        value = 1.0 if scale in (None, "") else float(scale)
    except (TypeError, ValueError):
        raise InputError(f"LoRA {name!r}: scale must be a number, got {scale!r}") from None
    return LoraSpec(path, value)


def request_loras(
    prompt: Any, loras: Any, folder: Path | None
) -> tuple[Any, list[tuple[Path, float]]]:
    """(the prompt without ``<lora:...>`` tags, [(path, scale)]) of one request."""
    specs: list[LoraSpec] = []
    if isinstance(prompt, str) and "<lora:" in prompt:
        for name, scale in _TAG.findall(prompt):
            specs.append(_resolve(name.strip(), scale.strip(), folder))
        prompt = re.sub(r"\s{2,}", " ", _TAG.sub("", prompt)).strip()
    if loras is not None:
        if not isinstance(loras, list):
            raise InputError("loras must be a list of {name, scale} objects")
        for item in loras:
            if isinstance(item, dict) and set(item) <= {"name", "scale"} and "name" in item:
                specs.append(_resolve(item["name"], item.get("scale"), folder))
            elif isinstance(item, list | tuple) and len(item) == 2:
                specs.append(_resolve(item[0], item[1], folder))
            elif isinstance(item, str):
                specs.append(_resolve(item, None, folder))
            else:
                raise InputError(f"loras entries are {{name, scale}} objects, got {item!r}")
    if len(specs) > MAX_LORAS:
        raise InputError(f"at most {MAX_LORAS} LoRAs per request, got {len(specs)}")
    return prompt, [(s.path, s.scale) for s in specs]
