"""Find, inspect and hash a checkpoint without importing torch.

A checkpoint is either a diffusers folder (``model_index.json`` + component subfolders) or one
``.safetensors`` file in the original Stable Diffusion (LDM) key layout. Everything the manifest
needs besides the engines (dims, scheduler, tokenizer, family, defaults) comes from the JSON
configs, so bad inputs are refused in milliseconds, before torch and the weights are loaded.

Pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) execute code when unpickled; they are
refused unless the caller opts in with ``allow_pickle``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_sd.models import DEFAULT_MODEL_DIR, InputError, ModelDims
from trt_sd.models.descriptors import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER
from trt_sd.models.families import OTHER_FAMILIES, FamilySpec, detect_family, supported
from trt_sd.models.paths import DEFAULT_MODEL_NAME

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
#: diffusers subfolder holding each SD 1.x / 2.x component's weights (each family's are its
#: ``sources``).
SUBFOLDER = {TEXT_ENCODER: "text_encoder", UNET: "unet", VAE_DECODER: "vae", VAE_ENCODER: "vae"}
DEFAULT_PROMPT = "a photo of an astronaut riding a horse on the moon"
BUNDLED_PROMPT = "a handwritten digit seven"
_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def hash_tree(folder: Path) -> str:
    """Content hash of every file under ``folder`` (relative names included, order fixed)."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise InputError(f"{what}: {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{what}: {path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{what}: {path} does not hold a JSON object")
    return data


def _token(value: Any) -> str | None:
    """Special tokens are strings or ``{"content": ...}`` objects depending on the writer."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _check_safetensors(path: Path) -> list[str]:
    """Open the header so a truncated or foreign file fails here with one line; its tensor
    names."""
    from safetensors import safe_open

    from .checkpoint_keys import check_single_file_keys

    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            if not keys:
                raise InputError(f"{path} holds no tensors")
            check_single_file_keys(path, keys)  # a LoRA / foreign model: one line
            return keys
    except InputError:
        raise
    except Exception as e:  # safetensors raises its own error types for every corruption
        raise InputError(f"{path} is not a readable .safetensors file ({e})") from None


@dataclass
class Checkpoint:
    """A located, inspected checkpoint: configs read, weights not loaded."""

    kind: str  # "folder" | "single_file"
    path: Path  # the folder, or the .safetensors file
    config_dir: Path  # diffusers folder with the configs and tokenizer (== path for folders)
    name: str
    bundled: bool
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    tokenizer_config: dict[str, Any]
    family_spec: FamilySpec
    index: dict[str, Any] = field(default_factory=dict)  # model_index.json
    #: every text encoder's config and every tokenizer's settings, by subfolder
    text_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokenizer_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    allow_pickle: bool = False
    _hashes: dict[str, str] = field(default_factory=dict, repr=False)

    # ---- derived facts ------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)

    @property
    def dims(self) -> ModelDims:
        """Sizes from the configs: the family's text encoders in order (the second one's
        hidden and projection sizes where there is one), the UNet's text-time conditioning."""
        family = self.family_spec
        encoders = [
            (e, self.text_configs[family.sources[e.component][0]]) for e in family.text_encoders
        ]
        second = encoders[1][1] if len(encoders) > 1 else {}
        pooled = next(  # the projected pooled embedding comes from a *WithProjection encoder
            (
                int(cfg.get("projection_dim", 0))
                for e, cfg in encoders
                if family.sources[e.component][1] == "clip_text_projection"
            ),
            0,
        )
        u = self.unet_config
        time_ids = 0
        if u.get("addition_embed_type") == "text_time":
            total = int(u["projection_class_embeddings_input_dim"])
            time_ids = (total - pooled) // int(u["addition_time_embed_dim"])
        return ModelDims(
            text_max_length=int(self.text_config.get("max_position_embeddings", 77)),
            text_hidden_size=int(self.text_config["hidden_size"]),
            unet_in_channels=int(u.get("in_channels", 4)),
            unet_out_channels=int(u.get("out_channels", 4)),
            latent_channels=int(self.vae_config.get("latent_channels", 4)),
            image_channels=int(self.vae_config.get("in_channels", 3)),
            vae_scale_factor=self.vae_scale_factor,
            text_hidden_size_2=int(second.get("hidden_size", 0)),
            text_pooled_size=pooled,
            time_ids_size=time_ids,
            time_cond_proj_dim=int(u.get("time_cond_proj_dim") or 0),
        )

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def family(self) -> str:
        """The family's name (``sd1``, ``sd2``, ``sdxl``; see :mod:`trt_sd.models.families`)."""
        return self.family_spec.name

    def family_config(self) -> dict[str, Any]:
        """The family's pipeline settings from ``model_index.json`` (manifest
        ``family_config``)."""
        return {k: self.index.get(k, v) for k, v in self.family_spec.settings.items()}

    @property
    def native_size(self) -> int:
        return int(self.unet_config.get("sample_size", 64)) * self.vae_scale_factor

    def defaults(self) -> dict[str, Any]:
        size = self.native_size
        return {
            "height": size,
            "width": size,
            "steps": 30,
            "guidance": 7.5,
            "prompt": BUNDLED_PROMPT if self.bundled else DEFAULT_PROMPT,
        }

    def tokenizer_entries(self) -> dict[str, dict[str, Any]]:
        """Manifest key -> tokenizer settings, one per text encoder of the family
        (``tokenizer``, and ``tokenizer_2`` for SDXL); the key is also the folder name."""
        return {
            e.tokenizer: self.tokenizer_entry(e.tokenizer) for e in self.family_spec.text_encoders
        }

    def tokenizer_entry(self, sub: str = "tokenizer") -> dict[str, Any]:
        """A manifest ``tokenizer`` object (file names relative to the engine directory)."""
        cfg = self.tokenizer_configs.get(sub, self.tokenizer_config)
        return {
            "vocab": f"{sub}/vocab.json",
            "merges": f"{sub}/merges.txt",
            # some tokenizer configs say 1e30 ("no limit"); the text encoder's positions cap it
            "max_length": min(int(cfg.get("model_max_length") or 10**9), self.dims.text_max_length),
            "bos": _token(cfg.get("bos_token")) or "<|startoftext|>",
            "eos": _token(cfg.get("eos_token")) or "<|endoftext|>",
            "pad": _token(cfg.get("pad_token")) or "<|endoftext|>",
            "unk": _token(cfg.get("unk_token")) or "<|endoftext|>",
            "do_lower_case": bool(cfg.get("do_lower_case", True)),
        }

    # ---- hashing ------------------------------------------------------------------------------
    def weights_hash(self, component: str) -> str:
        """Content hash of what one component is built from (weights + its config)."""
        sub = self.family_spec.sources[component][0]
        if sub not in self._hashes:
            if self.kind == "folder":
                self._hashes[sub] = hash_tree(self.path / sub)
            else:
                h = hashlib.sha256(self._file_hash().encode())
                h.update(sha256_file(self.config_dir / sub / "config.json").encode())
                self._hashes[sub] = h.hexdigest()
        return self._hashes[sub]

    def _file_hash(self) -> str:
        if "file" not in self._hashes:
            self._hashes["file"] = sha256_file(self.path)
        return self._hashes["file"]

    def model_hash(self) -> str:
        """Identity of the whole model: the weights of every component."""
        if self.kind == "single_file":
            return self._file_hash()
        h = hashlib.sha256()
        for comp in self.family_spec.required:
            h.update(self.weights_hash(comp).encode())
        return h.hexdigest()

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": str(self.path),
            "hash": self.model_hash(),
            "family": self.family,
            "format": "diffusers" if self.kind == "folder" else "single_file",
        }


