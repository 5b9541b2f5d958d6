"""Continuous batching: many requests share each UNet call, each at its own step.

One scheduler thread owns the engines. Each turn of its loop it

1. admits waiting requests while fewer than ``max_batch`` are active, and text-encodes the
   new ones (the prompt rows of those with the same emphasis mode and context length in one
   text-encoder call: encoding pads every row to the longest, so a short prompt is never
   padded because a long one came with it);
2. builds one UNet batch from the active requests of one image size and one context length
   (long prompts are 154, 231, ... tokens; the UNet takes one length per call) - a request's
   ``[uncond, cond]`` rows (or its single row without CFG), each row with the timestep of
   that request's own sampler step (the UNet takes one timestep per row);
3. splits the output per request, applies its guidance and advances its own stepper (the
   feeds, checks, guidance and step are :class:`trt_sd.runtime.denoise.DenoiseStep`, the
   code ``Pipeline`` runs);
4. retires finished requests: VAE decode (same-size requests in one call) and hands the
   image to the waiting caller.

So a request arriving while others run joins the very next UNet call instead of waiting for
them to finish, and a request's image is the one ``Pipeline.__call__`` makes for the same
arguments: the same stepper, noise streams and arithmetic per request, only the batch size
of the engine calls differs (float rounding, within 1/255 per pixel).

Every request has a deadline; one that passes it - waiting or mid-denoise - fails with
:class:`RequestTimeoutError` and frees its rows. The waiting queue is bounded
(:class:`QueueFullError`) so overload is refused at once instead of growing latency without
limit.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

import numpy as np

from trt_sd.models.descriptors import UNET, VAE_DECODER
from trt_sd.models.errors import InputError, TrtSdError
from trt_sd.runtime.call_inputs import prepare_call
from trt_sd.runtime.denoise import Lane, split_rows
from trt_sd.runtime.inpaint import inpaint_strength
from trt_sd.runtime.lora import apply_loras, lora_params
from trt_sd.runtime.noise import initial_noise
from trt_sd.runtime.pipeline import Pipeline, resolve_sampler
from trt_sd.runtime.request import DEFAULT_SAMPLER

from .jobs import (
    DEFAULT_MAX_QUEUE,
    DEFAULT_TIMEOUT_S,
    EngineStats,
    EngineStoppedError,
    Generated,
    Job,
    QueueFullError,
    RequestTimeoutError,
    Ticket,
    check_limits,
    chunks,
    fail_job,
    job_params,
    start_latents,
    timeout_message,
)
from .lora_requests import lora_dir, request_loras

__all__ = [
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_TIMEOUT_S",
    "BatchingEngine",
    "EngineStoppedError",
    "Generated",
    "QueueFullError",
    "RequestTimeoutError",
    "Ticket",
    "check_limits",
]

log = logging.getLogger(__name__)


class BatchingEngine:
    """Continuous batching over one :class:`Pipeline` (see the module docstring).

    ``max_batch``: requests per UNet call (a CFG request is two rows); default and maximum:
    the image batch the UNet engine was built for. ``max_queue``: requests allowed to wait
    for a slot. ``timeout_s``: deadline of each request, from submission.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        max_batch: int | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.pipe = pipeline
        unet_range = pipeline.manifest.components[UNET].shape_range
        self.max_rows = unet_range.axis("unet_batch").max
        first_text = pipeline.family.text_encoders[0].component
        self._text_rows = pipeline.manifest.components[first_text].shape_range.axis("unet_batch")
        self._vae_batch = pipeline.manifest.components[VAE_DECODER].shape_range.batch.max
        built = unet_range.batch.max
        if max_batch is None:
            max_batch = built
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max-batch must be a positive integer, got {max_batch!r}")
        if max_batch > built:
            raise InputError(
                f"max-batch {max_batch} is more than the UNet engine was built for "
                f"({unet_range.batch}); re-export with a wider --batch"
            )
        check_limits(max_queue, timeout_s)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.timeout_s = float(timeout_s)
        self.stats = EngineStats()
        self._step = pipeline.denoise_step
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._turn = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="trt-sd-batching", daemon=True)
        self._thread.start()

    # ---- the caller's side ----------------------------------------------------------------
    def submit(
        self,
        prompt: str | None = None,
        negative_prompt: str = "",
        sampler: str = DEFAULT_SAMPLER,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        karras: bool | None = None,
        eta: float | None = None,
        guidance_rescale: float = 0.0,
        image: Any = None,
        strength: float | None = None,
        emphasis: str = "original",
        mask: Any = None,
        mask_blur: float = 0.0,
        control_image: Any = None,
        controlnet_scale: Any = 1.0,
        control_start: Any = 0.0,
        control_end: Any = 1.0,
        loras: Any = None,
        **options: Any,
    ) -> Ticket:
        """Validate a request (the rules and messages of ``trt-sd run``: InputError) and queue
        it; QueueFullError when the queue is full, EngineStoppedError after :meth:`close`.
        ``image`` (PIL image or uint8 array) + ``strength``: img2img, as ``Pipeline.__call__``.
        ``emphasis``: how the prompt's ``(word:1.3)`` weight it, as ``Pipeline.__call__``;
        ``mask`` / ``mask_blur`` with ``image``: inpainting, as ``Pipeline.__call__``.
        ``options``: the model family's own (as ``Pipeline.__call__`` takes them).
        ``control_image`` / ``controlnet_scale`` / ``control_start`` / ``control_end``: as
        ``Pipeline.__call__``; they travel with the request's rows (per-row scales).
        ``loras`` / ``<lora:name:w>`` in the prompt: LoRAs from the server's folder
        (:mod:`.lora_requests`); requests with different sets never share a UNet call."""
        prompt, lora_specs = request_loras(prompt, loras, lora_dir())
        view, lora_set = apply_loras(self.pipe, lora_specs)  # bad files: InputError, nothing queued
        strength = inpaint_strength(self.pipe.manifest.dims, image, mask, strength, None, mask_blur)
        call = prepare_call(
            self.pipe,
            resolve_sampler,
            height=height,
            width=width,
            image=image,
            mask=mask,
            mask_blur=mask_blur,
            control_image=control_image,
            controlnet_scale=controlnet_scale,
            control_start=control_start,
            control_end=control_end,
            options=options,
            prompt=prompt,
            negative_prompt=negative_prompt,
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            guidance_rescale=guidance_rescale,
            seed=seed,
            batch=1,
            strength=strength,
            karras=karras,
            eta=eta,
            sampler_options={},
            emphasis=emphasis,
        )
        req = call.req
        stepper = self.pipe.make_stepper(req)  # sampler-specific errors surface here, too
        now = time.monotonic()
        job = Job(req, stepper, Future(), now + self.timeout_s, now, next(self._seq))
        job.options, job.control = call.options, call.control
        job.init, job.inpaint = call.init_image, call.inpaint
        job.pipe, job.lora_key, job.lora_params = view, lora_set.key, lora_params(lora_set)
        with self._cond:
            if self._stopped or not self._thread.is_alive():
                raise EngineStoppedError("the generation engine is stopped")
            free_slots = max(0, self.max_batch - len(self._active))
            if len(self._waiting) >= self.max_queue + free_slots:
                self.stats.rejected += 1
                raise QueueFullError(
                    f"server busy: {len(self._waiting)} requests already waiting; retry later"
                )
            self._waiting.append(job)
            self.stats.submitted += 1
            self._cond.notify()
        return Ticket(job, self)

    def generate(self, **kwargs: Any) -> Generated:
        """Submit and wait (blocking); for callers without an event loop."""
        return self.submit(**kwargs).future.result()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"active": len(self._active), "waiting": len(self._waiting)}

    def close(self, timeout: float = 10.0) -> None:
        """Stop the scheduler; requests still queued or running fail with EngineStoppedError."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _cancel(self, job: Job) -> None:
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    # ---- the scheduler thread -------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopped and not self._active and not self._waiting:
                        self._cond.wait()
                    if self._stopped:
                        break
                    self._drop_expired()
                    new = self._admit()
                if new:
                    self._start(new)
                if self._active:
                    self._unet_turn()
                    self._retire()
        except BaseException:  # keep going is impossible; fail everyone, let health report it
            log.exception("batching scheduler stopped")
            raise
        finally:
            with self._cond:
                self._stopped = True
                pending = [*self._waiting, *self._active]
                self._waiting.clear()
                self._active.clear()
            for job in pending:
                fail_job(job, EngineStoppedError("the generation engine stopped"))

    def _drop_expired(self) -> None:
        """(Lock held.) Fail requests past their deadline; forget cancelled ones."""
        now = time.monotonic()
        for queue in (self._waiting, self._active):
            for job in [j for j in queue if j.cancelled or now > j.deadline]:
                queue.remove(job)
                if not job.cancelled:
                    self.stats.timed_out += 1
                    fail_job(job, RequestTimeoutError(timeout_message(self.timeout_s, job)))

    def _admit(self) -> list[Job]:
        """(Lock held.) Move waiting requests into free slots, oldest first."""
        new = []
        while self._waiting and len(self._active) < self.max_batch:
            job = self._waiting.popleft()
            if job.future.set_running_or_notify_cancel():
                new.append(job)
                self._active.append(job)  # holds its slot; _start gives it latents
        return new

    def _start(self, jobs: list[Job]) -> None:
        """Text-encode new requests (rows of one emphasis mode and context length together)
        and draw their initial latents."""
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            emphasis = job.req.emphasis
            try:
                length = self.pipe.text.sequence_length(job.prompt_rows().texts, emphasis)
            except Exception as e:
                self._failed(job, e)
                continue
            groups.setdefault((emphasis, length, job.lora_key), []).append(job)
        for (emphasis, *_), group in groups.items():
            self._encode(group, emphasis)

    def _encode(self, jobs: list[Job], emphasis: str) -> None:
        """Encode ``jobs`` (same context length) in calls of the text encoder's batch."""
        dims = self.pipe.manifest.dims
        rows_limit = self._text_rows.max
        for chunk in chunks(jobs, lambda j: j.rows, rows_limit, len(jobs)):
            rows = [j.prompt_rows() for j in chunk]
            try:
                conditioning = chunk[0].pipe.encode_conditioning(
                    sum(rows[1:], rows[0]), emphasis=emphasis
                )
            except Exception as e:
                if len(chunk) > 1:  # isolate: a failure fails only its own request
                    for job in chunk:
                        self._encode([job], emphasis)
                else:
                    self._failed(chunk[0], e)
                continue
            parts = split_rows(conditioning, [j.rows for j in chunk])
            for job, part in zip(chunk, parts, strict=True):
                job.embeddings = part
                shape = (
                    dims.latent_channels,
                    job.req.height // dims.vae_scale_factor,
                    job.req.width // dims.vae_scale_factor,
                )
                try:
                    start_latents(self.pipe, job, initial_noise(job.req.seeds, shape))
                except Exception as e:
                    self._failed(job, e)

    def _unet_turn(self) -> None:
        """One UNet call for the active requests of one image size and context length (those
        of the request that has waited longest for a call), each row at its own timestep."""
        with self._cond:
            ready = [j for j in self._active if j.x is not None and not j.cancelled]
        order = sorted(ready, key=lambda j: (j.turn, j.seq))
        if not order:
            return
        key = order[0].unet_key
        same = [j for j in order if j.unet_key == key]
        batch = next(chunks(same, lambda j: j.rows, self.max_rows, self.max_batch))
        self._turn += 1
        lanes = []
        for job in batch:
            job.turn = self._turn
            x_in = np.asarray(job.stepper.scale_model_input(job.x, job.step), dtype=np.float32)
            t = job.stepper.timesteps[job.step]
            ctl = job.control.at(job.step, job.stepper.num_model_calls) if job.control else None
            lanes.append(Lane(x_in, t, job.req.cfg, job.embeddings or {}, ctl))
        rows = sum(lane.rows for lane in lanes)
        try:
            outputs = batch[0].pipe.engines[UNET].run(self._step.feeds(lanes))
            out = np.asarray(outputs[self._step.output_name], dtype=np.float32)
        except Exception as e:
            for job in batch:
                self._failed(job, e)
            return
        self.stats.unet_calls += 1
        self.stats.unet_rows += rows
        self.stats.max_rows = max(self.stats.max_rows, rows)
        self.stats.rows_per_call[rows] = self.stats.rows_per_call.get(rows, 0) + 1
        offset = 0
        for job in batch:
            part = out[offset : offset + job.rows]
            offset += job.rows
            try:
                self._advance(job, part)
            except Exception as e:
                self._failed(job, e)

    def _advance(self, job: Job, out: np.ndarray) -> None:
        """Checks, CFG and one sampler step for one request (:class:`DenoiseStep`, as in
        ``sampling_loop.denoise``); a failure fails this request alone: NaN latents would fail
        its whole VAE batch at decode."""
        step = self._step
        total = job.stepper.num_model_calls
        if np.isfinite(out).all():
            out = step.output({step.output_name: out}, job.step, total)
        else:  # the hint tells a diverging run from a broken engine by the model input
            sample = job.stepper.scale_model_input(job.x, job.step)
            out = step.output({step.output_name: out}, job.step, total, sample)
        job.x = step.advance(job.req, job.stepper, job.step, job.x, out)
        job.step += 1

    def _retire(self) -> None:
        """Decode finished requests (same size together) and deliver their images."""
        with self._cond:
            finished = [j for j in self._active if j.x is not None and j.done]
            for job in finished:
                self._active.remove(job)
        sizes = dict.fromkeys(j.size for j in finished)
        for size in sizes:
            group = [j for j in finished if j.size == size and not j.cancelled]
            for chunk in chunks(group, lambda j: 1, self._vae_batch, self._vae_batch):
                try:
                    images = self.pipe.decode(np.concatenate([j.x for j in chunk]))
                except Exception as e:
                    for job in chunk:
                        self._failed(job, e)
                    continue
                for job, image in zip(chunk, images, strict=True):
                    result = Generated(
                        image,
                        job_params(self.pipe, job),
                        job.stepper.num_model_calls,
                        time.monotonic() - job.submitted,
                    )
                    job.x = job.embeddings = None
                    if not job.future.done():
                        job.future.set_result(result)
                        self.stats.completed += 1

    def _failed(self, job: Job, error: BaseException) -> None:
        with self._cond:
            if job in self._active:
                self._active.remove(job)
        if not isinstance(error, TrtSdError | ValueError):
            log.error("request failed", exc_info=error)
        self.stats.failed += 1
        fail_job(job, error)
