"""One generation request: the caller's arguments, defaulted from the manifest and validated.

Validation happens here, before any engine runs, so a bad argument costs nothing and raises an
:class:`InputError` naming what is wrong and what is allowed.
"""

from __future__ import annotations

import math
import numbers
import operator
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from trt_sd.models.descriptors import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER
from trt_sd.models.errors import InputError
from trt_sd.models.manifest import Manifest

from .prompt_chunks import EMPHASIS_MODES

DEFAULT_SAMPLER = "dpm++"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5
DEFAULT_STRENGTH = 0.8  # diffusers' img2img default
DEFAULT_EMPHASIS = "original"  # the WebUI's default emphasis mode
MAX_SEED = 2**63 - 1
#: Absolute ceilings, checked before anything proportional to them is allocated (output paths,
#: noise, sampler tables) and before the engines' own shape ranges: far above any real use.
MAX_BATCH = 4096
MAX_STEPS = 1000  # the training schedule's length: more steps revisit the same noise levels
MAX_SIDE = 16384
#: the UNet reads a few 75-token chunks (``--prompt-chunks``); a longer prompt is truncated
#: anyway, and tokenising megabytes on the shared scheduler thread would stall every request
MAX_PROMPT_CHARS = 4096


@dataclass(frozen=True)
class Request:
    """Everything that determines the images (plus the batch layout)."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    sampler: str
    steps: int
    guidance: float
    guidance_rescale: float
    seed: int
    height: int
    width: int
    batch: int
    strength: float | None  # None: txt2img; a float: img2img
    karras: bool | None
    eta: float | None
    sampler_options: dict[str, Any] = field(default_factory=dict)  # e.g. exponential sigmas
    #: how ``(word:1.3)`` / ``[word]`` are read (:data:`~.prompt_chunks.EMPHASIS_MODES`)
    emphasis: str = DEFAULT_EMPHASIS
    #: the UNet takes the guidance scale as an input (LCM-distilled): no CFG rows
    guidance_embedded: bool = False

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance runs only above 1 (diffusers: ``guidance_scale > 1``),
        and never for a UNet that embeds the guidance scale (diffusers: no
        ``time_cond_proj_dim``)."""
        return self.guidance > 1.0 and not self.guidance_embedded

    @property
    def seeds(self) -> list[int]:
        """Image ``i`` of a batch is drawn from ``seed + i`` (as the WebUI does), so each image
        can be regenerated alone."""
        return [self.seed + i for i in range(self.batch)]

    def to_params(self) -> dict[str, Any]:
        params = asdict(self)
        params["prompt"] = (
            params.pop("prompts")[0] if len(set(self.prompts)) == 1 else list(self.prompts)
        )
        negatives = params.pop("negative_prompts")
        params["negative_prompt"] = negatives[0] if len(set(negatives)) == 1 else list(negatives)
        params["seeds"] = self.seeds
        if self.strength is None:
            del params["strength"]
        if not self.sampler_options:
            del params["sampler_options"]
        if self.emphasis == DEFAULT_EMPHASIS:  # as the WebUI's infotext: only when not default
            del params["emphasis"]
        del params["guidance_embedded"]  # a property of the engines, not of the request
        return params


def _prompts(value: Any, batch: int, what: str) -> tuple[str, ...]:
    """One string (every image) or one per image; each checked by :func:`check_prompt`."""
    if isinstance(value, str):
        return (check_prompt(value, what),) * batch
    if not isinstance(value, list | tuple):
        raise InputError(f"{what} must be a string or a list of strings, got {_kind(value)}")
    values = tuple(value)
    if not all(isinstance(v, str) for v in values):
        raise InputError(f"{what} must be a string or a list of strings")
    if len(values) != batch:
        raise InputError(f"{what} has {len(values)} entries but batch is {batch}")
    return tuple(check_prompt(v, what) for v in values)


