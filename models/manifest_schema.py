"""Declarative validation of ``manifest.json``: the engine directory is untrusted input.

An engine directory may come from anywhere (a colleague, a model zoo, a copied cache), so the
runtime checks every field it reads before using it: its JSON type, its range, and for file
names that they stay inside the engine directory. One table per JSON object says what each
field must be (:data:`TOP_FIELDS`, :data:`COMPONENT_FIELDS`, ...), built from the checks in
:mod:`.json_checks`; adding a field is one line. Fields a table does not name pass through
unchecked (an older runtime ignores what a newer export adds), except that in a component entry
anything whose key names a file (``file``, ``*_file``) is always checked as a path. A newer
``schema_version`` is refused by :class:`~trt_sd.models.manifest.Manifest` with an upgrade hint.

Errors are :class:`ManifestError` with the field's dotted path, what it must be and the JSON
type found; values are never echoed beyond a short, quoted prefix, so a message cannot leak the
content of a file a manifest points at.
"""

from __future__ import annotations

from typing import Any

from .errors import ManifestError
from .json_checks import (
    Check,
    Field,
    array,
    boolean,
    fail,
    integer,
    is_file_key,
    nullable,
    number,
    obj,
    one_of,
    opt,
    relpath,
    req,
    sha256,
    shown,
    string,
)

__all__ = ["is_file_key", "named_files", "shown", "validate"]

#: generous ceilings: far above any real model, low enough that nothing derived from them
#: (latent arrays, output paths, loops) can exhaust memory before a request is refused
MAX_BATCH = 4096
MAX_PIXELS_SIDE = 16384
MAX_TEXT_LENGTH = 77 * 64  # 64 prompt chunks: far above any exported range
MAX_DIM = 1 << 20
#: engine I/O dtypes (a NumPy name the backends cast feeds to; never ``object`` or a void blob)
DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "int8", "uint8", "bool")


# ---- the tables -----------------------------------------------------------------------------
def _range(hi: int) -> Check:
    def check(value: Any, where: str) -> None:
        array(integer(1, hi), 3, 3)(value, where)
        if not value[0] <= value[1] <= value[2]:
            raise fail(where, "[min, opt, max] with min <= opt <= max", value)

    return check


def shape_range(value: Any, where: str) -> None:
    obj(
        {
            "batch": req(_range(MAX_BATCH)),
            "height": req(_range(MAX_PIXELS_SIDE)),
            "width": req(_range(MAX_PIXELS_SIDE)),
            "vae_scale_factor": opt(integer(1, 64)),
            "text_length": opt(_range(MAX_TEXT_LENGTH)),
        }
    )(value, where)
    factor = value.get("vae_scale_factor", 8)
    for axis in ("height", "width"):
        if any(v % factor for v in value[axis]):
            raise fail(f"{where}.{axis}", f"multiples of vae_scale_factor {factor}", value[axis])


_AXIS = lambda v, w: (  # noqa: E731 - an axis is a symbol ("unet_batch") or a fixed size
    string(max_len=64)(v, w) if isinstance(v, str) else integer(0, MAX_DIM)(v, w)
)
TENSOR = obj(
    {
        "name": req(string(max_len=256)),
        "dtype": req(string(DTYPES)),
        "shape": req(array(_AXIS, 0, 16)),
    }
)
DATA_FILE = obj({"file": req(relpath), "sha256": req(sha256)})

#: one component entry (``manifest.components.<name>``)
COMPONENT_FIELDS: dict[str, Field] = {
    "file": req(relpath),
    "sha256": req(sha256),
    "backend": req(string()),  # the allowed set is checked by ComponentEntry (better message)
    "precision": req(string()),
    "inputs": req(array(TENSOR, 1, 64)),
    "outputs": req(array(TENSOR, 1, 64)),
    "shape_range": req(shape_range),
    "verification": opt(nullable(obj({}, files=False))),
    "external_data": opt(nullable(DATA_FILE)),
    "lora_map": opt(nullable(DATA_FILE)),  # where run-time LoRAs patch (models/lora/weights.py)
    "lora_modules": opt(integer(0)),
    "onnx_file": opt(relpath),
    "onnx_sha256": opt(sha256),
    "bytes": opt(integer(0)),
    "opset": opt(integer(1, 1000)),
    "static_shapes": opt(boolean),
    "version_compatible": opt(boolean),
    "tensorrt_version": opt(string(max_len=64)),
    "compute_capability": opt(string(max_len=64)),
    "hardware_compatible": opt(string(max_len=64)),
}

