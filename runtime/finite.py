"""The NaN / inf check on component outputs, with the hint that fixes each case."""

from __future__ import annotations

import numpy as np

from trt_sd.models.descriptors import TEXT_ENCODER, VAE_DECODER, VAE_ENCODER
from trt_sd.models.errors import NumericalError

__all__ = ["check_finite"]


def check_finite(name: str, value: np.ndarray, detail: str = "", hint: str = "") -> None:
    if np.isfinite(value).all():
        return
    hint = hint or {
        VAE_DECODER: (
            "; the fp16 SD VAE overflows on some latents: use the fp32 VAE "
            "(re-export without --vae-fp16)"
        ),
        VAE_ENCODER: (
            "; the fp16 SD VAE overflows on some images: use the fp32 VAE "
            "(re-export without --vae-fp16)"
        ),
        TEXT_ENCODER: "; export the text encoder in fp32",
    }.get(name, "; try an fp32 export")
    raise NumericalError(f"{name} produced NaN or inf{detail}{hint}")
