"""A generation request's inputs, filled in, checked and loaded before any engine runs.

``Pipeline.__call__`` and the batching engine's ``submit`` take the same arguments and must
apply the same rules in the same order (an image the engine serves is the one the pipeline
makes for the same arguments), so the preparation lives here once:

1. unset height / width from the initial latents, then the first control image, then the
   init image (each fills only what is still unset);
2. :func:`~.request.build_request` (defaults from the manifest, every value validated);
3. the model family's own options (SDXL's size conditioning ...);
4. the ControlNet images, scales and windows;
5. the init image and the inpainting mask, decoded at the request's size.

Every problem is an :class:`~trt_sd.models.errors.InputError` with one line. Both then start the
request's latents (:func:`start_latents`) and report it (:func:`call_params`) the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .controlnet import RequestControl, fill_size, resolve_control
from .images import image_size, load_image
from .inpaint import InpaintInput
from .request import Request, build_request
from .vae import encode_image


@dataclass(frozen=True)
class CallInputs:
    """What :func:`prepare_call` made of a call's arguments."""

    req: Request
    options: dict[str, Any]  # the family's options, checked (defaults filled)
    control: RequestControl | None
    init_image: np.ndarray | None  # (1, 3, H, W) float32 in [-1, 1], img2img / inpainting
    inpaint: InpaintInput | None


def prepare_call(
    pipe: Any,
    resolve_sampler: Any,
    *,
    height: int | None,
    width: int | None,
    latents: Any = None,
    image: Any = None,
    handed_latents: bool = False,
    mask: Any = None,
    mask_blur: Any = 0.0,
    control_image: Any = None,
    controlnet_scale: Any = 1.0,
    control_start: Any = 0.0,
    control_end: Any = 1.0,
    options: dict[str, Any] | None = None,
    **request: Any,
) -> CallInputs:
    """Steps 1-5 of the module docstring for ``pipe`` (a :class:`~.pipeline.Pipeline`).

    ``request``: the remaining :func:`~.request.build_request` keywords (prompt, sampler,
    steps, ...). ``handed_latents``: the init "image" is a base model's latents (a refiner
    hand-off, :mod:`.handoff`), so the request is img2img without an image to decode."""
    if latents is not None and np.ndim(latents) == 4 and (height is None or width is None):
        factor = pipe.manifest.dims.vae_scale_factor
        height = np.shape(latents)[2] * factor if height is None else height
        width = np.shape(latents)[3] * factor if width is None else width
    height, width = fill_size(control_image, height, width)
    if image is not None and (height is None or width is None):
        size = image_size(image)
        if size is not None:
            width = size[0] if width is None else width
            height = size[1] if height is None else height
    req = build_request(
        pipe.manifest,
        resolve_sampler,
        height=height,
        width=width,
        img2img=image is not None or handed_latents,
        **request,
    )
    family_options = pipe.family.check_options(options or {}, req.height, req.width)
    control = resolve_control(
        pipe.controlnet, control_image, controlnet_scale, control_start, control_end, req
    )
    init_image = load_image(image, req.width, req.height) if image is not None else None
    inpaint = None
    if mask is not None:
        inpaint = InpaintInput.load(image, mask, init_image, req.width, req.height, mask_blur)
    return CallInputs(req, family_options, control, init_image, inpaint)


def start_latents(
    pipe: Any,
    req: Request,
    stepper: Any,
    noise: np.ndarray,
    init_image: np.ndarray | None,
    inpaint: InpaintInput | None,
    timings: dict[str, float],
) -> tuple[np.ndarray, Any, dict[str, np.ndarray]]:
    """(initial latents, the stepper to use, extra UNet conditioning rows) of a request:
    txt2img's scaled noise, img2img's init image encoded and noised to its first step, or
    inpainting's start (its mask rows join the conditioning; a 4-channel UNet's latent
    blending goes into the stepper, :mod:`.inpaint`)."""
    if inpaint is not None:
        return inpaint.start(pipe, req, stepper, noise, timings)
    if init_image is not None:
        latents = encode_image(pipe, req.seeds, init_image, timings)
        return stepper.add_noise(latents, noise), stepper, {}
    return stepper.prepare_noise(noise), stepper, {}


def call_params(
    pipe: Any,
    req: Request,
    options: dict[str, Any],
    control: RequestControl | None,
    inpaint: InpaintInput | None,
    lora_params: dict[str, Any],
) -> dict[str, Any]:
    """What a result reports and its PNG embeds: the resolved request and engine identity
    (``pipe.result_params``), the family options, ControlNet settings, mask blur and LoRAs."""
    extra = control.params() if control else {}
    params = pipe.result_params(req, {**options, **extra})
    params.update(inpaint.params() if inpaint is not None else {})
    params.update(lora_params)
    return params
