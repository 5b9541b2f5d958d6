"""Inpainting: repaint the white part of a mask, keep the rest of the image.

As diffusers' ``StableDiffusionInpaintPipeline`` / ``StableDiffusionXLInpaintPipeline``:

* the mask is read like its ``VaeImageProcessor(do_binarize, do_convert_grayscale)``: resized
  with Lanczos to the image size, converted to grayscale, scaled to [0, 1] and binarised at
  0.5 (white = repaint); ``mask_blur`` first blurs it (PIL's Gaussian blur of that radius in
  pixels, diffusers' ``mask_processor.blur``; the WebUI's "Mask blur"), which rounds and
  shrinks the repainted region's corners once binarised;
* at the latent size the mask is taken nearest-neighbour (``F.interpolate``'s default);
* a dedicated inpainting UNet (9 input channels, :attr:`ModelDims.inpainting`) receives the
  latent mask and the latents of the image with the repainted part blanked
  (``image * (mask < 0.5)``) as two per-row feeds
  (:func:`trt_sd.models.descriptors.inpaint_inputs`); the exported graph concatenates them
  after the latents;
* an ordinary 4-channel UNet inpaints by latent blending: after every model call the known
  region is put back, noised to the *next* call's level (the clean latents after the last),
  ``(1 - mask) * add_noise(image_latents, noise, i + 1) + mask * latents``
  (:class:`BlendingStepper`);
* ``strength`` defaults to 1.0 (diffusers' default), which starts from pure noise; below 1
  the image latents are noised to the first remaining step as img2img does.

The pieces are request-level, so the batching engine (:mod:`trt_sd.runtime.serve.engine`)
uses them as ``Pipeline.__call__`` does: the mask rows travel in the request's conditioning and
the blending in its stepper.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from trt_sd.models.descriptors import MASK, MASKED_IMAGE_LATENTS, ModelDims
from trt_sd.models.errors import InputError

from .images import check_pixels, image_size, open_image
from .noise import MASKED_IMAGE_STREAM
from .vae import encode_image

#: diffusers' ``StableDiffusionInpaintPipeline`` default: start from pure noise
INPAINT_STRENGTH = 1.0
#: the WebUI's mask blur slider tops out at 64 pixels
MAX_MASK_BLUR = 64.0


def inpaint_strength(
    dims: ModelDims,
    image: Any,
    mask: Any,
    strength: Any,
    denoising_start: Any = None,
    mask_blur: Any = 0.0,
) -> Any:
    """Check how a call combines image, mask and engine (before anything runs) and return
    the strength to use: the inpainting default when a mask is given and strength is not."""
    if mask is None:
        if mask_blur:
            raise InputError("mask_blur applies to inpainting: pass a mask too")
        if dims.inpainting:
            raise InputError(
                f"this is an inpainting engine (a UNet with {dims.unet_in_channels} input "
                "channels): pass an image and a mask (--image PATH --mask PATH)"
            )
        return strength
    if image is None:
        raise InputError("mask applies to inpainting: pass the image to repaint too (--image)")
    if denoising_start is not None:
        raise InputError("mask cannot be combined with denoising_start (a refiner hand-off)")
    return INPAINT_STRENGTH if strength is None else strength


def check_mask_blur(value: Any) -> float:
    """The mask blur radius in pixels, 0..:data:`MAX_MASK_BLUR`."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InputError(f"mask_blur must be a number of pixels, got {type(value).__name__}")
    blur = float(value)
    if not 0.0 <= blur <= MAX_MASK_BLUR:
        raise InputError(f"mask_blur must be in [0, {MAX_MASK_BLUR:g}] pixels, got {value}")
    return blur


def _mask_pil(mask: Any) -> Any:
    """Path, bytes, PIL image or uint8 / bool array (HxW, HxWx3, HxWx4) -> PIL image."""
    from PIL import Image

    if isinstance(mask, str | os.PathLike | bytes):
        with open_image(mask, "mask") as im:
            try:
                im.load()
                return im.copy()
            except (OSError, ValueError) as e:
                raise InputError(f"mask is not a readable image: {e}") from None
    if isinstance(mask, Image.Image):
        check_pixels(mask.size, "mask", "(PIL image)")
        return mask
    if isinstance(mask, np.ndarray):
        if mask.dtype == np.bool_:
            mask = mask.astype(np.uint8) * 255
        ok = mask.ndim == 2 or (mask.ndim == 3 and mask.shape[2] in (3, 4))
        if not ok or mask.dtype != np.uint8:
            raise InputError(
                f"mask array must be HxW (or HxWx3 / HxWx4) uint8 or bool, got {mask.shape} "
                f"{mask.dtype}"
            )
        check_pixels((mask.shape[1], mask.shape[0]), "mask", "(array)")
        return Image.fromarray(mask[:, :, :3] if mask.ndim == 3 else mask)
    raise InputError(
        f"mask must be a path, a PIL image or a uint8 array, not {type(mask).__name__}"
    )


