"""LoRA file formats -> one canonical list of layers.

Two families of files are in the wild, both read here:

* kohya / AUTOMATIC1111 (sd-scripts, most files on model sites): ``lora_unet_<module>``,
  ``lora_te_<module>`` (SD 1.x / 2.x text encoder), ``lora_te1_`` / ``lora_te2_`` (SDXL's two
  text encoders); ``.lora_down.weight`` (rank x in), ``.lora_up.weight`` (out x rank), an
  optional ``.alpha`` scalar and, for LoCon's Tucker-decomposed convolutions,
  ``.lora_mid.weight``. ``<module>`` is the diffusers module path with ``_`` for ``.``: it is
  resolved against the engine's list of modules (:func:`.apply.bind`), never by guessing where
  the dots were.
* diffusers / PEFT (``save_lora_weights``): ``unet.<path>``, ``text_encoder.<path>``,
  ``text_encoder_2.<path>`` with ``.lora_A.weight`` / ``.lora_B.weight`` (or the older
  ``.lora.down.weight`` / ``.lora.up.weight``); alpha from ``.alpha`` keys or from the
  ``lora_adapter_metadata`` JSON diffusers writes (``<component>.lora_alpha``,
  ``alpha_pattern``, ``use_rslora``), else alpha = rank (scale 1), as diffusers loads it.

LoHa / LoKr / DoRA files (other decompositions) are refused by name rather than half-applied.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .safetensors_np import read_safetensors

__all__ = ["LoraFile", "LoraLayer", "read_lora"]

#: kohya prefix -> component (SD 1.x / 2.x ``lora_te_``; SDXL ``lora_te1_`` / ``lora_te2_``)
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te_": "text_encoder",
}
DIFFUSERS_PREFIXES = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid"}
_DIFFUSERS_PARTS = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
}
_OTHER_KINDS = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "magnitude_vector": "DoRA"}
METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class LoraLayer:
    """One adapted module. ``key``: the diffusers module path (``flat=False``) or kohya's
    ``_``-joined form of it (``flat=True``, resolved later against the model's modules)."""

    component: str
    key: str
    flat: bool
    down: np.ndarray  # (rank, in) or (rank, in, kh, kw)
    up: np.ndarray  # (out, rank) or (out, rank, 1, 1)
    scale: float  # alpha / rank (or alpha / sqrt(rank) for rsLoRA)
    mid: np.ndarray | None = None  # LoCon Tucker core (rank, rank, kh, kw)

    @property
    def label(self) -> str:
        return f"{self.component}:{self.key}"


@dataclass(frozen=True)
class LoraFile:
    """A parsed LoRA file: its identity (name, sha256) and its layers."""

    path: Path
    sha256: str
    format: str  # "kohya" or "diffusers"
    layers: tuple[LoraLayer, ...]

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def short_hash(self) -> str:
        """The first 12 hex digits of the sha256, as AUTOMATIC1111's ``Lora hashes`` shows."""
        return self.sha256[:12]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _split(key: str, parts: dict[str, str]) -> tuple[str, str] | None:
    for suffix, part in parts.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    return None


def _kohya_component(stem: str) -> tuple[str, str] | None:
    for prefix, component in KOHYA_PREFIXES.items():
        if stem.startswith(prefix):
            return component, stem[len(prefix) :]
    return None


def _diffusers_component(stem: str) -> tuple[str, str] | None:
    head, _, rest = stem.partition(".")
    return (head, rest) if head in DIFFUSERS_PREFIXES and rest else None


def _metadata_alpha(metadata: dict[str, str], path: Path) -> dict[str, dict]:
    """Per component: lora_alpha, alpha_pattern, use_rslora from diffusers' metadata JSON."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise InputError(f"LoRA file {path.name}: unreadable {METADATA_KEY} metadata") from None
    out: dict[str, dict] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            component, _, field = str(key).partition(".")
            out.setdefault(component, {})[field] = value
    return out


def _alpha_from_metadata(config: dict, module: str) -> tuple[float | None, bool]:
    pattern = config.get("alpha_pattern") or {}
    for pat, value in pattern.items() if isinstance(pattern, dict) else ():
        if module == pat or module.endswith("." + str(pat)):
            return float(value), bool(config.get("use_rslora"))
    alpha = config.get("lora_alpha")
    return (None if alpha is None else float(alpha)), bool(config.get("use_rslora"))


def read_lora(path: str | Path) -> LoraFile:
    """Parse one LoRA file; InputError naming the file and the problem for anything that is
    not a LoRA this runtime can apply (wrong format, missing halves, rank mismatch, NaN)."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    groups: dict[tuple[str, str, bool], dict[str, np.ndarray]] = {}
    kinds: set[str] = set()
    for key, value in tensors.items():
        for marker, kind in _OTHER_KINDS.items():
            if marker in key:
                raise InputError(
                    f"LoRA file {path.name}: {kind} layers ({key}) are not supported; "
                    "plain LoRA / LoCon only"
                )
        kohya = _split(key, _KOHYA_PARTS)
        located = _kohya_component(kohya[0]) if kohya else None
        if kohya and located:
            kinds.add("kohya")
            groups.setdefault((*located, True), {})[kohya[1]] = value
            continue
        plain = _split(key, _DIFFUSERS_PARTS)
        located = _diffusers_component(plain[0]) if plain else None
        if plain and located:
            kinds.add("diffusers")
            groups.setdefault((*located, False), {})[plain[1]] = value
    if not groups:
        raise InputError(
            f"LoRA file {path.name}: no LoRA layers found (expected kohya lora_unet_ / lora_te_ "
            "keys or diffusers unet. / text_encoder. lora_A / lora_B keys)"
        )
    configs = _metadata_alpha(metadata, path)
    layers = []
    for (component, key, flat), parts in sorted(groups.items()):
        name = f"{component}:{key}"
        if "down" not in parts or "up" not in parts:
            have = "lora_down" if "down" in parts else "lora_up" if "up" in parts else "alpha"
            lack = "lora_up" if "down" in parts else "lora_down"
            raise InputError(f"LoRA file {path.name}: layer {name} has {have} but no {lack}")
        down, up, mid = parts["down"], parts["up"], parts.get("mid")
        if down.ndim not in (2, 4) or up.ndim != down.ndim:
            raise InputError(
                f"LoRA file {path.name}: layer {name} has down {down.shape} / up {up.shape}; "
                "expected 2-D (linear) or 4-D (conv) pairs"
            )
        rank = down.shape[0]
        if up.shape[1] != rank or (mid is not None and mid.shape[:2] != (rank, rank)):
            raise InputError(
                f"LoRA file {path.name}: layer {name}: rank mismatch (lora_down rank {rank}, "
                f"lora_up {up.shape}{'' if mid is None else f', lora_mid {mid.shape}'})"
            )
        rslora = False
        if "alpha" in parts:
            alpha: float | None = float(np.ravel(parts["alpha"])[0])
        else:
            alpha, rslora = _alpha_from_metadata(configs.get(component, {}), key)
        for part in (down, up, mid, parts.get("alpha")):
            if part is not None and not np.isfinite(part).all():
                raise InputError(f"LoRA file {path.name}: layer {name} has NaN or inf weights")
        alpha = float(rank) if alpha is None else alpha
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        layers.append(LoraLayer(component, key, flat, down, up, scale, mid))
    fmt = "kohya" if kinds == {"kohya"} else "diffusers" if kinds == {"diffusers"} else "mixed"
    return LoraFile(path, _sha256(path), fmt, tuple(layers))
