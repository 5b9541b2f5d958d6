"""The HTTP face of a generation replica, independent of the server that carries it.

:class:`Generator` owns a :class:`Pipeline` and its :class:`BatchingEngine` and turns request
bodies into :class:`Reply` objects (status, content type, bytes): ``image/png`` with the
parameters embedded exactly as ``trt-sd run`` writes them, or a one-line JSON error. Ray Serve
(:mod:`trt_sd.runtime.serve.app`) only moves bytes to and from it, so everything a client can
see is testable without Ray.

Status codes: 400 invalid request (the message ``trt-sd run`` prints for the same value),
429 queue full, 500 a generation error, 503 stopped or failed replica, 504 past the deadline.
No traceback ever reaches a client; unexpected errors are logged on the server.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import resource
from dataclasses import dataclass, field
from typing import Any

from trt_sd.models.errors import InputError, TrtSdError

from .engine import (
    DEFAULT_MAX_QUEUE,
    DEFAULT_TIMEOUT_S,
    BatchingEngine,
    EngineStoppedError,
    Generated,
    QueueFullError,
    RequestTimeoutError,
)

log = logging.getLogger(__name__)

#: JSON fields of ``POST /generate`` (all optional; unset ones come from the manifest).
FIELDS = (
    "prompt",
    "negative_prompt",
    "sampler",
    "steps",
    "guidance",
    "seed",
    "height",
    "width",
    "karras",
    "eta",
    "guidance_rescale",
    "image",  # img2img: the init image, base64 (PNG / JPEG / WebP), a data: URL allowed
    "strength",
    "mask",  # inpainting: the mask for ``image``, base64 like it (white = repaint)
    "mask_blur",  # pixels (0-64)
    "emphasis",  # how (word:1.3) weights the prompt: original, no_norm, ignore, none
    "loras",  # [{"name": ..., "scale": ...}] from --lora-dir (also <lora:name:w> in prompts)
)
_STRING_FIELDS = ("prompt", "negative_prompt", "sampler", "emphasis")
SEED_HEADER = "X-Seed"
PARAMS_HEADER = "X-Params"
JSON_TYPE = "application/json"
#: a request is a few short fields; two maximal prompts, JSON-escaped, fit well inside this
MAX_BODY_BYTES = 256 * 1024


class PayloadTooLargeError(InputError):
    """The request body is larger than :data:`MAX_BODY_BYTES` (HTTP 413)."""


def too_large(size: int | None = None) -> PayloadTooLargeError:
    seen = f" ({size} bytes)" if size is not None else ""
    return PayloadTooLargeError(
        f"request body is too large{seen}; at most {MAX_BODY_BYTES} bytes are allowed"
    )


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, as plain data (it crosses process boundaries in Ray)."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def json_reply(status: int, payload: dict[str, Any], **headers: str) -> Reply:
    return Reply(status, json.dumps(payload, ensure_ascii=False).encode(), JSON_TYPE, headers)


def error_reply(status: int, message: str, **headers: str) -> Reply:
    """``{"error": "<one line>"}``."""
    line = " ".join(str(message).split()) or "error"
    return json_reply(status, {"error": line}, **headers)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A request body that must hold one JSON object (InputError otherwise). Infinity, NaN and
    1e400 parse to floats and get the field's own message later (the one `trt-sd run` prints
    for the same value); only bad syntax and the nesting depth are parse errors."""
    try:
        data = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise InputError("request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise InputError(f"request body must be a JSON object, got {type(data).__name__}")
    return data


def parse_generate_body(body: bytes) -> dict[str, Any]:
    """A JSON object with known fields -> engine keyword arguments (InputError otherwise).
    Values are checked by the same code as ``trt-sd run`` (:func:`build_request`)."""
    if len(body) > MAX_BODY_BYTES:
        raise too_large(len(body))
    data = parse_json_object(body)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r}; allowed: {', '.join(FIELDS)}")
    kwargs = {k: v for k, v in data.items() if v is not None}
    for name in _STRING_FIELDS:
        if name in kwargs and not isinstance(kwargs[name], str):
            raise InputError(f"{name} must be a string, got {kwargs[name]!r}")
    if "karras" in kwargs and not isinstance(kwargs["karras"], bool):
        raise InputError(f"karras must be true or false, got {kwargs['karras']!r}")
    return kwargs


