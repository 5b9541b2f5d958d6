"""Component descriptors: the one place that names every tensor crossing an engine boundary.

Export (ONNX ``input_names`` / ``dynamic_axes``), the TensorRT builder (optimisation profiles)
and the runtime (feeds, output lookup, shape checks) all read these objects, so a tensor name or
an axis meaning is written exactly once, here.

Shapes are written with symbolic axis names. ``ShapeRange`` (a batch / height / width range in
image pixels) resolves them into concrete min / opt / max shapes.

Axis symbols:

* ``batch``        images per call (VAE encoder / decoder);
* ``unet_batch``   rows of one UNet or text-encoder call: ``batch`` with classifier-free guidance
  doubling it (cond + uncond in one call), so it ranges from ``batch.min`` (no CFG) to
  ``2 * batch.max``;
* ``height`` / ``width``  image pixels; ``latent_height`` / ``latent_width`` = pixels / VAE factor;
* ``text_length``  the UNet's context length: prompt chunks x the text encoder's 77 tokens
  (long prompts are encoded 77 tokens at a time and concatenated on this axis,
  :mod:`trt_sd.runtime.prompt_chunks`). The text encoder itself always reads 77.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import InputError

AxisSize = int | str
Shape = tuple[int, ...]

#: dtype names used in descriptors and the manifest. ``"float"`` means "the component's
#: precision" (float32 for fp32 graphs, float16 for fp16 graphs); it is resolved by
#: :meth:`TensorSpec.resolved_dtype`.
DTYPES = ("float", "float32", "float16", "int32", "int64")
#: CLIP's window: every manifest written before the text length was a dynamic axis was built
#: for exactly this context length (one prompt chunk)
DEFAULT_TEXT_LENGTH = 77


@dataclass(frozen=True)
class Range:
    """An inclusive ``min <= opt <= max`` range of one dimension."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (self.min <= self.opt <= self.max):
            raise InputError(
                f"range min:opt:max must satisfy min <= opt <= max, got "
                f"{self.min}:{self.opt}:{self.max}"
            )
        if self.min < 1:
            raise InputError(f"range minimum must be at least 1, got {self.min}")

    @classmethod
    def parse(cls, text: str | int, what: str, multiple_of: int = 1) -> Range:
        """Parse ``"512"``, ``"256:768"`` or ``"256:512:768"`` (min:max or min:opt:max).

        With two values the optimum is the minimum rounded up to ``multiple_of`` of the
        midpoint, which is where TensorRT tunes kernels for a dynamic range.
        """
        parts = str(text).split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise InputError(
                f"{what} must be N, MIN:MAX or MIN:OPT:MAX with integers, got {text!r}"
            ) from None
        if len(values) == 1:
            lo = opt = hi = values[0]
        elif len(values) == 2:
            lo, hi = values
            mid = (lo + hi) // 2
            opt = max(lo, min(hi, (mid // multiple_of) * multiple_of))
        elif len(values) == 3:
            lo, opt, hi = values
        else:
            raise InputError(f"{what} must be N, MIN:MAX or MIN:OPT:MAX, got {text!r}")
        if lo > hi:
            raise InputError(f"{what}: MIN ({lo}) is greater than MAX ({hi})")
        for v in (lo, opt, hi):
            if v < 1:
                raise InputError(f"{what} must be positive, got {v}")
            if v % multiple_of:
                raise InputError(f"{what} must be a multiple of {multiple_of}, got {v}")
        return cls(lo, opt, hi)

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max

    def to_list(self) -> list[int]:
        return [self.min, self.opt, self.max]

    @classmethod
    def from_list(cls, values: Iterable[int]) -> Range:
        lo, opt, hi = (int(v) for v in values)
        return cls(lo, opt, hi)

    def __str__(self) -> str:
        return str(self.min) if self.min == self.max else f"{self.min}..{self.max}"


@dataclass(frozen=True)
class ShapeRange:
    """Image batch / height / width ranges an engine directory is built for (pixels)."""

    batch: Range
    height: Range
    width: Range
    vae_scale_factor: int = 8
    #: the UNet's context length range (``text_length``); absent from old manifests: 77 only
    text_length: Range = Range(DEFAULT_TEXT_LENGTH, DEFAULT_TEXT_LENGTH, DEFAULT_TEXT_LENGTH)

    def __post_init__(self) -> None:
        for what, r in (("height", self.height), ("width", self.width)):
            for v in r.to_list():
                if v % self.vae_scale_factor:
                    raise InputError(
                        f"{what} must be a multiple of {self.vae_scale_factor}, got {v}"
                    )

    def axis(self, symbol: str) -> Range:
        """The min/opt/max range of one axis symbol (see module docstring).

        ``symbol/k`` is ``symbol`` divided by ``k`` rounded up: the lower resolutions inside
        the UNet that a UNet stage's inputs have (:mod:`trt_sd.models.unet_stages`).
        """
        if "/" in symbol:
            base, divisor = symbol.split("/")
            r, k = self.axis(base), int(divisor)
            return Range(-(-r.min // k), -(-r.opt // k), -(-r.max // k))
        f = self.vae_scale_factor
        if symbol == "batch":
            return self.batch
        if symbol == "unet_batch":
            return Range(self.batch.min, 2 * self.batch.opt, 2 * self.batch.max)
        if symbol == "height":
            return self.height
        if symbol == "width":
            return self.width
        if symbol == "latent_height":
            return Range(self.height.min // f, self.height.opt // f, self.height.max // f)
        if symbol == "latent_width":
            return Range(self.width.min // f, self.width.opt // f, self.width.max // f)
        if symbol == "text_length":
            return self.text_length
        raise KeyError(f"unknown axis symbol {symbol!r}")

    def to_dict(self) -> dict[str, list[int]]:
        return {
            "batch": self.batch.to_list(),
            "height": self.height.to_list(),
            "width": self.width.to_list(),
            "vae_scale_factor": self.vae_scale_factor,  # type: ignore[dict-item]
            "text_length": self.text_length.to_list(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ShapeRange:
        return cls(
            batch=Range.from_list(d["batch"]),
            height=Range.from_list(d["height"]),
            width=Range.from_list(d["width"]),
            vae_scale_factor=int(d.get("vae_scale_factor", 8)),
            **({"text_length": Range.from_list(d["text_length"])} if "text_length" in d else {}),
        )

    def prompt_chunks(self, chunk_length: int) -> int:
        """How many prompt chunks of ``chunk_length`` tokens the context length range takes
        (1 for engines built before the text length was dynamic)."""
        return max(1, self.text_length.max // chunk_length)


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and symbolic shape of one engine input or output."""

    name: str
    dtype: str
    shape: tuple[AxisSize, ...]

    def resolved_dtype(self, precision: str) -> str:
        """Concrete dtype: ``"float"`` becomes float16 for fp16 graphs, float32 otherwise.

        INT8 Q/DQ graphs keep float32 I/O (the quantization is inside the graph).
        """
        if self.dtype != "float":
            return self.dtype
        return "float16" if precision == "fp16" else "float32"

    def dynamic_axes(self) -> dict[int, str]:
        """``{axis_index: symbol}`` for ``torch.onnx.export(dynamic_axes=...)``."""
        return {i: s for i, s in enumerate(self.shape) if isinstance(s, str)}

    def resolve(self, shapes: ShapeRange, which: str) -> Shape:
        """Concrete shape at ``which`` in ("min", "opt", "max")."""
        return tuple(
            getattr(shapes.axis(s), which) if isinstance(s, str) else int(s) for s in self.shape
        )

    def profile(self, shapes: ShapeRange) -> tuple[Shape, Shape, Shape]:
        """(min, opt, max) shapes, as a TensorRT optimisation profile wants them."""
        return (
            self.resolve(shapes, "min"),
            self.resolve(shapes, "opt"),
            self.resolve(shapes, "max"),
        )

    def to_dict(self, precision: str) -> dict:
        return {
            "name": self.name,
            "dtype": self.resolved_dtype(precision),
            "shape": list(self.shape),
        }


@dataclass(frozen=True)
class Component:
    """One engine: its name (also the file stem) and its ordered inputs and outputs."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Dynamic axes of every input and output, for ``torch.onnx.export``."""
        axes = {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs)}
        return {k: v for k, v in axes.items() if v}

    def profile(self, shapes: ShapeRange) -> dict[str, tuple[Shape, Shape, Shape]]:
        """Per-input (min, opt, max) shapes for an optimisation profile."""
        return {t.name: t.profile(shapes) for t in self.inputs}

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def output(self, name: str) -> TensorSpec:
        for t in self.outputs:
            if t.name == name:
                return t
        raise KeyError(name)


@dataclass(frozen=True)
class ModelDims:
    """The few model sizes that the tensor shapes depend on, read from the checkpoint configs."""

    text_max_length: int = 77
    text_hidden_size: int = 768
    unet_in_channels: int = 4
    unet_out_channels: int = 4
    latent_channels: int = 4
    image_channels: int = 3
    vae_scale_factor: int = 8
    # SDXL-style families (0 = the family has none): the second text encoder's hidden size,
    # its pooled (projected) embedding size and the number of micro-conditioning values.
    text_hidden_size_2: int = 0
    text_pooled_size: int = 0
    time_ids_size: int = 0
    #: LCM-distilled UNets: width of the guidance-scale embedding (``timestep_cond``)
    time_cond_proj_dim: int = 0

    @property
    def inpainting(self) -> bool:
        """A dedicated inpainting UNet (SD 1.5 / 2 / SDXL inpainting): its input is the latents,
        the latent-size mask and the masked image's latents concatenated (4 + 1 + 4 = 9)."""
        return self.unet_in_channels == 2 * self.latent_channels + 1

    @property
    def context_size(self) -> int:
        """Width of the UNet's cross-attention context: the text encoders' hidden states
        concatenated on the feature axis."""
        return self.text_hidden_size + self.text_hidden_size_2

    def to_dict(self) -> dict[str, int]:
        # fields a family does not use stay out, so SD 1.x / 2.x manifests are unchanged
        return {k: v for k, v in self.__dict__.items() if v or k not in _OPTIONAL_DIMS}

    @classmethod
    def from_dict(cls, d: dict) -> ModelDims:
        return cls(**{k: int(v) for k, v in d.items() if k in cls.__dataclass_fields__})


_OPTIONAL_DIMS = ("text_hidden_size_2", "text_pooled_size", "time_ids_size", "time_cond_proj_dim")

# Component names: also the engine file stems and the keys of manifest["components"].
TEXT_ENCODER = "text_encoder"
UNET = "unet"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
#: The components of the SD 1.x / 2.x families (:mod:`trt_sd.models.families` lists each
#: family's own; this tuple is what families without extra components share).
COMPONENT_NAMES = (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)

# The UNet inputs every family has; any other UNet input is conditioning that the family's
# text step (or its micro-conditioning) produces per row, named after diffusers'
# ``added_cond_kwargs`` keys so the export wrapper can hand them over by name.
SAMPLE = "sample"
TIMESTEP = "timestep"
CONTEXT = "encoder_hidden_states"
#: an LCM-distilled UNet's guidance-scale embedding (diffusers' ``timestep_cond``)
TIMESTEP_COND = "timestep_cond"
#: The text encoder's hidden-state output (what SD 1.x / 2.x condition on).
TEXT_EMBEDDINGS = "text_embeddings"
#: An inpainting UNet's extra per-row inputs (:attr:`ModelDims.inpainting`), concatenated
#: after the latents inside the exported graph (diffusers' channel order).
MASK = "mask"
MASKED_IMAGE_LATENTS = "masked_image_latents"


def text_encoder(
    d: ModelDims,
    name: str = TEXT_ENCODER,
    hidden_size: int | None = None,
    hidden_layer: int = -1,
    pooled_output: str | None = None,
) -> Component:
    """CLIP text encoder: token ids -> a hidden state (SD 1.x / 2.x: the last one).

    Prompt and negative prompt are encoded in one call, hence ``unet_batch`` rows.
    ``hidden_layer`` (-2 = penultimate, as SDXL conditions on) and ``pooled_output`` (the
    projected pooled embedding's name, for ``CLIPTextModelWithProjection``) are read by the
    export wrapper from ``extra``, so the graph returns exactly these outputs.
    """
    width = d.text_hidden_size if hidden_size is None else hidden_size
    outputs = [TensorSpec(TEXT_EMBEDDINGS, "float", ("unet_batch", d.text_max_length, width))]
    if pooled_output is not None:
        outputs.append(TensorSpec(pooled_output, "float", ("unet_batch", d.text_pooled_size)))
    last = hidden_layer == -1
    return Component(
        name,
        inputs=(TensorSpec("input_ids", "int32", ("unet_batch", d.text_max_length)),),
        outputs=tuple(outputs),
        description=(
            f"CLIP text encoder ({'last' if last else 'penultimate'} hidden state"
            f"{', projected pooled embedding' if pooled_output else ''})"
        ),
        extra={"hidden_layer": hidden_layer, "pooled_output": pooled_output},
    )


def guidance_input(d: ModelDims) -> tuple[TensorSpec, ...]:
    """An LCM-distilled UNet's guidance-scale embedding input (none for other UNets)."""
    if not d.time_cond_proj_dim:
        return ()
    return (TensorSpec(TIMESTEP_COND, "float", ("unet_batch", d.time_cond_proj_dim)),)


def unet(d: ModelDims, added: tuple[TensorSpec, ...] = ()) -> Component:
    """Denoising UNet: one timestep per batch row, so requests at different steps can share a
    call (continuous batching) and CFG halves run together. The context's length is
    ``text_length`` (77 per prompt chunk, within the exported range). ``added``: the family's extra
    per-row conditioning inputs (SDXL: pooled text embedding and micro-conditioning); an
    inpainting UNet adds its mask and masked-image latents (:func:`inpaint_inputs`)."""
    channels = d.latent_channels if d.inpainting else d.unet_in_channels
    return Component(
        UNET,
        inputs=(
            TensorSpec(SAMPLE, "float", ("unet_batch", channels, "latent_height", "latent_width")),
            TensorSpec(TIMESTEP, "float32", ("unet_batch",)),
            TensorSpec(CONTEXT, "float", ("unet_batch", "text_length", d.context_size)),
            *added,
            *guidance_input(d),
            *inpaint_inputs(d),  # last: the inpainting wrapper takes them off the end
        ),
        outputs=(
            TensorSpec(
                "model_output",
                "float",
                ("unet_batch", d.unet_out_channels, "latent_height", "latent_width"),
            ),
        ),
        description="UNet2DConditionModel (raw model output: eps, v or x0 per prediction type)",
    )


def inpaint_inputs(d: ModelDims) -> tuple[TensorSpec, ...]:
    """The mask and masked-image latents of an inpainting UNet (none for other UNets): named
    per-row feeds like the text conditioning, so CFG doubles them and batching slices them."""
    if not d.inpainting:
        return ()
    latent = ("unet_batch", d.latent_channels, "latent_height", "latent_width")
    return (
        TensorSpec(MASK, "float", ("unet_batch", 1, "latent_height", "latent_width")),
        TensorSpec(MASKED_IMAGE_LATENTS, "float", latent),
    )


def vae_decoder(d: ModelDims) -> Component:
    """VAE decoder: latents already divided by the scaling factor -> images in [-1, 1]."""
    return Component(
        VAE_DECODER,
        inputs=(
            TensorSpec(
                "latent", "float", ("batch", d.latent_channels, "latent_height", "latent_width")
            ),
        ),
        outputs=(TensorSpec("images", "float", ("batch", d.image_channels, "height", "width")),),
        description="AutoencoderKL decoder (post_quant_conv + decoder)",
    )


def vae_encoder(d: ModelDims) -> Component:
    """VAE encoder: images in [-1, 1] -> the latent distribution's parameters (mean, logvar
    concatenated on channels), so the runtime samples with its own seeded RNG as diffusers'
    ``latent_dist.sample(generator)`` does."""
    return Component(
        VAE_ENCODER,
        inputs=(TensorSpec("images", "float", ("batch", d.image_channels, "height", "width")),),
        outputs=(
            TensorSpec(
                "latent_parameters",
                "float",
                ("batch", 2 * d.latent_channels, "latent_height", "latent_width"),
            ),
        ),
        description="AutoencoderKL encoder (encoder + quant_conv): mean and logvar",
    )


def all_components(d: ModelDims) -> dict[str, Component]:
    """Every component of a Stable Diffusion 1.x / 2.x pipeline, keyed by name."""
    return {c.name: c for c in (text_encoder(d), unet(d), vae_decoder(d), vae_encoder(d))}
