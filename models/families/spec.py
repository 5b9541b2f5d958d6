"""What a model family is: its components, how prompts become conditioning, its UNet inputs.

A family (SD 1.x, SD 2.x, SDXL, ...) is data plus two small functions, read by export, the
runtime pipeline and the serving engine; nothing else branches on the family. The text step
is split so that a different prompt encoder (long prompts in 75-token chunks, weighted
tokens) can replace *how* each text encoder is called without touching *how* its outputs
become UNet feeds:

1. per text encoder (:class:`TextEncoding`): tokenize the rows with its tokenizer, run it
   -> that encoder's outputs (``{output name: rows}``);
2. :attr:`FamilySpec.combine`: all encoders' outputs + the rows' facts (which rows are
   negative prompts, each row's image size and micro-conditioning) -> the UNet's per-row
   conditioning feeds, keyed by UNet input name.

Conditioning is *per row*: classifier-free guidance doubles a request's rows
(``[uncond..., cond...]``, diffusers' order), batching concatenates and slices them; so every
value in the conditioning dict has the rows on its first axis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..descriptors import Component, ModelDims

#: ``combine(outputs, rows, settings) -> {unet input: rows}``
Combine = Callable[[Mapping[str, Mapping[str, Any]], "PromptRows", Mapping[str, Any]], dict]
#: ``detect(configs) -> bool``: ``configs`` holds the checkpoint's ``model_index`` (key
#: ``index``) and its ``unet``, ``text_encoder`` and ``scheduler`` configs
Detect = Callable[[Mapping[str, Mapping[str, Any]]], bool]
#: ``resolve(options, height, width) -> options`` (validated, defaults filled in)
ResolveOptions = Callable[[Mapping[str, Any], int, int], dict[str, Any]]


@dataclass(frozen=True)
class TextEncoding:
    """One text encoder of a family and the tokenizer that feeds it.

    ``tokenizer`` is both the manifest key of the tokenizer settings and the engine
    directory's folder of its files (``tokenizer``, ``tokenizer_2``); ``source`` is the
    checkpoint's tokenizer folder when it differs (the SDXL refiner's only tokenizer is its
    ``tokenizer_2``, stored as the engine directory's ``tokenizer``).
    """

    component: str
    tokenizer: str
    source: str | None = None

    @property
    def source_folder(self) -> str:
        return self.source or self.tokenizer


@dataclass(frozen=True)
class PromptRows:
    """The rows of one text-encoding batch (any number of requests, CFG rows included)."""

    texts: tuple[str, ...]
    negative: tuple[bool, ...]  # the row is a negative (unconditional) prompt
    sizes: tuple[tuple[int, int], ...]  # (height, width) of the row's image
    options: tuple[Mapping[str, Any], ...]  # the row's request's resolved family options
    #: the row's request's guidance scale (an LCM-distilled UNet embeds it; () = not given)
    guidance: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.texts)
        if not len(self.negative) == len(self.sizes) == len(self.options) == n:
            raise ValueError("PromptRows fields must have one entry per row")
        if len(self.guidance) not in (0, n):
            raise ValueError("PromptRows.guidance must have one entry per row (or none)")

    @classmethod
    def for_request(
        cls,
        prompts: tuple[str, ...] | list[str],
        negative_prompts: tuple[str, ...] | list[str],
        cfg: bool,
        size: tuple[int, int],
        options: Mapping[str, Any],
        guidance: float | None = None,
    ) -> PromptRows:
        """A request's rows in diffusers' order: negatives first when CFG is on."""
        texts = (*negative_prompts, *prompts) if cfg else tuple(prompts)
        negative = (True,) * len(negative_prompts) * cfg + (False,) * len(prompts)
        n = len(texts)
        scale = () if guidance is None else (float(guidance),) * n
        return cls(tuple(texts), negative, (size,) * n, (options,) * n, scale)

    def __add__(self, other: PromptRows) -> PromptRows:
        return PromptRows(
            self.texts + other.texts,
            self.negative + other.negative,
            self.sizes + other.sizes,
            self.options + other.options,
            self.guidance + other.guidance if self.guidance and other.guidance else (),
        )


@dataclass(frozen=True)
class FamilySpec:
    """One model family. See the module docstring for the text step."""

    name: str  # manifest ``model.family``
    label: str  # what users call it ("SDXL")
    descriptors: Callable[[ModelDims], dict[str, Component]]  # every component, by name
    required: tuple[str, ...]  # components an engine directory must have
    text_encoders: tuple[TextEncoding, ...]
    combine: Combine
    #: component -> (diffusers subfolder, module kind the export loader knows)
    sources: Mapping[str, tuple[str, str]]
    diffusers_pipeline: str  # the diffusers pipeline class (single-file loading, tests)
    detect: Detect  # does a checkpoint's configs belong to this family
    options: tuple[str, ...] = ()  # family-specific generation options (micro-conditioning)
    resolve_options: ResolveOptions | None = None
    #: the text encoder's output is the UNet's context as it is (no host-side combining), so
    #: it may stay on the device between the two engines
    passthrough: bool = False
    #: export features this family's UNet supports (the layer list models SD 1.x / 2.x UNets)
    features: frozenset[str] = field(default_factory=frozenset)
    #: which VAE latent space its latents live in: a refiner takes a base's latents only from
    #: the same space (SDXL's VAE differs from SD 1.x / 2.x's)
    latent_space: str = "sd"
    #: pipeline settings read from ``model_index.json`` (with these defaults) into the
    #: manifest's ``family_config``
    settings: Mapping[str, Any] = field(default_factory=dict)
    #: key prefixes its text encoders have in a single ``.safetensors`` file's original
    #: (LDM / SGM) layout, all required: a file of another family is refused with one line
    single_file_text: tuple[str, ...] = ("cond_stage_model.",)

    @property
    def component_names(self) -> tuple[str, ...]:
        """Every component this family can have (optional ones included)."""
        return tuple(self.sources)

    def components(self, dims: ModelDims) -> dict[str, Component]:
        return self.descriptors(dims)

    def unet_conditioning(self, unet: Component) -> list[str]:
        """The UNet inputs the text step provides (all but the sample and timestep)."""
        from ..descriptors import SAMPLE, TIMESTEP

        return [n for n in unet.input_names if n not in (SAMPLE, TIMESTEP)]

    def check_options(self, options: Mapping[str, Any], height: int, width: int) -> dict:
        """The request's family options, validated (InputError naming what this family takes)
        with the family's defaults filled in."""
        from ..errors import InputError

        unknown = [k for k in options if k not in self.options]
        if unknown:
            takes = ", ".join(self.options) if self.options else "none"
            raise InputError(
                f"{self.label} models take no option {', '.join(sorted(unknown))} "
                f"(family options: {takes})"
            )
        if self.resolve_options is None:
            return {}
        return self.resolve_options(options, height, width)
