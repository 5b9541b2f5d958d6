"""Is a single-file checkpoint a Stable Diffusion checkpoint at all? Decided from its keys.

A ``.safetensors`` file can hold anything: a LoRA, a textual-inversion embedding, a VAE alone,
another model's weights. Handed to diffusers' single-file loader with ``--config``, such a file
fails deep inside it with a multi-line traceback. Its header lists every tensor name, and the
original (LDM) layout that single-file loaders read puts each component under a fixed prefix,
so the check is cheap (no weights are read) and the message can say what is missing.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from trt_sd.models.errors import InputError

#: component -> key prefixes of the original layout (any one suffices)
REQUIRED_PREFIXES: dict[str, tuple[str, ...]] = {
    "UNet": ("model.diffusion_model.",),
    "VAE": ("first_stage_model.",),
    "text encoder": ("cond_stage_model.", "conditioner.embedders.", "text_encoders."),
}


def check_single_file_keys(path: Path, keys: Iterable[str]) -> None:
    """InputError unless ``keys`` hold a UNet, a VAE and a text encoder in the original
    layout; the message names what is missing (never a tensor's content)."""
    names = list(keys)
    missing = [
        f"{what} ({prefixes[0]}*)"
        for what, prefixes in REQUIRED_PREFIXES.items()
        if not any(k.startswith(prefixes) for k in names)
    ]
    if missing:
        raise InputError(
            f"{path.name} is not a full Stable Diffusion checkpoint: it has no "
            f"{', no '.join(missing)} weights ({len(names)} tensors; a LoRA, an embedding or "
            "another model's file?); export needs a complete single-file SD checkpoint"
        )