_DIM_NAMES = ("text_hidden_size", "unet_in_channels", "unet_out_channels", "latent_channels")
_SDXL_DIMS = ("text_hidden_size_2", "text_pooled_size", "time_ids_size")
DIMS = obj(
    {
        **{k: opt(integer(1, MAX_DIM)) for k in (*_DIM_NAMES, "image_channels")},
        # SDXL: the second text encoder, its pooled output and the micro-conditioning ids
        **{k: opt(integer(0, MAX_DIM)) for k in _SDXL_DIMS},
        "text_max_length": opt(integer(3, 4096)),
        "vae_scale_factor": opt(integer(1, 64)),
    }
)

TOKENIZER = obj(
    {
        "vocab": req(relpath),
        "merges": req(relpath),
        "max_length": opt(nullable(integer(3, 4096))),
        **{k: opt(string(max_len=256)) for k in ("bos", "eos", "pad", "unk")},
        **{f"{k}_token": opt(string(max_len=256)) for k in ("bos", "eos", "pad", "unk")},
        "do_lower_case": opt(boolean),
        "sha256": opt(obj({"vocab": opt(sha256), "merges": opt(sha256)})),
    }
)

#: diffusers scheduler_config.json keys the samplers read (others pass verbatim)
SCHEDULER = obj(
    {
        "num_train_timesteps": opt(integer(2, 100_000)),
        "beta_start": opt(number(0, 1)),
        "beta_end": opt(number(0, 1)),
        "beta_schedule": opt(string(max_len=64)),
        "trained_betas": opt(nullable(array(number(0, 1), 2, 100_000))),
        "steps_offset": opt(integer(0, 100_000)),
        "timestep_spacing": opt(string(max_len=64)),
        "prediction_type": opt(string(max_len=64)),
        "set_alpha_to_one": opt(boolean),
        "clip_sample": opt(boolean),
        "clip_sample_range": opt(number(0)),
        "use_karras_sigmas": opt(nullable(boolean)),
        "use_exponential_sigmas": opt(nullable(boolean)),
        "rescale_betas_zero_snr": opt(nullable(boolean)),
        "solver_order": opt(integer(1, 3)),
        "final_sigmas_type": opt(string(max_len=64)),
        "interpolation_type": opt(string(max_len=64)),
        "sigma_min": opt(nullable(number(0))),
        "sigma_max": opt(nullable(number(0))),
        "timestep_type": opt(string(max_len=64)),
    }
)

DEFAULTS = obj(
    {
        "height": opt(integer(1, MAX_PIXELS_SIDE)),
        "width": opt(integer(1, MAX_PIXELS_SIDE)),
        "steps": opt(integer(1, 1000)),
        "guidance": opt(number(0, 1000)),
        "prompt": opt(string(max_len=4096)),
        "negative_prompt": opt(string(max_len=4096)),
        "sampler": opt(string(max_len=64)),
    }
)

MODEL = obj(
    {k: opt(nullable(string(max_len=4096))) for k in ("name", "source", "hash", "family", "format")}
)


