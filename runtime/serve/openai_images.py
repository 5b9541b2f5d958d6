"""The OpenAI Images API (``/v1/images/generations``, ``/v1/images/edits``, ``/v1/models``).

What the ``openai`` package sends and parses: JSON (generations) or multipart (edits) in,
``{"created", "data": [{"b64_json"}], ...}`` out; errors as OpenAI's
``{"error": {"message", "type", "param", "code"}}``. ``response_format="url"`` is refused
(this server stores no files); images are always PNG. ``model`` names one of the served
engine directories (``GET /v1/models`` lists them). Extensions beyond OpenAI's fields:
``negative_prompt``, ``seed``, ``steps``, ``sampler``, ``guidance``, ``emphasis`` (how
``(word:1.3)`` weights apply: ``original``, ``no_norm``, ``ignore``, ``none``) and, for
edits, ``strength``.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import time
from typing import TYPE_CHECKING, Any

from trt_sd.models.errors import InputError
from trt_sd.runtime.prompt_chunks import EMPHASIS_MODES

from .b64images import image_from_bytes
from .catalog import ModelEntry
from .front import Blob, Front, TooLargeError, json_ok, json_with_blobs
from .inpaint_fields import openai_mask
from .replica import Reply, json_reply

if TYPE_CHECKING:  # starlette comes with the serve extra; `trt-sd --help` runs without it
    from starlette.requests import Request

MAX_N = 10  # OpenAI's own bound for n
_IGNORED = {  # OpenAI fields that do not change a PNG from these engines -> accepted values
    "user": None,  # any
    "moderation": None,
    "quality": ("auto", "standard"),
    "style": ("natural", "vivid"),  # dall-e-3 only; no effect here
    "background": ("auto", "opaque"),
    "output_format": ("png",),
    "stream": (False,),
    "input_fidelity": None,
}
_EXTENSIONS = ("negative_prompt", "seed", "steps", "sampler", "guidance", "emphasis")


class ApiError(InputError):
    """An error with OpenAI's ``param`` and ``code``."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None, **headers: str
) -> Reply:
    kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    line = " ".join(str(message).split()) or "error"
    body = {"error": {"message": line, "type": kind, "param": param, "code": code}}
    return json_reply(status, body, **headers)


async def handle(front: Front, request: Request, path: str) -> Reply:
    routes = {"/v1/images/generations": "POST", "/v1/images/edits": "POST", "/v1/models": "GET"}
    if path.startswith("/v1/models/"):
        model = front.model(path[len("/v1/models/") :])
        if model is None:
            return openai_error(
                404, f"The model '{path[11:]}' does not exist", "model", "model_not_found"
            )
        return json_ok(_model_object(model))
    if path not in routes:
        return openai_error(404, f"no route {path}; this server offers {', '.join(routes)}")
    if request.method != routes[path]:
        return openai_error(405, f"{path} takes {routes[path]}", Allow=routes[path])
    try:
        if path == "/v1/models":
            return json_ok({"object": "list", "data": [_model_object(m) for m in front.models]})
        if path == "/v1/images/generations":
            fields = await front.read_json(request)
            return await _generate(front, fields, None)
        fields, image = await _read_multipart(front, request)
        return await _generate(front, fields, image)
    except ApiError as e:
        return openai_error(e.status, str(e), e.param, e.code)
    except TooLargeError as e:
        return openai_error(413, str(e))
    except InputError as e:
        return openai_error(400, str(e))


def _model_object(m: ModelEntry) -> dict[str, Any]:
    return {"id": m.name, "object": "model", "created": 0, "owned_by": "trt-sd"}


def _size(value: Any, model: ModelEntry) -> tuple[int, int]:
    if value in (None, "auto"):
        return model.default_width, model.default_height
    if isinstance(value, str) and "x" in value:
        w, _, h = value.partition("x")
        if w.isdigit() and h.isdigit():
            return int(w), int(h)
    raise ApiError(f"size must be 'WIDTHxHEIGHT' or 'auto', got {value!r}", "size")


def _int(fields: dict[str, Any], key: str, default: int | None) -> int | None:
    value = fields.get(key)
    if value is None:
        return default
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # multipart fields arrive as text
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"{key} must be an integer, got {value!r}", key)
    return value


