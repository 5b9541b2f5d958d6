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
from trt_sd.models.families.spec import FamilySpec

#: component -> key prefixes of the original layout (any one suffices)
REQUIRED_PREFIXES: dict[str, tuple[str, ...]] = {
    "UNet": ("model.diffusion_model.",),
    "VAE": ("first_stage_model.",),
    "text encoder": ("cond_stage_model.", "conditioner.embedders.", "text_encoders."),
}


#: original-layout text encoder prefix -> the family whose files have it (for the message)
LAYOUT_FAMILIES: dict[str, str] = {
    "cond_stage_model.": "SD 1.x / 2.x",
    "conditioner.embedders.1.model.": "SDXL base",
    "conditioner.embedders.0.model.": "SDXL refiner",
    "text_encoders.": "SD 3",
}


def check_family_keys(path: Path, keys: Iterable[str], family: FamilySpec) -> None:
    """InputError unless the file holds the text encoders of the ``--config`` folder's
    family (an SD 1.x file with an SDXL config fails in diffusers' converter on a tensor
    shape, which does not say that the two do not belong together)."""
    names = list(keys)
    missing = [p for p in family.single_file_text if not any(k.startswith(p) for k in names)]
    if not missing:
        return
    found = [f for p, f in LAYOUT_FAMILIES.items() if any(k.startswith(p) for k in names)]
    what = f"an {found[0]} checkpoint" if found else "not a checkpoint of a known family"
    raise InputError(
        f"{path.name} is {what}, but the --config folder is {family.label} (its text "
        f"encoders would be under {', '.join(p + '*' for p in missing)}); pass a config "
        "folder of the checkpoint's own family"
    )


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