_BLOCKS = 16
#: the UNet layer layout that partition / DeepCache plans rebuild (sizes bound the loops)
LAYOUT = obj(
    {
        "block_out_channels": req(array(integer(1, 1 << 16), 1, _BLOCKS)),
        "layers_per_block": req(one_of(integer(1, 64), array(integer(1, 64), 1, _BLOCKS))),
        "down_block_types": req(array(string(max_len=128), 1, _BLOCKS)),
        "up_block_types": req(array(string(max_len=128), 1, _BLOCKS)),
        "mid_block_type": opt(nullable(string(max_len=128))),
        "time_embed_dim": opt(nullable(integer(1, MAX_DIM))),
    }
)
_NAMES = array(string(max_len=256), 0, 256)
UNET_PARTITION = obj(
    {
        "layout": req(LAYOUT),
        "cuts": req(array(integer(0, 10_000), 0, 64)),
        "stages": req(
            array(
                obj(
                    {
                        "component": req(string(max_len=64)),
                        "inputs": req(_NAMES),
                        "outputs": req(_NAMES),
                    }
                ),
                0,
                65,
            )
        ),
    }
)
UNET_DEEPCACHE = obj(
    {
        "layout": req(LAYOUT),
        "branch": req(integer(0, 10_000)),
        "feature": opt(string(max_len=256)),
    }
)
#: ControlNets (:mod:`trt_sd.models.controlnet`): the UNet layout their residuals follow
CONTROLNET = obj(
    {
        "layout": req(LAYOUT),
        "models": req(
            array(
                obj(
                    {
                        "component": req(string(max_len=64)),
                        "conditioning_channels": req(integer(1, 64)),
                        "source": opt(string(max_len=4096)),
                        "hash": opt(string(max_len=128)),
                    }
                ),
                1,
                16,
            )
        ),
    }
)


def schema_version(value: Any, where: str) -> None:
    # bool is an int subclass: `true` must not read as version 1
    integer(1)(value, where)


def components(value: Any, where: str) -> None:
    """Every entry follows :data:`COMPONENT_FIELDS` (names are checked by the Manifest)."""
    if not isinstance(value, dict) or not value:
        raise fail(where, "a non-empty object", value)
    for name, entry in value.items():
        obj(COMPONENT_FIELDS)(entry, f"{where}.{name}")


#: the tokenizers of second (third, ...) text encoders: SDXL's ``tokenizer_2``
EXTRA_TOKENIZERS = ("tokenizer_2",)

#: the top level of ``manifest.json``
TOP_FIELDS: dict[str, Field] = {
    "schema_version": req(schema_version),
    "model": req(MODEL),
    "components": req(components),
    "scheduler": req(SCHEDULER),
    "prediction_type": req(string()),
    "vae_scaling_factor": req(number(0, 1000, open_lo=True)),
    "tokenizer": req(TOKENIZER),
    **{key: opt(nullable(TOKENIZER)) for key in EXTRA_TOKENIZERS},
    "dims": req(DIMS),
    # the family's pipeline settings (``force_zeros_for_empty_prompt``, ...): flags and numbers
    "family_config": opt(nullable(obj({}, files=False))),
    "defaults": opt(nullable(DEFAULTS)),
    "unet_partition": opt(nullable(UNET_PARTITION)),
    "unet_deepcache": opt(nullable(UNET_DEEPCACHE)),
    "controlnet": opt(nullable(CONTROLNET)),
    "quantization": opt(nullable(obj({}, files=False))),
    "export": opt(nullable(obj({}, files=False))),
    "tools": opt(nullable(obj({}, files=False))),
    "created": opt(nullable(string(max_len=64))),
}


def validate(raw: Any) -> None:
    """ManifestError naming the first field that is not what :data:`TOP_FIELDS` says."""
    if not isinstance(raw, dict):
        raise ManifestError("manifest.json does not hold a JSON object")
    obj(TOP_FIELDS)(raw, "")


def named_files(raw: Any) -> list[str]:
    """Every file name a (validated) manifest makes the runtime open: ``file`` / ``*_file``
    keys at any depth of the component entries (engine files, external data, the ONNX graph of
    a TensorRT engine) and the tokenizer's files. Also takes one component entry."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, v in value.items():
                if key == "verification":
                    continue  # a report, not something to open
                if is_file_key(str(key)) and isinstance(v, str):
                    found.append(v)
                else:
                    walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    if not isinstance(raw, dict):
        return found
    walk(raw["components"] if isinstance(raw.get("components"), dict) else raw)
    for key in ("tokenizer", *EXTRA_TOKENIZERS):
        tok = raw.get(key)
        if isinstance(tok, dict):
            found += [tok[k] for k in ("vocab", "merges") if isinstance(tok.get(k), str)]
    return list(dict.fromkeys(found))
