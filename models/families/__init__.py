"""Model families: the registry export, the runtime and serving read (see :mod:`.spec`).

A family is identified by the manifest's ``model.family`` (``sd1``, ``sd2``, ``sdxl``);
manifests written before families existed name ``sd1`` or ``sd2`` there already, and one
without it means SD 1.x. Family settings the checkpoint chooses (SDXL's
``force_zeros_for_empty_prompt``) are the manifest's ``family_config``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ManifestError
from .sd import SD1, SD2
from .sdxl import SDXL
from .sdxl_refiner import SDXL_REFINER
from .spec import FamilySpec, PromptRows, TextEncoding

FAMILIES: dict[str, FamilySpec] = {f.name: f for f in (SD1, SD2, SDXL, SDXL_REFINER)}
DEFAULT_FAMILY = "sd1"
#: detection order: the most specific predicate first (SD 2.x before SD 1.x)
_DETECTION = (SDXL, SDXL_REFINER, SD2, SD1)
#: pipelines of families we do not export, by diffusers class name, for the refusal
OTHER_FAMILIES = {
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "FLUX",
    "PixArtAlphaPipeline": "PixArt-alpha",
    "PixArtSigmaPipeline": "PixArt-sigma",
    "KandinskyV22Pipeline": "Kandinsky 2.2",
    "StableCascadeCombinedPipeline": "Stable Cascade",
    "IFPipeline": "DeepFloyd IF",
    "LatentConsistencyModelPipeline": "SD 1.x LCM",
    "StableDiffusionUpscalePipeline": "SD x4 upscaler",
}


def supported() -> str:
    """What users read in refusals: ``SD 1.x, SD 2.x, SDXL``."""
    return ", ".join(f.label for f in FAMILIES.values())


def get_family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ManifestError(
            f"model family {name!r} is not one this trt-sd serves ({supported()}); upgrade trt-sd"
        ) from None


def family_of(raw: Mapping[str, Any]) -> FamilySpec:
    """The family of a manifest dict (``model.family``; absent: SD 1.x, as detected before)."""
    model = raw.get("model") if isinstance(raw, Mapping) else None
    name = model.get("family") if isinstance(model, Mapping) else None
    return get_family(str(name or DEFAULT_FAMILY))


def detect_family(configs: Mapping[str, Mapping[str, Any]]) -> FamilySpec | None:
    """The family whose ``detect`` accepts a checkpoint's configs (None: not one we serve)."""
    return next((f for f in _DETECTION if f.detect(configs)), None)


def family_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    return dict(raw.get("family_config") or {})


__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "OTHER_FAMILIES",
    "FamilySpec",
    "PromptRows",
    "TextEncoding",
    "detect_family",
    "family_config",
    "family_of",
    "get_family",
    "supported",
]
