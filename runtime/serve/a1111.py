"""The AUTOMATIC1111 WebUI API (``/sdapi/v1/...``) in front of the generation replicas.

Request fields are the WebUI's (``modules/api/models.py``: the processing classes' arguments
plus the API's extras). A field we implement is mapped to the engine request; a WebUI field we
do not implement is accepted only while it holds the WebUI's own "off" value (``enable_hr``
false, ``styles`` empty, ``s_churn`` 0, ...), otherwise the answer is 422 naming
it; a field the WebUI does not define is 422 too (a typo must not be silently dropped).

Deviations, on purpose: unset ``steps`` / ``width`` / ``height`` come from the model's manifest
(engines are built for a size range; the WebUI's 512 would fail on a 1024-only engine); images
are always PNG with the WebUI ``parameters`` chunk.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from trt_sd.models.errors import InputError
from trt_sd.runtime.infotext import PNG_KEY, webui_sampler_name

from .a1111_info import LISTS, SCHEDULERS, FieldError, model_titles, options, set_options
from .b64images import decode_image
from .catalog import ModelEntry
from .front import Blob, Front, TooLargeError, json_ok, json_with_blobs
from .inpaint_fields import inpaint_fields
from .replica import Reply, error_reply

if TYPE_CHECKING:  # starlette comes with the serve extra; `trt-sd --help` runs without it
    from starlette.requests import Request

#: WebUI fields we do not implement -> test that the value is the WebUI's "off" (ignored then)
_OFF: dict[str, Any] = {
    "styles": lambda v: not v,
    "subseed": lambda v: True,  # only used with subseed_strength > 0
    "subseed_strength": lambda v: not v,
    "seed_resize_from_h": lambda v: v is None or v <= 0,
    "seed_resize_from_w": lambda v: v is None or v <= 0,
    "seed_enable_extras": lambda v: True,
    "restore_faces": lambda v: not v,
    "tiling": lambda v: not v,
    "do_not_save_samples": lambda v: True,
    "do_not_save_grid": lambda v: True,
    "s_min_uncond": lambda v: not v,
    "s_churn": lambda v: not v,
    "s_tmax": lambda v: True,  # only used with s_churn > 0
    "s_tmin": lambda v: True,
    "s_noise": lambda v: v is None or v == 1,
    "override_settings_restore_afterwards": lambda v: True,
    "refiner_checkpoint": lambda v: v in (None, "", "None"),
    "refiner_switch_at": lambda v: True,  # only used with a refiner
    "token_merging_ratio": lambda v: not v,
    "token_merging_ratio_hr": lambda v: True,
    "disable_extra_networks": lambda v: True,
    "firstpass_image": lambda v: v is None,
    "comments": lambda v: True,
    "force_task_id": lambda v: True,
    "script_name": lambda v: v in (None, ""),
    "script_args": lambda v: not v,
    "alwayson_scripts": lambda v: not v,
    "save_images": lambda v: not v,
    "infotext": lambda v: v in (None, ""),
    "distilled_cfg_scale": lambda v: True,  # Forge, Flux models only
}
_TXT2IMG_OFF: dict[str, Any] = {
    "enable_hr": lambda v: not v,
    "denoising_strength": lambda v: True,  # the hires pass's; only with enable_hr
    **{
        k: (lambda v: True)  # hires-fix settings: only with enable_hr
        for k in (
            "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler",
            "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
            "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_cfg",
            "hr_distilled_cfg", "hr_additional_modules",
        )
    },
}  # fmt: skip
_IMG2IMG_OFF: dict[str, Any] = {
    "resize_mode": lambda v: not v,  # 0: just resize (what we do)
    "image_cfg_scale": lambda v: True,  # instruct-pix2pix models only
    "initial_noise_multiplier": lambda v: v is None or v == 1,
    "include_init_images": lambda v: True,
    "latent_mask": lambda v: v in (None, ""),  # a second mask for the latents: not supported
    **{
        k: (lambda v: True)  # inpainting: read by inpaint_fields (mask_blur, invert) or
        for k in (  # diffusers' way instead (whole picture, binarised mask; docs/inpainting.md)
            "mask_blur", "mask_blur_x", "mask_blur_y", "mask_round", "inpainting_fill",
            "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
        )
    },
}  # fmt: skip
_MAPPED = (
    "prompt", "negative_prompt", "seed", "sampler_name", "sampler_index", "scheduler",
    "batch_size", "n_iter", "steps", "cfg_scale", "width", "height", "eta",
    "override_settings", "send_images",
)  # fmt: skip
WEBUI_DEFAULT_SAMPLER = "Euler"  # the API's sampler_index default
#: the WebUI's "Emphasis mode" option (``override_settings.emphasis``; the names of
#: ``modules/sd_emphasis.py``) -> our ``emphasis`` modes
WEBUI_EMPHASIS = {"Original": "original", "No norm": "no_norm", "Ignore": "ignore", "None": "none"}


async def handle(front: Front, request: Request, path: str) -> Reply:
    """Route one ``/sdapi/v1/*`` request."""
    name = path[len("/sdapi/v1/") :]
    routes: dict[str, tuple[str, ...]] = {
        "txt2img": ("POST",), "img2img": ("POST",), "sd-models": ("GET",),
        "options": ("GET", "POST"), "samplers": ("GET",), "schedulers": ("GET",),
        "progress": ("GET",), "interrupt": ("POST",), "scripts": ("GET",),
    }  # fmt: skip
    if name not in routes:
        return error_reply(
            404, f"no route {path}; this server offers /sdapi/v1/{{{','.join(routes)}}}"
        )
    if request.method not in routes[name]:
        allowed = ", ".join(routes[name])
        return error_reply(405, f"{path} takes {allowed}", Allow=allowed)
    try:
        if name in ("txt2img", "img2img"):
            return await generate(front, await front.read_json(request), name == "img2img")
        if name == "options":
            if request.method == "POST":
                set_options(front, await front.read_json(request))
            return json_ok(options(front))
        return json_ok(LISTS[name](front))
    except TooLargeError as e:
        return error_reply(413, str(e))
    except FieldError as e:
        return error_reply(422, str(e))
    except InputError as e:
        return error_reply(400, str(e))


def _int(data: dict[str, Any], key: str, default: int) -> int:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise FieldError(f"{key} must be an integer, got {value!r}")
    return int(value)


def _check_fields(data: dict[str, Any], img2img: bool) -> None:
    off = {**_OFF, **(_IMG2IMG_OFF if img2img else _TXT2IMG_OFF)}
    known = (
        set(_MAPPED)
        | set(off)
        | ({"init_images", "mask", "denoising_strength"} if img2img else set())
    )
    for key, value in data.items():
        if key not in known:
            raise FieldError(
                f"unknown field {key!r} (not a WebUI {'img2img' if img2img else 'txt2img'} field)"
            )
        if key in off and value is not None and not off[key](value):
            raise FieldError(
                f"{key}={value!r} is not supported by this server; leave it at its default"
            )


def _model_for(front: Front, data: dict[str, Any]) -> ModelEntry:
    overrides = data.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise FieldError("override_settings must be an object")
    for key, value in overrides.items():
        if key == "CLIP_stop_at_last_layers" and value in (1, None):
            continue
        if key not in ("sd_model_checkpoint", "emphasis"):
            raise FieldError(
                f"override_settings.{key} is not supported; allowed: sd_model_checkpoint, emphasis"
            )
    name = overrides.get("sd_model_checkpoint")
    if name is None:
        return front.current
    model = front.model(str(name))
    if model is None:
        raise FieldError(
            f"override_settings.sd_model_checkpoint {name!r} is not a model here; "
            f"choose one of {model_titles(front)}"
        )
    return model


def _emphasis(data: dict[str, Any]) -> str | None:
    """``override_settings.emphasis`` (the WebUI's option names) -> our mode; None = unset."""
    value = (data.get("override_settings") or {}).get("emphasis")
    if value is None:
        return None
    if value not in WEBUI_EMPHASIS:
        raise FieldError(
            f"override_settings.emphasis {value!r} is not an emphasis mode; allowed: "
            f"{', '.join(WEBUI_EMPHASIS)}"
        )
    return WEBUI_EMPHASIS[value]


def _sampler(data: dict[str, Any]) -> str:
    name = data.get("sampler_name") or data.get("sampler_index") or WEBUI_DEFAULT_SAMPLER
    if not isinstance(name, str):
        raise FieldError(f"sampler_name must be a string, got {name!r}")
    scheduler = data.get("scheduler") or "automatic"
    if not isinstance(scheduler, str) or scheduler.lower() not in SCHEDULERS:
        raise FieldError(
            f"scheduler {scheduler!r} is not supported; allowed: {', '.join(SCHEDULERS)}"
        )
    scheduler = scheduler.lower()
    if scheduler == "automatic":
        return name
    suffix = SCHEDULERS[scheduler][0]
    if name.lower().endswith((" karras", " exponential")) and not name.lower().endswith(
        suffix.lower()
    ):
        raise FieldError(f"sampler_name {name!r} and scheduler {scheduler!r} disagree")
    return name if name.lower().endswith(suffix.lower()) else f"{name} {suffix}"


def _takes_eta(sampler: str) -> bool:
    from trt_sd.samplers import SAMPLERS, resolve

    try:
        canonical, _ = resolve(sampler)
    except ValueError:
        return False  # the replica names the unknown sampler with the valid choices
    return "eta" in SAMPLERS[canonical].params


def engine_requests(
    front: Front, data: dict[str, Any], img2img: bool
) -> tuple[ModelEntry, list[dict[str, Any]], dict[str, Any]]:
    """A WebUI request -> (model, one engine request per image, the WebUI ``parameters``)."""
    _check_fields(data, img2img)
    model = _model_for(front, data)
    batch_size, n_iter = _int(data, "batch_size", 1), _int(data, "n_iter", 1)
    if batch_size < 1 or n_iter < 1:
        raise FieldError(f"batch_size and n_iter must be >= 1, got {batch_size} and {n_iter}")
    images = batch_size * n_iter
    init: list[Any] = []
    if img2img:
        raw = data.get("init_images")
        if not isinstance(raw, list) or not raw:
            raise FieldError("init_images must be a list of one or more base64 images")
        if len(raw) > images:
            raise FieldError(f"init_images has {len(raw)} images for {images} outputs")
        init = [decode_image(v, f"init_images[{i}]") for i, v in enumerate(raw)]
    mask = inpaint_fields(data) if img2img else {}
    size_default = (model.default_width, model.default_height)
    if init:
        size_default = (init[0].shape[1], init[0].shape[0])
    width = _int(data, "width", size_default[0])
    height = _int(data, "height", size_default[1])
    steps = _int(data, "steps", model.default_steps)
    prompt, negative = data.get("prompt") or "", data.get("negative_prompt") or ""
    for key, text in (("prompt", prompt), ("negative_prompt", negative)):
        if not isinstance(text, str):
            raise FieldError(f"{key} must be a string")
    front.limits.check(images, steps, width, height, [prompt, negative])
    model.check_size(width, height)
    seed = _int(data, "seed", -1)
    if seed == -1:
        seed = secrets.randbelow(4294967294)
    sampler = _sampler(data)
    common: dict[str, Any] = {
        "prompt": prompt, "negative_prompt": negative, "sampler": sampler, "steps": steps,
        "guidance": data.get("cfg_scale", 7.0), "height": height, "width": width,
    }  # fmt: skip
    if data.get("eta") is not None and _takes_eta(sampler):
        common["eta"] = data["eta"]
    if (emphasis := _emphasis(data)) is not None:
        common["emphasis"] = emphasis
    if img2img:
        common["strength"] = data.get("denoising_strength", 0.75)
    requests = []
    for i in range(images):
        kw = dict(common, seed=seed + i)
        if init:
            kw["image"] = init[i % len(init)]
        requests.append({**kw, **mask})
    parameters = {k: v for k, v in data.items() if k not in ("init_images", "mask")}
    parameters.update(
        seed=seed, width=width, height=height, steps=steps, batch_size=batch_size, n_iter=n_iter
    )
    return model, requests, parameters


async def generate(front: Front, data: dict[str, Any], img2img: bool) -> Reply:
    """``POST /sdapi/v1/txt2img`` / ``img2img``."""
    if img2img:  # decoding init images off the event loop: other requests keep flowing
        model, requests, parameters = await asyncio.to_thread(engine_requests, front, data, True)
    else:
        model, requests, parameters = engine_requests(front, data, False)
    images, error, interrupted = await front.images(model, requests)
    if error is not None:  # one image failed (queue full, bad value): the request failed
        return error
    infotexts = [_infotext(im.png) for im in images]
    first = images[0].params if images else {}
    seeds = [im.params.get("seed", 0) for im in images]
    info = {
        "prompt": requests[0]["prompt"],
        "all_prompts": [r["prompt"] for r in requests[: len(images)]],
        "negative_prompt": requests[0]["negative_prompt"],
        "all_negative_prompts": [r["negative_prompt"] for r in requests[: len(images)]],
        "seed": parameters["seed"],
        "all_seeds": seeds,
        "subseed": parameters["seed"],
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": parameters["width"],
        "height": parameters["height"],
        "sampler_name": webui_sampler_name(first["sampler"], None) if first else None,
        "cfg_scale": first.get("guidance"),
        "steps": parameters["steps"],
        "batch_size": parameters["batch_size"],
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model.name,
        "sd_model_hash": model.short_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.get("strength"),
        "extra_generation_params": {
            "Schedule type": (data.get("scheduler") or "automatic").capitalize()
        },
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": infotexts[0].rsplit("Version: ", 1)[-1]
        if infotexts and "Version: " in infotexts[0]
        else "",
        "interrupted": interrupted,
    }
    send = data.get("send_images", True) is not False
    payload = {
        "images": [Blob(im.png) for im in images] if send else [],
        "parameters": parameters,
        "info": json.dumps(info, ensure_ascii=False),
    }
    return json_with_blobs(payload)


def _infotext(png: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return str(im.info.get(PNG_KEY, ""))