async def _generate(front: Front, fields: dict[str, Any], image: Any) -> Reply:
    allowed = {"prompt", "model", "n", "size", "response_format", *_IGNORED, *_EXTENSIONS}
    if image is not None:
        allowed |= {"strength", "mask"}
    for key, value in fields.items():
        if key not in allowed:
            raise ApiError(f"Unrecognized request argument supplied: {key}", key)
        accepted = _IGNORED.get(key)
        if accepted is not None and value is not None and value not in accepted:
            raise ApiError(
                f"{key}={value!r} is not supported; allowed: {', '.join(map(str, accepted))}", key
            )
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ApiError("prompt is required (a non-empty string)", "prompt")
    model = front.model(fields.get("model"))
    if model is None:
        names = ", ".join(m.name for m in front.models)
        raise ApiError(
            f"The model {fields.get('model')!r} does not exist; available: {names}",
            "model",
            404,
            "model_not_found",
        )
    fmt = fields.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise ApiError(
            f"response_format {fmt!r} is not supported: images come inline; use 'b64_json'",
            "response_format",
            code="unsupported_value",
        )
    n = _int(fields, "n", 1)
    assert n is not None
    if not 1 <= n <= min(MAX_N, front.limits.max_images):
        raise ApiError(f"n must be in 1..{min(MAX_N, front.limits.max_images)}, got {n}", "n")
    width, height = _size(fields.get("size"), model)
    if image is not None and fields.get("size") is None:  # the image's own size if it fits
        try:
            model.check_size(image.shape[1], image.shape[0])
            width, height = image.shape[1], image.shape[0]
        except InputError:
            pass  # the model's default size; the image is resized to it
    steps = _int(fields, "steps", None)
    seed = _int(fields, "seed", None)
    negative = fields.get("negative_prompt") or ""
    try:
        front.limits.check(n, steps, width, height, [prompt, negative])
        model.check_size(width, height)
    except InputError as e:
        raise ApiError(str(e), "size" if "size" in str(e) or "pixels" in str(e) else None) from None
    common: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": negative,
        "width": width,
        "height": height,
    }
    emphasis = fields.get("emphasis")
    if emphasis is not None and emphasis not in EMPHASIS_MODES:
        raise ApiError(
            f"emphasis {emphasis!r} is not an emphasis mode; allowed: {', '.join(EMPHASIS_MODES)}",
            "emphasis",
        )
    for key in ("steps", "sampler", "guidance", "emphasis"):
        if fields.get(key) is not None:
            common[key] = steps if key == "steps" else fields[key]
    if image is not None:
        common["image"] = image
        if fields.get("strength") is not None:
            common["strength"] = float(fields["strength"])
        if fields.get("mask") is not None:  # inpainting (decoded by _read_multipart)
            common["mask"] = fields["mask"]
    if seed is None:
        import secrets

        seed = secrets.randbits(32)
    images, error, _ = await front.images(model, [dict(common, seed=seed + i) for i in range(n)])
    if error is not None:
        message = (
            error.json.get("error", "generation failed")
            if error.content_type.startswith("application/json")
            else "generation failed"
        )
        return openai_error(
            error.status, message, **{k: v for k, v in error.headers.items() if k == "Retry-After"}
        )
    return json_with_blobs({
        "created": int(time.time()),
        "data": [{"b64_json": Blob(im.png)} for im in images],
        "output_format": "png",
        "size": f"{width}x{height}",
    })  # fmt: skip


async def _read_multipart(front: Front, request: Request) -> tuple[dict[str, Any], Any]:
    """``multipart/form-data`` -> (text fields, the decoded ``image``); a ``mask`` (OpenAI's
    convention: transparent = edit) becomes ``fields["mask"]``, white = repaint."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise ApiError("images/edits takes multipart/form-data (image, prompt, ...)", "image")
    body = await front.read_body(request)
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise ApiError("the multipart body could not be read", "image")
    fields: dict[str, Any] = {}
    images: list[bytes] = []
    masks: list[bytes] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            payload = b""
        if name in ("image", "image[]"):
            images.append(payload)
        elif name == "mask":
            masks.append(payload)
        elif isinstance(name, str):
            fields[name] = payload.decode("utf-8", "replace")
    if len(images) != 1:
        raise ApiError(f"send exactly one image (got {len(images)})", "image")
    image = await asyncio.to_thread(image_from_bytes, images[0], "image")
    if masks:
        try:
            fields["mask"] = await asyncio.to_thread(openai_mask, masks[0])
        except InputError as e:
            raise ApiError(str(e), "mask") from None
    if "strength" in fields:
        try:
            fields["strength"] = float(fields["strength"])
        except ValueError:
            raise ApiError(
                f"strength must be a number, got {fields['strength']!r}", "strength"
            ) from None
    if "guidance" in fields:
        try:
            fields["guidance"] = float(fields["guidance"])
        except ValueError:
            raise ApiError(
                f"guidance must be a number, got {fields['guidance']!r}", "guidance"
            ) from None
    return fields, image
