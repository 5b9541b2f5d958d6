"""A partitioned UNet on several devices: stage k on device k, micro-batches pipelined.

An engine directory exported with ``trt-sd export --split-unet N`` holds the UNet as N stage
engines (manifest ``unet_partition``). :class:`StagedUNet` loads stage k on the k-th listed
device and gives each device a worker thread with a queue. A UNet call is split into
micro-batches (rows of the batch: images, CFG halves); a micro-batch leaves stage k for the
queue of stage k+1's device, so while device 1 runs stage 2 of one micro-batch, device 0
already runs stage 1 of the next. Independent denoising chains (the images of a batch, see
:meth:`trt_sd.runtime.pipeline.Pipeline.__call__`, or concurrent requests) keep every device
busy; one chain alone overlaps only its own micro-batches within each call.

Device specs (``--devices`` / ``devices=``):

* ``cuda:N`` (or just ``N``): GPU N, with the requested GPU backend (TensorRT, ONNX Runtime
  CUDA). Tensors that stay on one GPU stay in device memory; tensors crossing GPUs go through
  the host, each copy on the stream of the backend that owns the memory (download by the
  producer, upload by the consumer);
* ``cpu``: an ONNX Runtime CPU session with one intra-op thread, run by its own worker thread:
  one core's worth of work, which is how scaling is measured on machines without GPUs;
* ``cpu:N``: the same, with the worker thread pinned to CPU core N.

With fewer devices than stages, consecutive stages share a device (stage k runs on device
``k * devices // stages``); a device holding several stages serves later stages first, which
drains micro-batches already in flight.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
import weakref
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trt_sd.models.descriptors import UNET, Component
from trt_sd.models.errors import InputError, ManifestError
from trt_sd.models.manifest import ComponentEntry, Manifest
from trt_sd.models.unet_plans import UNetPartition

from .backends import EngineBackend, create_backend
from .backends.base import IOSpec
from .backends.hardware import cuda_device_count
from .backends.onnxruntime import OnnxRuntimeBackend, import_onnxruntime, session_options


@dataclass(frozen=True)
class Device:
    """One place a stage runs: ``cuda`` GPU ``index``, or a ``cpu`` thread (``index``: the
    core it is pinned to, None for unpinned)."""

    kind: str
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_devices(value: str | int | Sequence[str | int] | None) -> list[Device] | None:
    """``"cuda:0,cuda:1"``, ``"cpu,cpu"``, ``[0, 1]``, ``"cpu:0,cpu:1"`` -> devices (None
    stays None). Only the syntax is checked here; :func:`check_devices` checks existence."""
    if value is None:
        return None
    items: list[str | int]
    if isinstance(value, bool):
        raise InputError(f"devices must be a device list such as cuda:0,cuda:1, got {value!r}")
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, int):
        items = [value]
    else:
        items = list(value)
    if not items:
        raise InputError("devices is empty; list devices such as cuda:0,cuda:1 or cpu,cpu")
    return [_parse_device(item) for item in items]


def _parse_device(item: str | int) -> Device:
    if isinstance(item, int) and not isinstance(item, bool):
        if item < 0:
            raise InputError(f"device ids must be >= 0, got {item}")
        return Device("cuda", item)
    text = str(item).strip().lower()
    kind, _, index = text.partition(":")
    if text.isdigit():
        return Device("cuda", int(text))
    if kind in ("cpu", "cuda") and (not index or index.isdigit()):
        if kind == "cuda":
            return Device("cuda", int(index or 0))
        return Device("cpu", int(index) if index else None)
    raise InputError(f"device {item!r} is not one of: cuda:N, N, cpu, cpu:N")


def check_devices(devices: Sequence[Device]) -> None:
    """Every listed device exists on this machine (GPUs via the driver, cores via affinity)."""
    gpus = None
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    for device in devices:
        if device.kind == "cuda":
            gpus = cuda_device_count() if gpus is None else gpus
            if device.index is not None and device.index >= gpus:
                raise InputError(
                    f"device {device} does not exist; this machine has {gpus} GPU(s)"
                    + (" (use cpu,cpu to run stages on CPU threads)" if gpus == 0 else "")
                )
        elif device.index is not None and cores is not None and device.index not in cores:
            raise InputError(
                f"device {device} does not exist; this process may use cores "
                f"{', '.join(map(str, cores))}"
            )


def check_stage_devices(stages: int, devices: Sequence[Device]) -> None:
    """At most one device per stage, and every device exists."""
    if len(devices) > stages:
        raise InputError(
            f"{len(devices)} devices listed but the engines have {stages} UNet stages; list "
            f"at most {stages} (or re-export with --split-unet {len(devices)})"
        )
    check_devices(devices)


def stage_devices(stages: int, devices: int) -> list[int]:
    """Device position of each stage: consecutive stages share a device when fewer."""
    return [k * devices // stages for k in range(stages)]


class OneThreadCpuBackend(OnnxRuntimeBackend):
    """An ONNX Runtime CPU session with one intra-op thread (the compute runs in the calling
    thread): a ``cpu`` device, one core's worth of work."""

    def __init__(self, path: Path, component: Component, entry: ComponentEntry) -> None:
        EngineBackend.__init__(self, component, entry)
        ort = import_onnxruntime()
        self._ort, self.device_id, self.kind = ort, None, "onnxruntime-cpu"
        options = session_options(ort)
        options.intra_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # ORT raises its own pybind exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ManifestError(
                f"engine file {path.name} (component {entry.name}) could not be loaded: {first}"
            ) from None
        self._output_names = [s.name for s in self.outputs]


