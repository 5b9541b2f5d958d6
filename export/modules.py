"""Load a checkpoint's torch modules and adapt them to the component descriptors' I/O.

Each wrapper's ``forward`` takes exactly the descriptor's inputs, in order, and returns its one
output, so ``torch.onnx.export`` names follow ``Component.input_names`` / ``output_names``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from trt_sd.models import InputError
from trt_sd.models.controlnet import is_residual
from trt_sd.models.descriptors import CONTEXT, SAMPLE, TIMESTEP, TIMESTEP_COND, Component

from .checkpoint import Checkpoint
from .inpaint import INPAINT_INPUTS, InpaintUNetWrapper
from .lora_fuse import fuse_loras

#: diffusers clamps the VAE posterior's log-variance to this range before using it.
LOGVAR_RANGE = (-30.0, 20.0)


class TextEncoderWrapper(nn.Module):
    """int32 token ids -> a CLIP hidden state (``hidden_layer``: -1 last, as SD 1.x / 2.x
    condition on; -2 penultimate, as SDXL does), plus the projected pooled embedding when
    ``pooled`` (``CLIPTextModelWithProjection``)."""

    def __init__(self, text_encoder: nn.Module, hidden_layer: int = -1, pooled: bool = False):
        super().__init__()
        self.text_encoder = text_encoder
        self.hidden_layer = hidden_layer
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor) -> Any:
        ids = input_ids.to(torch.int64)
        if self.hidden_layer == -1 and not self.pooled:
            return self.text_encoder(ids, return_dict=False)[0]
        out = self.text_encoder(ids, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[self.hidden_layer]
        return (hidden, out.text_embeds) if self.pooled else hidden


class UNetWrapper(nn.Module):
    """One float32 timestep per batch row; returns the raw model output. ``added``: names of
    the extra inputs after the context, handed to diffusers as ``added_cond_kwargs``;
    ``residuals``: how many ControlNet residual inputs follow them (down ones, then mid)."""

    def __init__(self, unet: nn.Module, added: tuple[str, ...] = (), residuals: int = 0) -> None:
        super().__init__()
        self.unet = unet
        self.added = added
        self.residuals = residuals

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *rest: torch.Tensor,
    ) -> torch.Tensor:
        added, residuals = rest[: len(self.added)], rest[len(self.added) :]
        kwargs = dict(zip(self.added, added, strict=True))
        cond = kwargs.pop(TIMESTEP_COND, None)  # LCM's guidance embedding is not added_cond
        control: dict[str, Any] = {}
        if residuals:  # ControlNet residuals (without them: the plain UNet, i.e. zeros)
            control = {
                "down_block_additional_residuals": tuple(residuals[:-1]),
                "mid_block_additional_residual": residuals[-1],
            }
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=cond,
            added_cond_kwargs=kwargs or None,
            return_dict=False,
            **control,
        )[0]


class VaeDecoderWrapper(nn.Module):
    """post_quant_conv + decoder on latents already divided by the scaling factor."""

    def __init__(self, vae: Any) -> None:  # diffusers AutoencoderKL
        super().__init__()
        self.post_quant_conv: nn.Module | None = getattr(vae, "post_quant_conv", None)
        self.decoder: nn.Module = vae.decoder

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            latent = self.post_quant_conv(latent)
        return self.decoder(latent)


class VaeEncoderWrapper(nn.Module):
    """encoder + quant_conv: mean and log-variance concatenated on channels.

    The log-variance half is clamped to diffusers' range, so the runtime samples
    ``mean + exp(0.5 * logvar) * noise`` exactly as ``latent_dist.sample()`` does.
    """

    def __init__(self, vae: Any) -> None:  # diffusers AutoencoderKL
        super().__init__()
        self.encoder: nn.Module = vae.encoder
        self.quant_conv: nn.Module | None = getattr(vae, "quant_conv", None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return torch.cat([mean, logvar.clamp(*LOGVAR_RANGE)], dim=1)


class ModuleLoader:
    """Loads torch modules on demand (the UNet alone is GBs; load it only when exported).

    Diffusers folders load one submodel at a time; a single file is converted by diffusers'
    ``StableDiffusionPipeline.from_single_file`` with the configs of ``checkpoint.config_dir``
    (``local_files_only``: nothing is fetched).
    """

    def __init__(self, checkpoint: Checkpoint, loras: tuple = ()) -> None:
        self.checkpoint = checkpoint
        self.loras = loras  # fused into the weights of the components they adapt
        self._pipe: Any = None
        #: components the family does not list (ControlNets): name -> module factory
        self.factories: dict[str, Any] = {}
        _quiet_loaders()

    def _single_file_pipe(self) -> Any:
        if self._pipe is None:
            import diffusers

            ckpt = self.checkpoint
            cls = getattr(diffusers, ckpt.family_spec.diffusers_pipeline)
            try:
                self._pipe = cls.from_single_file(
                    str(ckpt.path),
                    config=str(ckpt.config_dir),
                    local_files_only=True,
                    **_SINGLE_FILE_KWARGS.get(cls.__name__, {}),
                )
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise InputError(
                    f"{ckpt.path.name} could not be loaded as a Stable Diffusion checkpoint "
                    f"with the configs of {ckpt.config_dir}: {first}"
                ) from None
        return self._pipe

    def _submodel(self, sub: str, kind: str) -> nn.Module:
        """Load one submodel (``kind``: how the family's ``sources`` say to load it). Not
        cached, so each can be freed right after its export (the VAE is read twice, for
        decoder and encoder: ~1 s for SD's 335 MB)."""
        ckpt = self.checkpoint
        if ckpt.kind == "single_file":
            return getattr(self._single_file_pipe(), sub)
        # None = prefer .safetensors, fall back to pickle weights (only when allowed).
        use_st = None if ckpt.allow_pickle else True
        folder = str(ckpt.path / sub)
        try:
            return _model_class(kind).from_pretrained(folder, use_safetensors=use_st)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{folder} could not be loaded: {first}") from None

    def wrapper(self, component: str, spec: Component | None = None) -> nn.Module:
        """The descriptor-shaped fp32 module of one component, in eval mode (``spec``: the
        descriptor when it is not the family's own, as the UNet with ControlNet inputs)."""
        if component in self.factories:
            return self.factories[component]().float().eval().requires_grad_(False)
        family = self.checkpoint.family_spec
        sub, kind = family.sources[component]
        spec = spec or family.components(self.checkpoint.dims)[component]
        model = self._submodel(sub, kind)
        mod: nn.Module
        if kind in ("clip_text", "clip_text_projection"):
            extra = spec.extra
            mod = TextEncoderWrapper(
                model, int(extra.get("hidden_layer", -1)), bool(extra.get("pooled_output"))
            )
        elif kind == "unet":
            extra = [n for n in spec.input_names if n not in (SAMPLE, TIMESTEP, CONTEXT)]
            residuals = [n for n in extra if is_residual(n)]
            added = tuple(n for n in extra if n not in residuals)
            mod = _unet_wrapper(self.checkpoint.dims, model, added, len(residuals))
        elif kind == "vae_decoder":
            mod = VaeDecoderWrapper(model)
        elif kind == "vae_encoder":
            mod = VaeEncoderWrapper(model)
        else:
            raise KeyError(kind)
        mod = mod.float().eval().requires_grad_(False)
        fuse_loras(mod, component, self.loras)  # --lora (export/lora_fuse.py)
        return mod


def _unet_wrapper(
    dims: Any, model: nn.Module, added: tuple[str, ...], residuals: int = 0
) -> nn.Module:
    """The UNet's wrapper: an inpainting UNet concatenates its mask inputs in the graph
    (export refuses ControlNets for it, so it has no residual inputs)."""
    if dims.inpainting:
        return InpaintUNetWrapper(
            UNetWrapper(model, tuple(n for n in added if n not in INPAINT_INPUTS))
        )
    return UNetWrapper(model, added, residuals)


#: Extra arguments of ``from_single_file`` per pipeline class (no safety checker to load).
_SINGLE_FILE_KWARGS: dict[str, dict[str, Any]] = {
    "StableDiffusionPipeline": {
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    },
}


def _model_class(kind: str) -> Any:
    """The transformers / diffusers class of a module kind (imported on use)."""
    if kind == "clip_text":
        from transformers import CLIPTextModel

        return CLIPTextModel
    if kind == "clip_text_projection":
        from transformers import CLIPTextModelWithProjection

        return CLIPTextModelWithProjection
    if kind == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel
    if kind in ("vae_decoder", "vae_encoder"):
        from diffusers import AutoencoderKL

        return AutoencoderKL
    raise KeyError(kind)


def _quiet_loaders() -> None:
    """Silence diffusers' / transformers' own loading bars and notices: the export prints one
    progress bar per component and a summary instead."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


_NORMS = (nn.GroupNorm, nn.LayerNorm)


def half_copy(module: nn.Module) -> nn.Module:
    """An fp16 copy of ``module`` with its normalisation layers kept in fp32.

    Group / layer norms compute means and variances over thousands of values, which overflow or
    lose precision in fp16; every other op (convolutions, matmuls, attention) is what fp16
    engines accelerate. Hooks cast each norm's input up and its output back, so the exported
    graph holds explicit ``Cast`` nodes around fp32 normalisations. A copy, because rounding the
    original's weights to fp16 and back would spoil it as the fp32 verification reference.
    """
    half = copy.deepcopy(module).half()
    for sub in half.modules():
        if isinstance(sub, _NORMS):
            sub.float()
            sub.register_forward_pre_hook(_inputs_to_fp32)
            sub.register_forward_hook(_output_to_fp16)
    # The component's outputs are fp16 as its descriptor says, whatever dtype an inner layer
    # hands back (a CLIP hidden state taken from ``hidden_states`` can come out fp32).
    half.register_forward_hook(_output_to_fp16)
    return half


def _inputs_to_fp32(_mod: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _output_to_fp16(_mod: nn.Module, _args: tuple, output: Any) -> Any:
    if isinstance(output, tuple):
        return tuple(_fp16(o) for o in output)
    return _fp16(output)


def _fp16(value: Any) -> Any:
    return value.half() if torch.is_tensor(value) and value.is_floating_point() else value