def _refuse_pickle(path: Path, allow_pickle: bool) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise InputError(
            f"{path.name} is a pickle checkpoint, which runs code when loaded; convert it to "
            ".safetensors or pass --allow-pickle (allow_pickle=True) if you trust it"
        )


def _check_component_weights(folder: Path, family: FamilySpec, allow_pickle: bool) -> None:
    """Each component subfolder needs .safetensors weights (or pickle ones, when allowed)."""
    for sub in dict.fromkeys(sub for sub, _ in family.sources.values()):
        d = folder / sub
        if not d.is_dir():
            raise InputError(f"{folder} is not a {family.label} folder: {sub}/ is missing")
        names = [p.name for p in d.iterdir()]
        if any(n.endswith(".safetensors") for n in names):
            continue
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            _refuse_pickle(d / pickles[0], allow_pickle)
            continue
        raise InputError(f"{d} has no weights (.safetensors) to export")


def _refuse_family(folder: Path, index: dict[str, Any]) -> InputError:
    cls = str(index.get("_class_name", "unknown pipeline"))
    family = OTHER_FAMILIES.get(cls)
    what = f"a {cls} ({family})" if family else f"a {cls}"
    return InputError(f"{folder} holds {what}; trt-sd exports {supported()} pipelines")


def _read_configs(config_dir: Path) -> dict[str, Any]:
    """Every config the manifest needs, after telling the family from them (one line naming
    the pipeline and what we support when it is not one of ours)."""
    index = _read_json(config_dir / "model_index.json", "diffusers folder")
    present = [k for k, v in index.items() if not k.startswith("_") and _names_a_part(v)]
    if index.get("_class_name") in OTHER_FAMILIES or not {"unet", "vae"} <= set(present):
        raise _refuse_family(config_dir, index)
    first = next((k for k in ("text_encoder", "text_encoder_2") if k in present), None)
    if first is None:
        raise _refuse_family(config_dir, index)
    configs = {
        "index": {k: index[k] for k in present}
        | {k: v for k, v in index.items() if not isinstance(v, list)},  # settings, class name
        "unet": _read_config(config_dir, "unet", "config.json", "UNet config"),
        "text_encoder": _read_config(config_dir, first, "config.json", "text config"),
        "scheduler": _read_config(
            config_dir, "scheduler", "scheduler_config.json", "scheduler config"
        ),
    }
    family = detect_family(configs)
    if family is None:
        raise _refuse_family(config_dir, index)
    text_configs, tokenizer_configs = {}, {}
    for enc in family.text_encoders:
        sub = family.sources[enc.component][0]
        text_configs[sub] = _read_config(config_dir, sub, "config.json", f"{sub} config")
        tokenizer_configs[enc.tokenizer] = _tokenizer_settings(config_dir, enc.source_folder)
    return {
        "unet_config": configs["unet"],
        "vae_config": _read_config(config_dir, "vae", "config.json", "VAE config"),
        "text_config": configs["text_encoder"],
        "scheduler_config": configs["scheduler"],
        "tokenizer_config": tokenizer_configs[family.text_encoders[0].tokenizer],
        "family_spec": family,
        "index": index,
        "text_configs": text_configs,
        "tokenizer_configs": tokenizer_configs,
    }


