"""The models one service offers: several engine directories, each under one model name.

``trt-sd serve DIR [DIR ...]`` (or a folder whose sub-folders are engine directories) serves
every directory as its own replica group; both client APIs (AUTOMATIC1111, OpenAI) name a model
and the ingress routes the request to that group. What a client may ask of a model - its image
sizes, its batch, whether it has a VAE encoder for img2img - is read from the manifest here,
once, so a request outside an engine's built range is refused at the ingress with the range
instead of travelling to a replica.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_sd.models.descriptors import UNET, VAE_ENCODER
from trt_sd.models.errors import InputError
from trt_sd.models.manifest import MANIFEST_NAME, Manifest
from trt_sd.runtime.request import default_size


@dataclass(frozen=True)
class ModelEntry:
    """One engine directory as the client APIs see it."""

    name: str  # the model name both APIs use (unique in a service)
    engine_dir: str  # absolute path
    model_hash: str
    height: tuple[int, int]  # built (min, max)
    width: tuple[int, int]
    size_multiple: int  # heights / widths must be multiples of this
    default_height: int
    default_width: int
    default_steps: int
    default_guidance: float
    img2img: bool  # a VAE encoder is there
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def short_hash(self) -> str:
        return self.model_hash[:10]

    @property
    def title(self) -> str:
        """The WebUI's checkpoint title: ``name [hash]``."""
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name

    def check_size(self, width: int, height: int) -> None:
        """InputError naming the built range unless this engine can make ``width`` x
        ``height`` images (checked again, component by component, by the replica)."""
        m = self.size_multiple
        if width % m or height % m:
            raise InputError(f"size {width}x{height}: width and height must be multiples of {m}")
        if not (
            self.width[0] <= width <= self.width[1] and self.height[0] <= height <= self.height[1]
        ):
            raise InputError(
                f"size {width}x{height} is outside what model {self.name!r} was built for: "
                f"width {self.width[0]}..{self.width[1]}, height {self.height[0]}..{self.height[1]}"
            )


def model_entry(engine_dir: str | Path, name: str | None = None) -> ModelEntry:
    """Read one engine directory's manifest (InputError / ManifestError if unusable)."""
    path = Path(engine_dir).resolve()
    manifest = Manifest.load(path)
    unet = manifest.components.get(UNET)
    if unet is None:
        raise InputError(f"{path} holds no single UNet engine; trt-sd serve needs one")
    ranges = unet.shape_range
    defaults = manifest.defaults
    return ModelEntry(
        name=name or _model_name(path, manifest),
        engine_dir=str(path),
        model_hash=str(manifest.model.get("hash", "")),
        height=(ranges.height.min, ranges.height.max),
        width=(ranges.width.min, ranges.width.max),
        size_multiple=max(8, manifest.dims.vae_scale_factor),
        default_height=default_size(manifest, "height"),
        default_width=default_size(manifest, "width"),
        default_steps=int(defaults.get("steps", 20)),
        default_guidance=float(defaults.get("guidance", 7.5)),
        img2img=VAE_ENCODER in manifest.components,
        defaults=dict(defaults),
    )


def _model_name(path: Path, manifest: Manifest) -> str:
    """The directory's name (what the operator chose), else the manifest's model name."""
    name = path.name or str(manifest.model.get("name", "model"))
    return re.sub(r"\s+", "-", name.strip()) or "model"


def expand_dirs(dirs: list[str]) -> list[Path]:
    """Engine directories from the command line: each DIR is one, or a folder of them."""
    out: list[Path] = []
    for d in dirs:
        path = Path(d)
        if (path / MANIFEST_NAME).is_file() or not path.is_dir():
            out.append(path)  # a missing dir is reported by Manifest.load with its message
            continue
        children = sorted(p for p in path.iterdir() if (p / MANIFEST_NAME).is_file())
        if not children:
            raise InputError(f"{path} has no {MANIFEST_NAME} and no engine directories inside")
        out.extend(children)
    return out


def load_catalog(dirs: list[str]) -> list[ModelEntry]:
    """Every model of a service, first = the default; names must be unique."""
    entries = [model_entry(p) for p in expand_dirs(dirs)]
    seen: dict[str, str] = {}
    for e in entries:
        if e.name in seen:
            raise InputError(
                f"two engine directories have the model name {e.name!r} "
                f"({seen[e.name]}, {e.engine_dir}); rename one folder"
            )
        seen[e.name] = e.engine_dir
    return entries


def find_model(entries: list[ModelEntry], name: str | None) -> ModelEntry | None:
    """The model a client named: by name, WebUI title or hash prefix (case-insensitive);
    None / "" gives the default; an unknown name gives None."""
    if not name:
        return entries[0]
    key = str(name).strip().lower()
    for e in entries:
        if key in (e.name.lower(), e.title.lower()) or (
            len(key) >= 8 and e.model_hash.lower().startswith(key)
        ):
            return e
    return None