@dataclass
class _Job:
    """One micro-batch on its way through the stages."""

    env: dict[str, Any]
    stage: int
    future: Future
    order: int


class StagedUNet:
    """The UNet of a partitioned engine directory, behind the engine-backend interface
    (``run(feeds) -> {model_output}``, ``inputs``, ``outputs``, ``kind``)."""

    def __init__(
        self,
        plan: UNetPartition,
        stages: Sequence[EngineBackend],
        devices: Sequence[Device] | None,
    ) -> None:
        self.plan = plan
        self.stages = list(stages)
        self.devices = list(devices) if devices else None
        self.components = [s.component for s in self.stages]
        base = plan.layout.base
        last = self.stages[-1]
        # The UNet's own inputs, with the dtypes the stage engines take them in.
        specs = {s.name: s for st in self.stages for s in st.inputs}
        self.inputs: tuple[IOSpec, ...] = tuple(specs[n] for n in base.input_names)
        self.outputs: tuple[IOSpec, ...] = tuple(last.outputs)
        kinds = sorted({s.kind for s in self.stages})
        where = ",".join(map(str, self.devices)) if self.devices else "one device"
        self.kind = f"{'+'.join(kinds)} x{len(self.stages)} stages on {where}"
        self.name = base.name
        self.component = base
        self.stage_seconds = [0.0] * len(self.stages)
        self._lock = threading.Lock()
        self._order = itertools.count()
        #: per-thread default micro-batch count (see :meth:`micro_batching`)
        self.local = threading.local()
        self._queues: list[queue.PriorityQueue] = []
        if self.devices:
            self._device_of = stage_devices(len(self.stages), len(self.devices))
            self._keep = self._device_resident_outputs()
            self._start_workers()

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        engine_dir: Path,
        manifest: Manifest,
        backend: str,
        devices: Sequence[Device] | None,
    ) -> StagedUNet:
        raw = manifest.unet_partition
        if not raw:
            raise ManifestError("this engine directory holds no partitioned UNet")
        base = manifest.family.components(manifest.dims)[UNET]
        plan = UNetPartition.from_dict(raw, manifest.dims, base)
        components = plan.components()
        if devices is not None:
            check_stage_devices(len(components), devices)
        backends = []
        for k, comp in enumerate(components):
            entry = manifest.components.get(comp.name)
            if entry is None:
                raise ManifestError(f"engine directory lacks UNet stage {comp.name}")
            device = devices[stage_devices(len(components), len(devices))[k]] if devices else None
            backends.append(_stage_backend(backend, engine_dir, comp, entry, device))
        return cls(plan, backends, devices)

    def _device_resident_outputs(self) -> list[tuple[str, ...]]:
        """Per stage: outputs every reader of which runs on the same GPU (kept on it)."""
        readers: dict[str, set[int]] = {}
        for k, comp in enumerate(self.components):
            for name in comp.input_names:
                readers.setdefault(name, set()).add(self._device_of[k])
        keep = []
        for k, comp in enumerate(self.components):
            device = self.devices[self._device_of[k]] if self.devices else None
            on_gpu = device is not None and device.kind == "cuda"
            keep.append(
                tuple(
                    n
                    for n in comp.output_names
                    if on_gpu and readers.get(n, {-1}) == {self._device_of[k]}
                )
            )
        return keep

    # ---- workers -------------------------------------------------------------------------------
    def _start_workers(self) -> None:
        assert self.devices is not None
        for position, device in enumerate(self.devices):
            q: queue.PriorityQueue = queue.PriorityQueue()
            self._queues.append(q)
            thread = threading.Thread(
                target=_worker,
                args=(weakref.proxy(self), q, device),
                name=f"trt-sd-unet-{device}-{position}",
                daemon=True,
            )
            thread.start()
        weakref.finalize(self, _stop, list(self._queues))

    def _submit(self, job: _Job) -> None:
        self._queues[self._device_of[job.stage]].put((-job.stage, job.order, job))

    def _run_stage(self, job: _Job) -> None:
        """Run one stage of one micro-batch, then pass it on (worker threads only)."""
        k = job.stage
        comp = self.components[k]
        t0 = time.perf_counter()
        keep = self._keep[k] if self.devices else ()
        out = self.stages[k].run({n: job.env[n] for n in comp.input_names}, keep_on_device=keep)
        seconds = time.perf_counter() - t0
        with self._lock:
            self.stage_seconds[k] += seconds
        job.env.update(out)
        if k + 1 < len(self.stages):
            job.stage = k + 1
            self._submit(job)
        else:
            job.future.set_result(out)

    # ---- the engine interface ------------------------------------------------------------------
    def run(
        self,
        feeds: Mapping[str, Any],
        keep_on_device: Collection[str] = (),
        micro_batches: int | None = None,
    ) -> dict[str, Any]:
        """One UNet call. Its rows are split into ``micro_batches`` (default: one per device,
        at most one per row) that flow through the stages concurrently."""
        del keep_on_device  # the model output always comes back to the host
        names = list(self.plan.layout.base.input_names)
        missing = [n for n in names if n not in feeds]
        if missing:
            raise InputError(f"unet: missing inputs {', '.join(missing)}")
        if not self.devices:
            env = dict(feeds)
            for k, backend in enumerate(self.stages):
                t0 = time.perf_counter()
                comp = self.components[k]
                env.update(backend.run({n: env[n] for n in comp.input_names}))
                with self._lock:
                    self.stage_seconds[k] += time.perf_counter() - t0
            return {n: env[n] for n in self.components[-1].output_names}
        rows = len(feeds[names[0]])
        wanted = micro_batches or getattr(self.local, "micro_batches", None) or len(self.devices)
        parts = max(1, min(rows, wanted))
        bounds = np.linspace(0, rows, parts + 1).astype(int)
        jobs = []
        for lo, hi in itertools.pairwise(bounds):
            env = {n: feeds[n][lo:hi] for n in names}
            job = _Job(env, 0, Future(), next(self._order))
            self._submit(job)
            jobs.append(job)
        results = [job.future.result() for job in jobs]
        return {
            n: np.concatenate([np.asarray(r[n]) for r in results])
            for n in self.components[-1].output_names
        }

    @contextmanager
    def micro_batching(self, parts: int) -> Iterator[None]:
        """Split this thread's UNet calls into ``parts`` micro-batches while inside."""
        previous = getattr(self.local, "micro_batches", None)
        self.local.micro_batches = parts
        try:
            yield
        finally:
            self.local.micro_batches = previous

    def to_host(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    @property
    def num_devices(self) -> int:
        return len(self.devices) if self.devices else 1

    def close(self) -> None:
        _stop(self._queues)


def _stage_backend(
    backend: str, engine_dir: Path, comp: Component, entry: ComponentEntry, device: Device | None
) -> EngineBackend:
    if device is None:
        return create_backend(backend, engine_dir, comp, entry)
    if device.kind == "cuda":
        return create_backend(backend, engine_dir, comp, entry, device.index or 0)
    if backend not in ("auto", "onnxruntime", "onnxruntime-cpu") or entry.backend != "onnxruntime":
        raise InputError(
            f"device {device} runs ONNX Runtime CPU sessions; {comp.name} is a "
            f"{entry.backend} engine and backend {backend!r} was asked"
        )
    return OneThreadCpuBackend(Path(engine_dir) / entry.file, comp, entry)


def _worker(unet: Any, jobs: queue.PriorityQueue, device: Device) -> None:
    """A device's loop: run whatever stage of whatever micro-batch is queued first."""
    if device.kind == "cpu" and device.index is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {device.index})  # this thread only (Linux: pid 0 = caller)
    while True:
        _, _, job = jobs.get()
        if job is None:
            return
        try:
            unet._run_stage(job)
        except ReferenceError:
            return
        except BaseException as e:  # handed to the waiting caller
            job.future.set_exception(e)


def _stop(queues: Sequence[queue.PriorityQueue]) -> None:
    for q in queues:
        q.put((1, -1, None))


@dataclass(frozen=True)
class Placement:
    """Where a pipeline's engines run: the GPU of the unsplit components (None: the
    backend's default) and the devices of the UNet stages (None: one after another)."""

    device_id: int | None
    stages: list[Device] | None


def place(manifest: Manifest, devices: str | int | Sequence[str | int] | None) -> Placement:
    """Check ``devices`` against the engine directory (see the module docstring)."""
    parsed = parse_devices(devices)
    if parsed is None:
        return Placement(None, None)
    if not manifest.unet_partition:
        if len(parsed) != 1:
            raise InputError(
                f"devices must be one GPU id for engines with an unsplit UNet, got {devices!r}; "
                "export with --split-unet N to run the UNet on N devices"
            )
        device = parsed[0]  # existence is checked by the backend, as for any GPU id
        return Placement(device.index if device.kind == "cuda" else None, None)
    check_stage_devices(len(manifest.unet_partition.get("stages") or ()), parsed)
    gpus = [d.index for d in parsed if d.kind == "cuda"]
    return Placement(gpus[0] if gpus else None, parsed)
