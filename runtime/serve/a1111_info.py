"""The AUTOMATIC1111 API's read-mostly routes: models, samplers, schedulers, options,
progress, interrupt, scripts (:mod:`.a1111` has the generation routes and the dispatcher)."""

from __future__ import annotations

import time
from typing import Any

from trt_sd.models.errors import InputError
from trt_sd.runtime.infotext import WEBUI_SAMPLERS

from .front import Front

#: the WebUI's schedulers we implement (others: 422 with this list)
SCHEDULERS = {
    "automatic": ("Automatic", None),
    "karras": ("Karras", 7.0),
    "exponential": ("Exponential", None),
}
OPTIONS_SETTABLE = ("sd_model_checkpoint",)


class FieldError(InputError):
    """A request field the WebUI defines but we cannot honour (HTTP 422)."""


def sd_models(front: Front) -> list[dict[str, Any]]:
    return [
        {
            "title": m.title,
            "model_name": m.name,
            "hash": m.short_hash or None,
            "sha256": m.model_hash if len(m.model_hash) == 64 else None,
            "filename": m.engine_dir,
            "config": None,
        }
        for m in front.models
    ]


def samplers(front: Front) -> list[dict[str, Any]]:
    """The WebUI sampler names our registry implements (``/sdapi/v1/samplers``)."""
    from trt_sd.samplers import SAMPLERS, resolve

    out = []
    for name in WEBUI_SAMPLERS:
        try:
            canonical, _ = resolve(name)
        except ValueError:
            continue
        aliases = [canonical, *(a for a in SAMPLERS[canonical].aliases if a != name)]
        out.append({"name": name, "aliases": aliases, "options": {}})
    return out


def schedulers(front: Front) -> list[dict[str, Any]]:
    return [
        {
            "name": k,
            "label": label,
            "aliases": None,
            "default_rho": rho or -1.0,
            "need_inner_model": False,
        }
        for k, (label, rho) in SCHEDULERS.items()
    ]


def options(front: Front) -> dict[str, Any]:
    m = front.current
    return {
        "sd_model_checkpoint": m.title,
        "sd_checkpoint_hash": m.model_hash or None,
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
    }


def set_options(front: Front, data: dict[str, Any]) -> None:
    """``POST /sdapi/v1/options``: only ``sd_model_checkpoint`` (which model unnamed requests
    use) can be set; it is the ingress's state, shared by every client of this service."""
    for key in data:
        if key not in OPTIONS_SETTABLE and not (
            key == "CLIP_stop_at_last_layers" and data[key] == 1
        ):
            raise FieldError(
                f"option {key!r} cannot be set here; settable: {', '.join(OPTIONS_SETTABLE)}"
            )
    if "sd_model_checkpoint" in data:
        model = front.model(str(data["sd_model_checkpoint"]))
        if model is None:
            raise FieldError(
                f"sd_model_checkpoint {data['sd_model_checkpoint']!r} is not a model here; "
                f"choose one of {model_titles(front)}"
            )
        front.current = model


def progress(front: Front) -> dict[str, Any]:
    """Finished / requested images of the WebUI requests in flight (per image, not per step)."""
    p = front.progress()
    return {
        "progress": round(p["progress"], 4),
        "eta_relative": round(p["eta"], 3),
        "state": {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": "",
            "job_count": p["jobs"],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "job_no": p["done"],
            "sampling_step": 0,
            "sampling_steps": 0,
        },
        "current_image": None,
        "textinfo": None,
    }


def interrupt(front: Front) -> dict[str, Any]:
    front.interrupt()
    return {}


def scripts(front: Front) -> dict[str, Any]:
    return {"txt2img": [], "img2img": []}


def model_titles(front: Front) -> str:
    return ", ".join(m.title for m in front.models)


LISTS = {
    "sd-models": sd_models,
    "samplers": samplers,
    "schedulers": schedulers,
    "progress": progress,
    "interrupt": interrupt,
    "scripts": scripts,
}
