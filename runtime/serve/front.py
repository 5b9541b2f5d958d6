"""The ingress's front door: API keys, limits, model routing and the client-API route table.

:class:`Front` runs inside the ingress deployment (see :mod:`.app`). It answers the
AUTOMATIC1111 routes (:mod:`.a1111`), the OpenAI Images routes (:mod:`.openai_images`) and
``/metrics`` itself, and leaves ``/generate`` and ``/health`` to the ingress (after the key
check). An adapter turns one client request into one engine request per image and sends them
concurrently, so the images of a ``batch_size`` / ``n`` request share UNet calls in the
replica's continuous batching exactly like independent ``/generate`` requests do.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trt_sd.models.errors import InputError

from .auth import OPEN_PATHS, UNAUTHORIZED, authorized
from .catalog import ModelEntry, find_model
from .metrics import CONTENT_TYPE, Metrics
from .replica import (
    JSON_TYPE,
    PARAMS_HEADER,
    Reply,
    error_reply,
    json_reply,
    parse_json_object,
)

if TYPE_CHECKING:  # starlette comes with the serve extra; `trt-sd --help` runs without it
    from starlette.requests import Request

log = logging.getLogger(__name__)

#: (model name, engine keyword arguments) -> the replica's reply for one image
GenerateFn = Callable[[str, dict[str, Any]], Awaitable[Reply]]
#: model name -> that model's replica /health reply
HealthFn = Callable[[str], Awaitable[Reply]]


class TooLargeError(InputError):
    """A request over a size limit (HTTP 413)."""


@dataclass(frozen=True)
class Limits:
    """Per-request bounds; a request over one is refused with one line naming it."""

    max_images: int = 8  # n, batch_size * n_iter
    max_steps: int = 150
    max_pixels: int = 8 * 1024 * 1024  # width * height * images
    max_prompt_chars: int = 4096
    max_body_bytes: int = 32 * 1024 * 1024  # image uploads included

    def check(self, images: int, steps: int | None, width: int, height: int, prompts: list) -> None:
        if not 1 <= images <= self.max_images:
            raise InputError(f"{images} images requested; allowed 1..{self.max_images} per request")
        if steps is not None and steps > self.max_steps:
            raise InputError(f"steps {steps} is over this server's limit of {self.max_steps}")
        pixels = width * height * images
        if pixels > self.max_pixels:
            raise InputError(
                f"{images} x {width}x{height} = {pixels} pixels; this server allows "
                f"{self.max_pixels} pixels per request"
            )
        for text in prompts:
            if isinstance(text, str) and len(text) > self.max_prompt_chars:
                raise InputError(
                    f"prompt has {len(text)} characters; at most {self.max_prompt_chars} allowed"
                )


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class FrontConfig:
    """What ``trt-sd serve`` configures for the front door (plain data: it crosses to Ray)."""

    models: tuple[ModelEntry, ...]
    api_key: str | None = None
    limits: Limits = DEFAULT_LIMITS


@dataclass(eq=False)
class ImageJob:
    """One client request's images in flight (for the WebUI's /progress and /interrupt)."""

    total: int
    started: float
    tasks: list[asyncio.Task] = field(default_factory=list)
    done: int = 0
    interrupted: bool = False


@dataclass(frozen=True)
class Image:
    """One finished image: PNG bytes (parameters chunk inside) and its parameters."""

    png: bytes
    params: dict[str, Any]


class Front:
    """Key check, routing and shared helpers of the client-API adapters."""

    def __init__(self, config: FrontConfig, generate: GenerateFn, health: HealthFn) -> None:
        self.config = config
        self.models = list(config.models)
        self.limits = config.limits
        self._generate = generate
        self._health = health
        self.metrics = Metrics()
        self.current = self.models[0]  # the WebUI's sd_model_checkpoint
        self.jobs: dict[int, ImageJob] = {}
        self._ids = itertools.count()

    # ---- routing --------------------------------------------------------------------------
    async def route(self, request: Request) -> Reply | None:
        """The reply for a client-API route, a 401, or None (``/generate``, ``/health`` and
        unknown paths stay with the ingress). A bug is logged and answered 500, one line."""
        try:
            return await self._route(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("client API request failed")
            return error_reply(500, "internal error while answering this request")

    async def _route(self, request: Request) -> Reply | None:
        path = request.url.path.rstrip("/") or "/"
        if path not in OPEN_PATHS and not authorized(
            request.headers.get("authorization"), self.config.api_key
        ):
            headers = {"WWW-Authenticate": 'Bearer realm="trt-sd", Basic realm="trt-sd"'}
            if path.startswith("/v1/"):
                from .openai_images import openai_error

                return openai_error(401, UNAUTHORIZED, code="invalid_api_key", **headers)
            return error_reply(401, UNAUTHORIZED, **headers)
        if path.startswith("/sdapi/v1/"):
            from . import a1111

            return await a1111.handle(self, request, path)
        if path.startswith("/v1/"):
            from . import openai_images

            return await openai_images.handle(self, request, path)
        if path == "/metrics":
            if request.method not in ("GET", "HEAD"):
                return error_reply(405, "/metrics takes GET", Allow="GET")
            return await self.metrics_reply()
        return None

    def check_generate(self, body: bytes, model: str | None) -> Reply | None:
        """The per-request limits for ``POST /generate`` (400 naming the one exceeded), or
        None; a body that is not a JSON object is left to the replica's own message."""
        entry = self.model(model) or self.models[0]
        try:
            data = json.loads(body or b"{}")
        except (ValueError, RecursionError):
            return None
        if not isinstance(data, dict):
            return None

        def integer(key: str, default: int) -> int:
            value = data.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else default

        try:
            self.limits.check(
                1,
                integer("steps", 0) or None,
                integer("width", entry.default_width),
                integer("height", entry.default_height),
                [data.get("prompt"), data.get("negative_prompt")],
            )
        except InputError as e:
            return error_reply(400, str(e))
        return None

    def model(self, name: str | None) -> ModelEntry | None:
        return find_model(self.models, name)

    async def read_body(self, request: Request) -> bytes:
        """The body, refused (TooLargeError) past ``max_body_bytes`` without buffering it."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise TooLargeError(f"request body is {declared} bytes; at most {limit} allowed")
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLargeError(f"request body is over {limit} bytes; at most {limit} allowed")
            parts.append(chunk)
        return b"".join(parts)

    async def read_json(self, request: Request) -> dict[str, Any]:
        return parse_json_object(await self.read_body(request))

    # ---- images ---------------------------------------------------------------------------
    async def images(
        self, model: ModelEntry, requests: list[dict[str, Any]]
    ) -> tuple[list[Image], Reply | None, bool]:
        """Generate one image per engine request, concurrently: (images in order, the first
        error reply if any failed, whether /interrupt stopped it)."""
        job = ImageJob(total=len(requests), started=time.monotonic())
        job_id = next(self._ids)
        self.jobs[job_id] = job

        async def one(kwargs: dict[str, Any]) -> Reply:
            reply = await self._generate(model.name, kwargs)
            job.done += 1
            return reply

        job.tasks = [asyncio.ensure_future(one(kw)) for kw in requests]
        try:
            results = await asyncio.gather(*job.tasks, return_exceptions=True)
        finally:
            for task in job.tasks:
                task.cancel()
            del self.jobs[job_id]
        images: list[Image] = []
        error: Reply | None = None
        for result in results:
            if isinstance(result, asyncio.CancelledError):
                continue  # interrupted
            if isinstance(result, BaseException):
                raise result
            if result.status != 200:
                error = error or result
                continue
            params = json.loads(result.headers.get(PARAMS_HEADER, "{}"))
            images.append(Image(result.body, params))
        return images, error, job.interrupted

    def interrupt(self) -> int:
        """Stop every adapter request in flight (their finished images are still returned)."""
        stopped = 0
        for job in list(self.jobs.values()):
            job.interrupted = True
            for task in job.tasks:
                if not task.done():
                    task.cancel()
                    stopped += 1
        return stopped

    def progress(self) -> dict[str, Any]:
        """Finished / requested images over the requests in flight, and a linear ETA."""
        jobs = list(self.jobs.values())
        total = sum(j.total for j in jobs)
        done = sum(j.done for j in jobs)
        fraction = done / total if total else 0.0
        elapsed = max((time.monotonic() - j.started for j in jobs), default=0.0)
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        return {"jobs": len(jobs), "images": total, "done": done, "progress": fraction, "eta": eta}

    # ---- /metrics -------------------------------------------------------------------------
    async def metrics_reply(self) -> Reply:
        async def probe(name: str) -> dict[str, Any] | None:
            try:
                reply = await asyncio.wait_for(self._health(name), 10.0)
                return dict(reply.json)
            except Exception:
                return None

        statuses = await asyncio.gather(*(probe(m.name) for m in self.models))
        text = self.metrics.render(dict(zip((m.name for m in self.models), statuses, strict=True)))
        return Reply(200, text.encode(), CONTENT_TYPE)


class Blob:
    """Bytes to appear base64-encoded in a JSON answer (see :func:`json_with_blobs`)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def json_with_blobs(payload: Any) -> Reply:
    """200 JSON where each :class:`Blob` becomes a base64 string, spliced in as bytes:
    ``json.dumps`` of a megabyte string costs ~10x the base64 encoding itself."""
    blobs: list[Blob] = []
    nonce = secrets.token_hex(8)  # client text cannot forge a marker

    def mark(obj: Any) -> str:
        if not isinstance(obj, Blob):
            raise TypeError(f"{type(obj).__name__} is not JSON serializable")
        blobs.append(obj)
        return f"\x00{nonce}{len(blobs) - 1}\x00"

    text = json.dumps(payload, ensure_ascii=False, default=mark).encode()
    parts: list[bytes] = []
    for i, blob in enumerate(blobs):
        marker = f'"\\u0000{nonce}{i}\\u0000"'.encode()
        head, _, text = text.partition(marker)
        parts += [head, b'"', base64.b64encode(blob.data), b'"']
    parts.append(text)
    return Reply(200, b"".join(parts), JSON_TYPE)


def json_ok(payload: Any) -> Reply:
    if isinstance(payload, dict):
        return json_reply(200, payload)
    return Reply(200, json.dumps(payload, ensure_ascii=False).encode(), JSON_TYPE)
