"""Inpainting fields of the client APIs -> engine keyword arguments (white = repaint).

OpenAI's ``/v1/images/edits``: ``mask`` is a PNG whose fully transparent pixels are the ones
to edit (:func:`openai_mask`). The WebUI's ``/sdapi/v1/img2img``:

``mask`` (base64, white = repaint), ``mask_blur`` (pixels, the WebUI's default 4; its x / y
variants must agree with it: one radius), ``inpainting_mask_invert`` (1: black = repaint).
The WebUI's other inpainting settings (``inpainting_fill``, ``inpaint_full_res``, padding,
``mask_round``) are accepted and not applied: trt-sd inpaints as diffusers does, the whole
picture with a binarised mask (docs/inpainting.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trt_sd.models.errors import InputError

from .a1111_info import FieldError
from .b64images import MAX_INIT_PIXELS, decode_image

#: the WebUI's ``mask_blur`` default
WEBUI_MASK_BLUR = 4


def _number(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FieldError(f"{key} must be a number of pixels, got {value!r}")
    return float(value)


def inpaint_fields(data: dict[str, Any]) -> dict[str, Any]:
    """``{"mask": HxWx3 uint8, "mask_blur": px}`` of an img2img request with a mask, or
    ``{}`` without one (FieldError for fields that contradict each other)."""
    raw = data.get("mask")
    if raw in (None, ""):
        return {}
    mask = decode_image(raw, "mask")
    invert = data.get("inpainting_mask_invert", 0)
    if invert not in (0, 1, None, True, False):
        raise FieldError(f"inpainting_mask_invert must be 0 or 1, got {invert!r}")
    if invert:
        mask = 255 - mask
    blur = _number(data, "mask_blur")
    for key in ("mask_blur_x", "mask_blur_y"):
        value = _number(data, key)
        if value is not None and blur is not None and value != blur:
            raise FieldError(f"{key}={value:g} differs from mask_blur={blur:g}; one radius only")
        blur = value if blur is None else blur
    return {"mask": mask, "mask_blur": WEBUI_MASK_BLUR if blur is None else blur}


def openai_mask(data: bytes) -> np.ndarray:
    """An OpenAI edits mask (a PNG with an alpha channel; transparent = edit) -> HxW uint8
    with white = repaint (``255 - alpha``: binarised at half, alpha below 128 repaints)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size[0] * im.size[1] > MAX_INIT_PIXELS:
                raise InputError(f"mask is {im.size[0]}x{im.size[1]}; too many pixels")
            if "A" not in im.getbands() and "transparency" not in im.info:
                raise InputError(
                    "mask must be a PNG with an alpha channel (transparent pixels are edited)"
                )
            alpha = np.asarray(im.convert("RGBA"), dtype=np.uint8)[:, :, 3]
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Warning) as e:
        raise InputError(f"mask is not a readable image: {type(e).__name__}") from None
    return np.ascontiguousarray(255 - alpha)
