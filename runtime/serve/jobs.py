"""The data the batching engine keeps per request, its errors and counters, and small helpers.

Kept apart from :mod:`.engine` (the scheduler) so the request-state layout can be read on its
own: one :class:`Job` per request, its sampler state explicit, nothing shared between jobs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trt_sd.models.descriptors import CONTEXT
from trt_sd.models.errors import InputError, TrtSdError
from trt_sd.models.families import PromptRows
from trt_sd.runtime.call_inputs import call_params
from trt_sd.runtime.call_inputs import start_latents as start_latents_of
from trt_sd.runtime.request import Request

DEFAULT_MAX_QUEUE = 64
DEFAULT_TIMEOUT_S = 120.0


class QueueFullError(TrtSdError):
    """The waiting queue is full: the service is overloaded (HTTP 429)."""


class RequestTimeoutError(TrtSdError):
    """A request passed its deadline before its image was ready (HTTP 504)."""


class EngineStoppedError(TrtSdError):
    """The engine was closed or its scheduler thread stopped (HTTP 503)."""


@dataclass(frozen=True)
class Generated:
    """One finished request."""

    image: np.ndarray  # HxWx3 uint8 RGB
    params: dict[str, Any]  # as Pipeline results report them (and PNGs embed them)
    unet_calls: int
    seconds: float  # submit -> image


@dataclass(eq=False)
class Job:
    """One request's explicit state between UNet calls."""

    req: Request
    stepper: Any
    future: Future[Generated]
    deadline: float
    submitted: float
    seq: int
    x: np.ndarray | None = None  # current latents (1, C, h, w); None until admitted
    #: UNet conditioning (input name -> [uncond, cond] rows, or [cond] without CFG)
    embeddings: dict[str, np.ndarray] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # resolved family options
    step: int = 0
    turn: int = 0  # scheduler turn of its last UNet call (fairness across sizes)
    cancelled: bool = False
    init: np.ndarray | None = None  # img2img: the init image (1, 3, H, W) in [-1, 1]
    inpaint: Any = None  # inpainting: its image and mask (trt_sd.runtime.inpaint.InpaintInput)
    control: Any = None  # ControlNet images / scales (trt_sd.runtime.controlnet.RequestControl)
    #: the pipeline (engine views) of its LoRA set, the set's identity and reported params
    pipe: Any = None
    lora_key: tuple = ()
    lora_params: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return 2 if self.req.cfg else 1

    @property
    def size(self) -> tuple[int, int]:
        return self.req.height, self.req.width

    @property
    def done(self) -> bool:
        return self.step >= self.stepper.num_model_calls

    def prompt_rows(self) -> PromptRows:
        """Its text-encoder rows (negative first with CFG)."""
        req = self.req
        return PromptRows.for_request(
            req.prompts, req.negative_prompts, req.cfg, self.size, self.options, req.guidance
        )

    @property
    def unet_key(self) -> tuple[tuple[int, int], int, tuple]:
        """What must match for rows to share a UNet call: image size, context length (long
        prompts make 154, 231, ... tokens; after text encoding) and LoRA set."""
        return self.size, int(np.shape((self.embeddings or {})[CONTEXT])[1]), self.lora_key


class Ticket:
    """Handle of a submitted request: its future, and a way to give it up."""

    def __init__(self, job: Job, engine: Any) -> None:
        self._job = job
        self._engine = engine
        self.future = job.future
        self.seed = job.req.seed

    def cancel(self) -> None:
        """Drop the request (the caller went away); its rows leave the next UNet call."""
        self._engine._cancel(self._job)


@dataclass
class EngineStats:
    """Counters for /health and the benchmark."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    timed_out: int = 0
    unet_calls: int = 0
    unet_rows: int = 0
    max_rows: int = 0
    rows_per_call: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["rows_per_call"] = {str(k): v for k, v in sorted(self.rows_per_call.items())}
        d["mean_rows"] = round(self.unet_rows / self.unet_calls, 3) if self.unet_calls else 0.0
        return d


def check_limits(max_queue: int, timeout_s: float) -> None:
    """InputError unless the queue bound and the deadline make sense."""
    if max_queue < 0:
        raise InputError(f"max-queue must be >= 0, got {max_queue}")
    if not timeout_s > 0:
        raise InputError(f"timeout must be positive, got {timeout_s}")


def start_latents(pipe: Any, job: Job, noise: np.ndarray) -> None:
    """A newly encoded job's initial latents, as ``Pipeline.__call__`` starts them
    (:func:`~trt_sd.runtime.call_inputs.start_latents`); inpainting's mask rows join the job's
    conditioning, so they travel with its rows in every UNet batch. The init image is
    dropped once encoded."""
    x, job.stepper, extra = start_latents_of(
        pipe, job.req, job.stepper, noise, job.init, job.inpaint, {}
    )
    job.embeddings, job.x, job.init = {**(job.embeddings or {}), **extra}, x, None


def job_params(pipe: Any, job: Job) -> dict[str, Any]:
    """What a finished job's result reports (and its PNG embeds)."""
    return call_params(pipe, job.req, job.options, job.control, job.inpaint, job.lora_params)


def fail_job(job: Job, error: BaseException) -> None:
    job.x = job.embeddings = None
    try:
        if not job.future.done():
            job.future.set_exception(error)
    except InvalidStateError:  # the caller cancelled it meanwhile
        pass


def timeout_message(timeout_s: float, job: Job) -> str:
    where = (
        f"at step {job.step} of {job.stepper.num_model_calls}"
        if job.x is not None
        else ("before it could start")
    )
    return f"request timed out after {timeout_s:g} s ({where}); the server is overloaded"


def chunks(
    jobs: list[Job], rows_of: Callable[[Job], int], max_rows: int, max_jobs: int
) -> Iterator[list[Job]]:
    """Consecutive groups of ``jobs`` with at most ``max_rows`` rows and ``max_jobs`` jobs."""
    chunk: list[Job] = []
    rows = 0
    for job in jobs:
        if chunk and (rows + rows_of(job) > max_rows or len(chunk) >= max_jobs):
            yield chunk
            chunk, rows = [], 0
        chunk.append(job)
        rows += rows_of(job)
    if chunk:
        yield chunk
