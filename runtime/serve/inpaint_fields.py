"""The WebUI's inpainting fields of ``/sdapi/v1/img2img`` -> engine keyword arguments.

``mask`` (base64, white = repaint), ``mask_blur`` (pixels, the WebUI's default 4; its x / y
variants must agree with it: one radius), ``inpainting_mask_invert`` (1: black = repaint).
The WebUI's other inpainting settings (``inpainting_fill``, ``inpaint_full_res``, padding,
``mask_round``) are accepted and not applied: trt-sd inpaints as diffusers does, the whole
picture with a binarised mask (docs/inpainting.md).
"""

from __future__ import annotations

from typing import Any

from .a1111_info import FieldError
from .b64images import decode_image

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
