"""Conversions between engine tensors and images, matching diffusers' pre/post-processing."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from trt_sd.models.errors import InputError

#: Largest image (declared width x height) read from a file or bytes: 50 megapixels covers
#: 8K frames and camera photos; a decompression bomb declares far more and is refused from its
#: header, before any pixel is decoded.
MAX_INPUT_PIXELS = 50_000_000


@contextlib.contextmanager
def open_image(
    source: str | os.PathLike[str] | bytes, what: str = "image", kind: str = "image"
) -> Iterator[Any]:
    """A PIL image opened lazily (header only) from a path or bytes, its declared size checked
    against :data:`MAX_INPUT_PIXELS`; every failure (missing, unreadable, a bomb, oversized
    text chunks) is one InputError. The one way trt-sd opens an image it did not make."""
    from PIL import Image

    label = "the image data" if isinstance(source, bytes) else repr(str(source))
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.is_file():
            raise InputError(
                f"{what} {label} is not a readable {kind}: it does not exist or is not a file"
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            handle = io.BytesIO(source) if isinstance(source, bytes) else source
            with Image.open(handle) as im:
                check_pixels(im.size, what, label)
                yield im
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"{what} {label} declares far too many pixels (a decompression bomb?); at most "
            f"{MAX_INPUT_PIXELS} pixels are accepted"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's decoders raise these
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise InputError(f"{what} {label} is not a readable {kind}: {reason}") from None


def check_pixels(size: tuple[int, int], what: str, label: str) -> None:
    width, height = size
    if width * height > MAX_INPUT_PIXELS:
        raise InputError(
            f"{what} {label} is {width}x{height} pixels; at most {MAX_INPUT_PIXELS} "
            "pixels are accepted"
        )


def to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """VAE output (N, 3, H, W) in [-1, 1] -> N HxWx3 uint8 RGB arrays.

    Same arithmetic as diffusers (``(x / 2 + 0.5).clamp(0, 1)`` then ``numpy_to_pil``'s
    ``(x * 255).round()``), in float32, so identical decoder outputs give identical pixels.
    """
    x = np.asarray(images, dtype=np.float32)
    x = np.clip(x / 2 + 0.5, 0.0, 1.0)
    x = (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    return [np.ascontiguousarray(img) for img in x]


def open_rgb(image: Any, what: str, kind: str | None = None) -> Any:
    """A path, PIL image or HxWx3/HxWx4 uint8 array -> an RGB PIL image, every way in under
    the same pixel ceilings and one-line errors (``what`` names it; ``kind``: the word for the
    wrong-type message, default ``what``)."""
    from PIL import Image

    if isinstance(image, str | os.PathLike | bytes):
        with open_image(image, what) as im:
            try:
                return im.convert("RGB")
            except (OSError, ValueError) as e:  # truncated pixel data
                raise InputError(f"{what} is not a readable image: {e}") from None
    if isinstance(image, Image.Image):
        check_pixels(image.size, what, "(PIL image)")
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise InputError(
                f"{what} array must be HxWx3 (or HxWx4) uint8, got {image.shape} {image.dtype}"
            )
        check_pixels((image.shape[1], image.shape[0]), what, "(array)")
        return Image.fromarray(np.ascontiguousarray(image[:, :, :3]), "RGB")
    raise InputError(
        f"{kind or what} must be a path, a PIL image or a uint8 array, not {type(image).__name__}"
    )


def load_image(image: Any, width: int, height: int) -> np.ndarray:
    """An init image (path, PIL image or HxWx3/HxWx4 uint8 array) -> (1, 3, H, W) float32 in
    [-1, 1], resized with Lanczos to ``width`` x ``height`` when its size differs (as
    diffusers' ``VaeImageProcessor`` resizes)."""
    from PIL import Image

    pil = open_rgb(image, "init image", kind="image")
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
    if isinstance(image, str | os.PathLike | bytes):
        with open_image(image, "init image") as im:
            width, height = im.size
            return int(width), int(height)
    return None