def _names_a_part(value: Any) -> bool:
    """``model_index.json`` lists a part as ``[library, class]``; ``[null, null]`` is none."""
    if isinstance(value, list | tuple):
        return not value or any(v is not None for v in value)
    return value is not None and not isinstance(value, bool | int | float)


def _read_config(config_dir: Path, sub: str, fname: str, what: str) -> dict[str, Any]:
    if not (config_dir / sub).is_dir():
        raise InputError(f"{config_dir} is not a Stable Diffusion folder: {sub}/ is missing")
    return _read_json(config_dir / sub / fname, what)


def _tokenizer_settings(config_dir: Path, sub: str) -> dict[str, Any]:
    tok_dir = config_dir / sub
    for fname in ("vocab.json", "merges.txt"):
        if not (tok_dir / fname).is_file():
            raise InputError(f"{config_dir} has no CLIP tokenizer: {sub}/{fname} is missing")
    tok_cfg: dict[str, Any] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
        if (tok_dir / fname).is_file():
            tok_cfg.update(_read_json(tok_dir / fname, "tokenizer"))
    return tok_cfg


def locate(
    model: str | os.PathLike[str] | None,
    *,
    config: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
) -> Checkpoint:
    """Resolve ``model`` (``None`` = the bundled default) and read its configs.

    ``config`` is only for single files: a local diffusers folder of the same architecture that
    supplies the component configs and tokenizer (there is no model hub to fetch them from).
    """
    bundled = model is None
    path = Path(DEFAULT_MODEL_DIR if model is None else model).expanduser()
    if bundled and not (path / "model_index.json").is_file():
        raise InputError(
            f"the bundled default model is not installed ({path} has no model_index.json); "
            "pass a model folder or .safetensors file to export"
        )
    if not path.exists():
        raise InputError(f"model {str(path)!r} does not exist")
    keys: list[str] | None = None  # a single .safetensors file's tensor names
    if path.is_dir():
        if config is not None:
            raise InputError(
                "--config is only for single-file checkpoints; "
                f"{'the bundled model' if bundled else str(path)!r} is already a diffusers "
                "folder with its own configs"
            )
        if not (path / "model_index.json").is_file():
            raise InputError(
                f"{path} is not a diffusers folder (no model_index.json); pass a diffusers "
                "Stable Diffusion folder or a single .safetensors checkpoint"
            )
        config_dir, kind = path, "folder"
    else:
        _refuse_pickle(path, allow_pickle)
        if path.suffix.lower() != ".safetensors" and path.suffix.lower() not in PICKLE_SUFFIXES:
            raise InputError(
                f"{path.name}: unsupported checkpoint type; pass a diffusers folder or a "
                ".safetensors file"
            )
        keys = _check_safetensors(path) if path.suffix.lower() == ".safetensors" else None
        if config is None:
            raise InputError(
                f"{path.name} is a single-file checkpoint: pass config=DIR (--config DIR), a "
                "local diffusers folder of the same architecture with its configs and "
                "tokenizer (there is no model hub to fetch them from)"
            )
        config_dir, kind = Path(config).expanduser(), "single_file"
        if not (config_dir / "model_index.json").is_file():
            raise InputError(f"config {str(config_dir)!r} is not a diffusers folder")
    configs = _read_configs(config_dir)
    if kind == "folder":
        _check_component_weights(path, configs["family_spec"], allow_pickle)
    elif keys is not None:
        from .checkpoint_keys import check_family_keys

        check_family_keys(path, keys, configs["family_spec"])
    name = DEFAULT_MODEL_NAME if bundled else (path.name if path.is_dir() else path.stem)
    return Checkpoint(
        kind=kind,
        path=path.resolve(),
        config_dir=config_dir.resolve(),
        name=name,
        bundled=bundled,
        allow_pickle=allow_pickle,
        **configs,
    )