def load_mask(mask: Any, width: int, height: int, blur: float = 0.0) -> np.ndarray:
    """A mask -> (1, 1, height, width) float32 of 0 (keep) and 1 (repaint), as diffusers'
    mask processor makes it (see the module docstring); InputError when nothing is white."""
    from PIL import Image, ImageFilter

    pil = _mask_pil(mask)
    if blur > 0:
        pil = pil.filter(ImageFilter.GaussianBlur(blur))
    if pil.size != (width, height):
        pil = pil.resize((width, height), resample=Image.Resampling.LANCZOS)
    values = np.asarray(pil.convert("L"), dtype=np.float32) / 255.0
    binary = (values >= 0.5).astype(np.float32)
    if not binary.any():
        raise InputError(
            "mask has no white pixels (white = repaint, black = keep): nothing to inpaint"
        )
    return binary[None, None]


def latent_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a (n, 1, H, W) mask to the latent size, as torch's
    ``F.interpolate(mask, size=...)`` (mode ``nearest``: source index ``floor(i * in / out)``)."""
    rows = np.minimum(
        (np.arange(height) * (mask.shape[2] / height)).astype(np.int64), mask.shape[2] - 1
    )
    cols = np.minimum(
        (np.arange(width) * (mask.shape[3] / width)).astype(np.int64), mask.shape[3] - 1
    )
    return np.ascontiguousarray(mask[:, :, rows][:, :, :, cols])


def cfg_rows(rows: np.ndarray, cfg: bool) -> np.ndarray:
    """Per-image rows as UNet conditioning rows: ``[uncond..., cond...]`` halves with CFG."""
    return np.concatenate([rows, rows]) if cfg else rows


class BlendingStepper:
    """A stepper whose every step puts the known region back (inpainting with a 4-channel
    UNet): ``(1 - mask) * known + mask * x`` where ``known`` is the image's latents noised to
    the next model call's level, or the clean latents after the last call. Everything else is
    the wrapped stepper's."""

    def __init__(
        self, inner: Any, image_latents: np.ndarray, noise: np.ndarray, mask: np.ndarray
    ) -> None:
        self.inner = inner
        self.image_latents = np.asarray(image_latents, dtype=np.float32)
        self.noise = np.asarray(noise, dtype=np.float32)
        self.mask = np.asarray(mask, dtype=np.float32)
        self.keep = np.float32(1.0) - self.mask

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self, model_output: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:
        x = self.inner.step(model_output, i, x)
        known = self.image_latents
        if i + 1 < self.inner.num_model_calls:
            known = self.inner.add_noise(self.image_latents, self.noise, i + 1)
        return (self.keep * known + self.mask * x).astype(x.dtype, copy=False)


@dataclass(frozen=True)
class InpaintInput:
    """A request's image and mask at the request's size (pixels), ready to be encoded."""

    image: np.ndarray  # (1, 3, H, W) float32 in [-1, 1]
    mask: np.ndarray  # (1, 1, H, W) float32, 1 = repaint
    blur: float = 0.0

    @classmethod
    def load(
        cls, image: Any, mask: Any, init: np.ndarray, width: int, height: int, blur: Any = 0.0
    ) -> InpaintInput:
        """``init``: the image as :func:`~.images.load_image` made it; ``image`` and ``mask``
        as the caller gave them (their sizes must agree)."""
        blur = check_mask_blur(blur)
        pil = _mask_pil(mask)
        size = image_size(image)
        if size is not None and size != pil.size:
            raise InputError(
                f"mask is {pil.size[0]}x{pil.size[1]} but the image is {size[0]}x{size[1]}; "
                "they must be the same size"
            )
        return cls(init, load_mask(pil, width, height, blur), blur)

    def start(
        self, pipe: Any, req: Any, stepper: Any, noise: np.ndarray, timings: dict[str, float]
    ) -> tuple[np.ndarray, Any, dict[str, np.ndarray]]:
        """(initial latents, the stepper to use, extra UNet conditioning rows) of the request;
        ``pipe``: the :class:`~.pipeline.Pipeline` (its VAE encoder and manifest)."""
        dims: ModelDims = pipe.manifest.dims
        f = dims.vae_scale_factor
        masks = np.repeat(latent_mask(self.mask, req.height // f, req.width // f), req.batch, 0)
        extra: dict[str, np.ndarray] = {}
        if dims.inpainting:
            masked = self.image * (self.mask < 0.5)
            masked_latents = encode_image(pipe, req.seeds, masked, timings, MASKED_IMAGE_STREAM)
            extra = {
                MASK: cfg_rows(masks, req.cfg),
                MASKED_IMAGE_LATENTS: cfg_rows(masked_latents, req.cfg),
            }
        image_latents = None
        if not dims.inpainting or req.strength < 1.0:
            image_latents = encode_image(pipe, req.seeds, self.image, timings)
        if req.strength >= 1.0:
            x = stepper.prepare_noise(noise)
        else:
            x = stepper.add_noise(image_latents, noise)
        if image_latents is not None and not dims.inpainting:
            stepper = BlendingStepper(stepper, image_latents, noise, masks)
        return np.asarray(x, dtype=np.float32), stepper, extra

    def params(self) -> dict[str, Any]:
        """What a result reports about the inpainting (and its PNG embeds)."""
        return {"mask_blur": self.blur} if self.blur else {}