def resident_memory_bytes() -> int:
    """This process's current resident set size (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Generator:
    """One replica: pipeline + batching engine + HTTP semantics. Server-agnostic."""

    def __init__(
        self,
        engine_dir: str | None = None,
        backend: str = "auto",
        max_batch: int | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        from trt_sd.runtime.cli import _version
        from trt_sd.runtime.pipeline import Pipeline

        self.pipe = Pipeline.load(engine_dir, backend=backend)
        self.engine = BatchingEngine(self.pipe, max_batch, max_queue, timeout_s)
        self.version = f"trt-sd {_version()}"

    async def generate(self, body: bytes) -> Reply:
        """``POST /generate``."""
        try:
            kwargs = parse_generate_body(body)
            for key in ("image", "mask"):
                if key in kwargs:
                    from .b64images import decode_image

                    kwargs[key] = await asyncio.to_thread(decode_image, kwargs[key], key)
        except (TrtSdError, ValueError) as e:
            return _error_for(e)
        except Exception:  # a bug, not the client's fault
            log.exception("request parsing failed")
            return error_reply(500, "internal error while reading the request")
        return await self.generate_kwargs(kwargs)

    async def generate_kwargs(self, kwargs: dict[str, Any], with_params: bool = False) -> Reply:
        """One image from engine keyword arguments (the client-API adapters in the ingress call
        this: no JSON round trip, an init image travels as a decoded array). ``with_params``
        adds the result's parameters as JSON in an ``X-Params`` header (the adapters build the
        WebUI ``info`` from it and strip it)."""
        try:
            ticket = self.engine.submit(**kwargs)
        except (TrtSdError, ValueError) as e:
            return _error_for(e)
        except Exception:  # a bug, not the client's fault; never a "retry" 503 from the ingress
            log.exception("request validation failed")
            return error_reply(500, "internal error while reading the request")
        try:
            # the engine enforces the deadline; this bound only guards against a stuck engine
            result = await asyncio.wait_for(
                asyncio.wrap_future(ticket.future), self.engine.timeout_s + 30.0
            )
        except asyncio.CancelledError:  # the client went away: free the request's rows
            ticket.cancel()
            raise
        except asyncio.TimeoutError:
            ticket.cancel()
            return error_reply(504, f"request timed out after {self.engine.timeout_s:g} s")
        except (TrtSdError, ValueError) as e:
            return _error_for(e)
        except Exception:
            log.exception("generation failed")
            return error_reply(500, "internal error while generating the image")
        png = await asyncio.get_running_loop().run_in_executor(None, self._png, result)
        headers = {SEED_HEADER: str(result.params["seed"])}
        if with_params:
            headers[PARAMS_HEADER] = json.dumps(result.params, default=str)
        return Reply(200, png, "image/png", headers)

    def _png(self, result: Generated) -> bytes:
        from trt_sd.runtime.infotext import format_infotext, save_png

        buffer = io.BytesIO()
        save_png(buffer, result.image, format_infotext(result.params, 0, self.version))
        return buffer.getvalue()

    def health(self) -> Reply:
        """``GET /health``: 200 with load figures while the scheduler runs, else 503."""
        status = self.status()
        return json_reply(200 if status["status"] == "ok" else 503, status)

    def status(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.engine.alive else "stopped",
            "model": self.pipe.manifest.model.get("name", ""),
            "backend": self.pipe.backend,
            "max_batch": self.engine.max_batch,
            **self.engine.load(),
            "stats": self.engine.stats.to_dict(),
            "pid": os.getpid(),
            "rss_bytes": resident_memory_bytes(),
        }

    def close(self) -> None:
        self.engine.close()


def _error_for(error: BaseException) -> Reply:
    if isinstance(error, PayloadTooLargeError):
        return error_reply(413, str(error))
    if isinstance(error, QueueFullError):
        return error_reply(429, str(error), **{"Retry-After": "1"})
    if isinstance(error, RequestTimeoutError):
        return error_reply(504, str(error))
    if isinstance(error, EngineStoppedError):
        return error_reply(503, str(error))
    if isinstance(error, InputError | ValueError):
        return error_reply(400, str(error))
    return error_reply(500, str(error))
