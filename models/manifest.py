"""``manifest.json``: the contract between ``trt-sd export`` and the runtime.

The export stage writes it last (inside a temporary directory that is renamed into place), the
runtime reads and validates it before touching any engine file. The schema is versioned: a
runtime refuses a manifest whose ``schema_version`` is newer than it understands, with a message
that says to upgrade, instead of misreading it.

Only plain JSON types are stored; :class:`Manifest` is a thin typed view over the dict.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import integrity, manifest_schema
from .controlnet import CONTROLNET_PREFIX
from .descriptors import ModelDims, ShapeRange
from .errors import InputError, ManifestError
from .families import FamilySpec, family_of

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: Components every SD 1.x / 2.x engine directory must have (the VAE encoder, for img2img, is
#: optional); each family lists its own (:attr:`trt_sd.models.families.FamilySpec.required`).
REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
#: a manifest is a few kB; refusing a huge one keeps a hostile directory from exhausting memory
MAX_MANIFEST_BYTES = 16 << 20


@dataclass(frozen=True)
class ComponentEntry:
    """One engine file and what it was built for."""

    name: str
    file: str
    sha256: str
    backend: str
    precision: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    shape_range: ShapeRange
    verification: dict[str, Any]
    extra: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = {
            "file": self.file,
            "sha256": self.sha256,
            "backend": self.backend,
            "precision": self.precision,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "shape_range": self.shape_range.to_dict(),
            "verification": self.verification,
        }
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> ComponentEntry:
        known = {
            "file",
            "sha256",
            "backend",
            "precision",
            "inputs",
            "outputs",
            "shape_range",
            "verification",
        }
        try:
            entry = cls(
                name=name,
                file=str(d["file"]),
                sha256=str(d.get("sha256", "")),
                backend=str(d["backend"]),
                precision=str(d["precision"]),
                inputs=list(d["inputs"]),
                outputs=list(d["outputs"]),
                shape_range=ShapeRange.from_dict(d["shape_range"]),
                verification=dict(d.get("verification") or {}),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError, InputError) as e:  # validated: not expected
            raise ManifestError(f"manifest component {name!r} is malformed: {e}") from None
        if entry.backend not in BACKENDS:
            raise ManifestError(
                f"manifest component {name!r} has backend "
                f"{manifest_schema.shown(entry.backend)}; "
                f"this runtime serves {', '.join(BACKENDS)}"
            )
        if entry.precision not in PRECISIONS:
            raise ManifestError(
                f"manifest component {name!r} has precision "
                f"{manifest_schema.shown(entry.precision)}; "
                f"expected one of {', '.join(PRECISIONS)}"
            )
        return entry


@dataclass(frozen=True)
class Manifest:
    """Typed, validated view of ``manifest.json``."""

    raw: dict[str, Any]
    components: dict[str, ComponentEntry]

    # ---- convenient accessors -------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        return int(self.raw["schema_version"])

    @property
    def model(self) -> dict[str, Any]:
        """``{"name", "source", "hash", "family"}``: what was exported."""
        return dict(self.raw["model"])

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The checkpoint's own ``scheduler_config.json`` (diffusers keys, verbatim)."""
        return dict(self.raw["scheduler"])

    @property
    def family(self) -> FamilySpec:
        """The model family (``model.family``; manifests without it are SD 1.x)."""
        return family_of(self.raw)

    @property
    def prediction_type(self) -> str:
        return str(self.raw["prediction_type"])

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.raw["vae_scaling_factor"])

    @property
    def dims(self) -> ModelDims:
        return ModelDims.from_dict(self.raw["dims"])

    @property
    def tokenizer(self) -> dict[str, Any]:
        """Tokenizer files relative to the engine directory plus its settings
        (``vocab``, ``merges``, ``max_length``, ``pad_token``, ...)."""
        return dict(self.raw["tokenizer"])

    @property
    def unet_partition(self) -> dict[str, Any] | None:
        return self.raw.get("unet_partition")

    @property
    def quantization(self) -> dict[str, Any] | None:
        return self.raw.get("quantization")

    @property
    def defaults(self) -> dict[str, Any]:
        """Generation defaults for this model (height, width, steps, guidance, prompt)."""
        return dict(self.raw.get("defaults") or {})

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.raw)
        d["components"] = {n: c.to_dict() for n, c in self.components.items()}
        return d

    # ---- (de)serialisation ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        manifest_schema.validate(raw)  # every field's type and range (see that module)
        version = raw["schema_version"]
        if version > SCHEMA_VERSION:
            raise ManifestError(
                f"manifest.json has schema version {version}, newer than this trt-sd "
                f"understands ({SCHEMA_VERSION}); upgrade trt-sd or re-export with this version"
            )
        if raw["prediction_type"] not in PREDICTION_TYPES:
            raise ManifestError(
                "manifest prediction_type "
                f"{manifest_schema.shown(raw['prediction_type'])} is not one of "
                f"{', '.join(PREDICTION_TYPES)}"
            )
        comps_raw = raw["components"]
        if not isinstance(comps_raw, dict):
            raise ManifestError("manifest 'components' must be an object")
        family = family_of(raw)
        known = family.component_names
        extra = ("unet", CONTROLNET_PREFIX) if raw.get("controlnet") else ("unet",)
        unknown = [n for n in comps_raw if n not in known and not n.startswith(extra)]
        if unknown:
            names = ", ".join(manifest_schema.shown(n) for n in unknown[:5])
            raise ManifestError(f"manifest names unknown components: {names}")
        components = {n: ComponentEntry.from_dict(n, c) for n, c in comps_raw.items()}
        absent = [n for n in family.required if n not in components]
        if absent and not (raw.get("unet_partition") and "unet" in absent and len(absent) == 1):
            raise ManifestError(f"manifest lacks components: {', '.join(absent)}")
        return cls(raw=raw, components=components)

    @classmethod
    def load(cls, engine_dir: str | os.PathLike[str]) -> Manifest:
        """Read and validate ``engine_dir/manifest.json``; every failure is a ManifestError."""
        path = Path(engine_dir)
        if not path.is_dir():
            raise ManifestError(
                f"engine directory {str(path)!r} does not exist; run `trt-sd export` first"
            )
        mpath = path / MANIFEST_NAME
        if not mpath.is_file():
            raise ManifestError(
                f"{str(path)!r} has no {MANIFEST_NAME}: not an engine directory written by "
                "`trt-sd export` (or the export did not finish)"
            )
        raw = _read_json(mpath)
        manifest = cls.from_dict(raw)
        integrity.check_tree(path)  # no symlink leads out of the directory
        for fname in manifest_schema.named_files(raw):
            if not integrity.inside(path, fname, "manifest file").is_file():
                owner = next(
                    (e.name for e in manifest.components.values() if fname in _entry_names(e)),
                    None,
                )
                detail = f" (component {owner})" if owner else ""
                raise ManifestError(
                    f"engine directory {str(path)!r} is incomplete: {fname}{detail} is missing"
                )
        return manifest

    def write(self, engine_dir: str | os.PathLike[str]) -> Path:
        """Write ``manifest.json`` atomically (temp file + rename)."""
        path = Path(engine_dir) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", "utf-8")
        os.replace(tmp, path)
        return path


def _entry_names(entry: ComponentEntry) -> list[str]:
    return manifest_schema.named_files(entry.to_dict())


def _read_json(mpath: Path) -> Any:
    """The parsed manifest; ManifestError (never the file's content) for anything else."""
    try:
        size = mpath.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"{mpath} is {size} bytes; a manifest is at most {MAX_MANIFEST_BYTES} bytes"
            )
        text = mpath.read_bytes().decode("utf-8")
        return json.loads(text, parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise ManifestError(f"{mpath} is not readable: {reason}") from None
    except json.JSONDecodeError as e:  # its message holds a position, not the content
        raise ManifestError(f"{mpath} is not readable JSON ({e.msg} at line {e.lineno})") from None
    except (RecursionError, ValueError):
        raise ManifestError(f"{mpath} is not readable JSON (nested too deeply, or NaN)") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
