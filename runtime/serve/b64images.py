"""Images as the client APIs carry them: base64 strings (optionally ``data:`` URLs) in JSON,
or raw bytes from a multipart upload.

Decoding is bounded: Pillow reads the header first and an image over :data:`MAX_INIT_PIXELS`
is refused before its pixels are decompressed (a small PNG can claim a gigapixel canvas).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np

from trt_sd.models.errors import InputError

#: an init image is resized to the request's size anyway; this only stops decompression bombs
MAX_INIT_PIXELS = 4096 * 4096


def decode_b64(value: object, what: str) -> bytes:
    """A base64 string (``data:image/png;base64,...`` accepted) -> bytes."""
    if not isinstance(value, str):
        raise InputError(
            f"{what} must be a base64-encoded image string, got {type(value).__name__}"
        )
    text = value.strip()
    if text.startswith("data:"):
        _, sep, text = text.partition(",")
        if not sep:
            raise InputError(f"{what} is a data: URL without data")
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} is not valid base64") from None


def image_from_bytes(data: bytes, what: str) -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8 RGB (InputError if not a readable image)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_INIT_PIXELS:
                    raise InputError(
                        f"{what} is {w}x{h}; at most {MAX_INIT_PIXELS} pixels are allowed"
                    )
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Warning) as e:
        raise InputError(f"{what} is not a readable image: {type(e).__name__}") from None


def decode_image(value: object, what: str) -> np.ndarray:
    """A base64 image field -> HxWx3 uint8 RGB."""
    return image_from_bytes(decode_b64(value, what), what)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