def check_prompt(text: str, what: str = "prompt") -> str:
    """A prompt the tokenizer can take: at most :data:`MAX_PROMPT_CHARS` characters of valid
    Unicode (a lone surrogate such as ``\\ud800`` cannot be encoded). Checked per request,
    before batching, so one bad prompt never fails the requests encoded with it."""
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(
            f"{what} is {len(text)} characters; at most {MAX_PROMPT_CHARS} are allowed "
            "(the engines read a few 75-token chunks of it)"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"{what} is not valid Unicode (a lone surrogate at character {e.start}); "
            "send UTF-8 text"
        ) from None
    return text


def _kind(value: Any) -> str:
    """A value's type for a message; short scalars shown (never a whole payload)."""
    if isinstance(value, bool | numbers.Number | str) and len(repr(value)) <= 24:
        return repr(value)
    return type(value).__name__ if value is not None else "None"


def _integer(value: Any, what: str) -> int:
    """An integer of any integer type (Python, NumPy), or an integral finite float."""
    if isinstance(value, bool | np.bool_):
        raise InputError(f"{what} must be an integer, got {_kind(value)}")
    if isinstance(value, numbers.Integral):
        return operator.index(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and value == int(float(value)):
        return int(float(value))
    raise InputError(f"{what} must be an integer, got {_kind(value)}")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise InputError(f"{what} must be a number, got {_kind(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{what} must be a finite number, got {_kind(value)}") from None
    if not math.isfinite(number):
        raise InputError(f"{what} must be finite, got {_kind(value)}")
    return number


def _bounded(value: Any, what: str, lo: int | None, hi: int) -> int:
    number = _integer(value, what)
    if lo is not None and number < lo:
        raise InputError(f"{what} must be at least {lo}, got {number}")
    if number > hi:
        raise InputError(f"{what} must be at most {hi}, got {number}")
    return number


def check_batch(value: Any) -> int:
    """The batch size, refused above :data:`MAX_BATCH` before anything is sized by it."""
    return _bounded(value, "batch", 1, MAX_BATCH)


def check_size(manifest: Manifest, height: int, width: int, batch: int, cfg: bool) -> None:
    """Image size and batch against the shape ranges every engine was built for."""
    factor = manifest.dims.vae_scale_factor
    for what, value in (("height", height), ("width", width)):
        if value < 8 or value % 8 or value % factor:
            raise InputError(f"{what} must be a positive multiple of 8, got {value}")
    rows = 2 * batch if cfg else batch
    checks = {  # component -> ((axis, value, user-facing name), ...)
        TEXT_ENCODER: (("unet_batch", rows, "batch"),),
        UNET: (
            ("unet_batch", rows, "batch"),
            ("height", height, "height"),
            ("width", width, "width"),
        ),
        VAE_DECODER: (
            ("batch", batch, "batch"),
            ("height", height, "height"),
            ("width", width, "width"),
        ),
        VAE_ENCODER: (
            ("batch", batch, "batch"),
            ("height", height, "height"),
            ("width", width, "width"),
        ),
    }
    for name, axes in checks.items():
        entry = manifest.components.get(name)
        if entry is None:
            continue
        for axis, value, what in axes:
            allowed = entry.shape_range.axis(axis)
            if not allowed.contains(value):
                if axis == "unet_batch":
                    allowed = entry.shape_range.batch
                    value = batch
                raise InputError(
                    f"{what} {value} is outside the range the engines were built for "
                    f"({allowed.min}..{allowed.max}, {name}); re-export with a wider --{what}"
                )


def default_size(manifest: Manifest, what: str) -> int:
    """The model's default height / width if the engines were built for it, else the size the
    UNet engine is optimised for (an export for 256x256 of a 512x512 model runs at 256)."""
    value = int(manifest.defaults.get(what, 512))
    entry = manifest.components.get(UNET)
    if entry is None:
        return value
    built = getattr(entry.shape_range, what)
    return value if built.contains(value) else built.opt


def build_request(
    manifest: Manifest,
    resolve_sampler: Any,
    *,
    prompt: str | Sequence[str] | None,
    negative_prompt: str | Sequence[str],
    sampler: str,
    steps: int | None,
    guidance: float | None,
    guidance_rescale: float,
    seed: int | None,
    height: int | None,
    width: int | None,
    batch: int,
    img2img: bool,
    strength: float | None,
    karras: bool | None,
    eta: float | None,
    sampler_options: dict[str, Any],
    emphasis: str = DEFAULT_EMPHASIS,
) -> Request:
    """Fill unset arguments from ``manifest.defaults`` and validate all of them."""
    defaults = manifest.defaults
    batch = check_batch(batch)
    if prompt is None:
        prompt = str(defaults.get("prompt", ""))
    steps = steps if steps is not None else defaults.get("steps", DEFAULT_STEPS)
    steps = _bounded(steps, "steps", 1, MAX_STEPS)
    guidance = _number(
        guidance if guidance is not None else defaults.get("guidance", DEFAULT_GUIDANCE), "guidance"
    )
    guidance_rescale = _number(guidance_rescale, "guidance_rescale")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise InputError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    seed = secrets.randbits(32) if seed is None else _integer(seed, "seed")
    if not 0 <= seed <= MAX_SEED - batch:
        raise InputError(f"seed must be in [0, 2**63 - 1 - batch], got {seed}")
    height = height if height is not None else default_size(manifest, "height")
    height = _bounded(height, "height", None, MAX_SIDE)  # too small: check_size says how
    width = _bounded(
        width if width is not None else default_size(manifest, "width"), "width", 1, MAX_SIDE
    )
    if img2img:
        if VAE_ENCODER not in manifest.components:
            raise InputError("img2img needs a VAE encoder, and this engine directory has none")
        strength = _number(DEFAULT_STRENGTH if strength is None else strength, "strength")
        if not 0.0 < strength <= 1.0:
            raise InputError(f"strength must be in (0, 1], got {strength}")
    elif strength is not None:
        raise InputError("strength applies to img2img only: pass an image too")
    if eta is not None:
        eta = _number(eta, "eta")
        if eta < 0:
            raise InputError(f"eta must be >= 0, got {eta}")
    if not isinstance(sampler, str) or len(sampler) > 64:
        raise InputError(f"sampler must be a sampler name, got {_kind(sampler)}")
    if karras is not None and not isinstance(karras, bool | np.bool_):
        raise InputError(f"karras must be true, false or unset, got {_kind(karras)}")
    if not isinstance(sampler_options, dict) or not all(
        isinstance(k, str) for k in sampler_options
    ):
        raise InputError("sampler_options must be a dict with string keys")
    if emphasis not in EMPHASIS_MODES:
        raise InputError(
            f"emphasis must be one of {', '.join(EMPHASIS_MODES)}, got {_kind(emphasis)}"
        )
    canonical, implied = resolve_sampler(sampler)
    implied_karras = implied.pop("use_karras_sigmas", None)
    if karras is None:
        karras = implied_karras
    elif implied_karras and not karras:
        raise InputError(f"sampler name {sampler!r} asks for Karras sigmas but karras is False")
    request = Request(
        prompts=_prompts(prompt, batch, "prompt"),
        negative_prompts=_prompts(negative_prompt, batch, "negative_prompt"),
        sampler=canonical,
        steps=steps,
        guidance=guidance,
        guidance_rescale=guidance_rescale,
        seed=seed,
        height=height,
        width=width,
        batch=batch,
        strength=strength,
        karras=None if karras is None else bool(karras),
        eta=eta,
        sampler_options={**implied, **sampler_options},
        emphasis=emphasis,
        guidance_embedded=bool(manifest.dims.time_cond_proj_dim),
    )
    check_size(manifest, height, width, batch, request.cfg)
    return request
