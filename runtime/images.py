"""Conversions between engine tensors and images, matching diffusers' pre/post-processing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from trt_sd.models.errors import InputError


def to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """VAE output (N, 3, H, W) in [-1, 1] -> N HxWx3 uint8 RGB arrays.

    Same arithmetic as diffusers (``(x / 2 + 0.5).clamp(0, 1)`` then ``numpy_to_pil``'s
    ``(x * 255).round()``), in float32, so identical decoder outputs give identical pixels.
    """
    x = np.asarray(images, dtype=np.float32)
    x = np.clip(x / 2 + 0.5, 0.0, 1.0)
    x = (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    return [np.ascontiguousarray(img) for img in x]


def load_image(image: Any, width: int, height: int) -> np.ndarray:
    """An init image (path, PIL image or HxWx3/HxWx4 uint8 array) -> (1, 3, H, W) float32 in
    [-1, 1], resized with Lanczos to ``width`` x ``height`` when its size differs (as
    diffusers' ``VaeImageProcessor`` resizes)."""
    from PIL import Image

    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"init image {str(path)!r} does not exist")
        try:
            with Image.open(path) as im:
                pil = im.convert("RGB")
        except OSError as e:
            raise InputError(f"init image {str(path)!r} is not a readable image: {e}") from None
    elif isinstance(image, Image.Image):
        pil = image.convert("RGB")
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise InputError(
                f"init image array must be HxWx3 (or HxWx4) uint8, got {image.shape} {image.dtype}"
            )
        pil = Image.fromarray(image[:, :, :3], "RGB")
    else:
        raise InputError(
            f"image must be a path, a PIL image or a uint8 array, not {type(image).__name__}"
        )
    if pil.size != (width, height):
        pil = pil.resize((width, height), resample=Image.Resampling.LANCZOS)
    x = np.asarray(pil, dtype=np.float32) / 255.0
    return (2.0 * x - 1.0).transpose(2, 0, 1)[None]


def image_size(image: Any) -> tuple[int, int] | None:
    """(width, height) of an init image without decoding its pixels, or None if unknown."""
    from PIL import Image

    if isinstance(image, np.ndarray) and image.ndim == 3:
        return int(image.shape[1]), int(image.shape[0])
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, str | os.PathLike) and Path(image).is_file():
        try:
            with Image.open(image) as im:
                return im.size
        except OSError:
            return None
    return None
