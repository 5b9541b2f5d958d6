"""The Ray Serve application: an HTTP ingress in front of generation replicas.

::

    HTTP ──> Ray Serve proxy ──> Ingress (routes, no GPU) ──handle──> Generator replica × N
                                                                     (Pipeline + BatchingEngine,
                                                                      1 GPU each on GPU nodes)

The ingress is a separate deployment so that a replica that dies mid-request (a crashed
process, a lost node) still yields a clean answer: the ingress catches the failed handle call
and returns a one-line JSON 503, which the client may retry while Ray restarts the replica.
Each replica batches the requests it holds (continuous batching); Ray Serve balances requests
across replicas and, with autoscaling, adds replicas when their queues fill.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from trt_sd.models.descriptors import UNET
from trt_sd.models.errors import InputError
from trt_sd.models.integrity import verify_components
from trt_sd.models.manifest import Manifest
from trt_sd.models.paths import default_engine_dir

from .catalog import ModelEntry, load_catalog
from .engine import DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT_S, check_limits
from .front import DEFAULT_LIMITS, Front, FrontConfig, Limits
from .replica import MAX_BODY_BYTES, Generator, PayloadTooLargeError, Reply, error_reply, too_large

log = logging.getLogger(__name__)

REPLICA_FAILED = "the generation replica failed while serving this request; retry it"
#: how much longer than the request timeout the ingress waits for a replica's answer
INGRESS_GRACE_S = 60.0


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``trt-sd serve`` configures (see :mod:`trt_sd.runtime.serve_cli`)."""

    engine_dir: str | None = None
    backend: str = "auto"
    replicas: int = 1
    max_batch: int | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    timeout_s: float = DEFAULT_TIMEOUT_S
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; None: fixed ``replicas``
    target_ongoing: float | None = None  # autoscaling target per replica (default max_batch)
    #: ``TRT_SD_ORT_CACHE`` for the replicas ("1" or a folder; None: this process's own)
    ort_cache: str | None = None
    # ---- client APIs (issue 16): more engine dirs, API key, per-request limits -------------
    #: further engine directories (or folders of them), each served as its own model
    more_engine_dirs: tuple[str, ...] = ()
    api_key: str | None = None
    limits: Limits = DEFAULT_LIMITS
    lora_dir: str | None = None  # LoRAs requests may name (serve/lora_requests.py)


class GeneratorDeployment(Generator):
    """A :class:`Generator` as a Ray Serve replica."""

    def check_health(self) -> None:
        """Called by Ray Serve periodically; raising makes Ray replace this replica."""
        if not self.engine.alive:
            raise RuntimeError("the batching scheduler has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(timeout=1.0)


class Ingress:
    """Routes ``POST /generate`` and ``GET /health`` to the generator replicas; the client
    APIs, the key check and ``/metrics`` go through :class:`~.front.Front` first."""

    def __init__(
        self,
        generator: DeploymentHandle,
        timeout_s: float,
        front: FrontConfig | None = None,
        others: dict[str, DeploymentHandle] | None = None,
    ) -> None:
        self.generator = generator
        self.timeout_s = timeout_s
        self.handles: dict[str, DeploymentHandle] = {}
        if front is not None:
            self.handles = {front.models[0].name: generator, **(others or {})}
            self.front: Front | None = Front(front, self._generate_on, self._health_of)
        else:
            self.front = None

    async def _generate_on(self, model: str, kwargs: dict[str, Any]) -> Reply:
        return await self._call("generate_kwargs", kwargs, True, handle=self.handles[model])

    async def _health_of(self, model: str) -> Reply:
        return await self._call("health", handle=self.handles[model])

    async def __call__(self, request: Request) -> Response:
        start = time.perf_counter()
        path = request.url.path.rstrip("/") or "/"
        reply = await self.front.route(request) if self.front is not None else None
        if reply is None:
            reply = await self._own_routes(request, path)
        if self.front is not None:
            self.front.metrics.observe(path, reply.status, time.perf_counter() - start)
        return Response(
            reply.body, reply.status, headers=reply.headers, media_type=reply.content_type
        )

    async def _own_routes(self, request: Request, path: str) -> Reply:
        routes = {"/generate": ("POST",), "/health": ("GET", "HEAD")}
        if path not in routes:
            reply = error_reply(404, f"no route {path}; use POST /generate or GET /health")
        elif request.method not in routes[path]:
            allowed = ", ".join(routes[path])
            reply = error_reply(405, f"{path} takes {allowed}", Allow=allowed)
        elif (name := self._model_name(request)) not in self.handles and name is not None:
            names = ", ".join(self.handles)
            reply = error_reply(404, f"no model {name!r}; models: {names}")
        elif path == "/generate":
            try:
                body = await read_body(request)
            except PayloadTooLargeError as e:
                reply = error_reply(413, str(e))
            else:
                limited = self.front.check_generate(body, name) if self.front else None
                handle = self.handles.get(name or "")
                reply = limited or await self._call("generate", body, handle=handle)
        else:
            reply = await self._call("health", handle=self.handles.get(name or ""))
        return reply

    def _model_name(self, request: Request) -> str | None:
        """``?model=NAME`` picks a model for /generate and /health (None: the first)."""
        name = request.query_params.get("model")
        if not name or self.front is None:
            return None
        model = self.front.model(name)
        return model.name if model is not None else name

    async def _call(self, method: str, *args: Any, handle: DeploymentHandle | None = None) -> Reply:
        response = getattr(handle or self.generator, method).remote(*args)

        async def answer() -> Reply:
            reply: Reply = await response
            return reply

        try:
            return await asyncio.wait_for(answer(), self.timeout_s + INGRESS_GRACE_S)
        except asyncio.TimeoutError:
            response.cancel()
            return error_reply(504, f"no answer from a generation replica in {self.timeout_s:g} s")
        except asyncio.CancelledError:  # the client disconnected
            response.cancel()
            raise
        except Exception as e:  # replica died / unreachable: Ray replaces it, the client retries
            log.warning("generation replica call failed: %s", type(e).__name__)
            return error_reply(503, REPLICA_FAILED, **{"Retry-After": "1"})


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused (413) as soon as it exceeds ``limit``: by its declared
    Content-Length before reading, else while streaming, so a huge body is never buffered."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def resolve_engines(options: ServeOptions) -> tuple[str, int]:
    """Validate the engine directory before any replica starts: (its absolute path, for
    replicas whose working directory differs; the batch limit, by default what the UNet
    engine was built for)."""
    path = (Path(options.engine_dir) if options.engine_dir else default_engine_dir()).resolve()
    manifest = Manifest.load(path)
    verify_components(path, manifest)  # refuse a modified directory before replicas start
    entry = manifest.components.get(UNET)
    if entry is None:
        raise InputError(f"{path} holds no single UNet engine; trt-sd serve needs one")
    built = entry.shape_range.batch.max
    max_batch = built if options.max_batch is None else options.max_batch
    if not 1 <= max_batch <= built:
        raise InputError(
            f"max-batch must be in 1..{built} (the UNet engine's batch range), got {max_batch}"
        )
    return str(path), max_batch


def replica_actor_options(options: ServeOptions) -> dict[str, Any]:
    """Ray actor options of a generation replica: its CPUs / GPUs and, when the optimised-graph
    cache is on, ``TRT_SD_ORT_CACHE`` in its environment (Ray workers on other machines do not
    inherit this process's), so a restarted or added replica loads in ~1/5 of the time."""
    from trt_sd.runtime.backends import ort_cache

    actor: dict[str, Any] = {
        "num_gpus": options.gpus_per_replica,
        "num_cpus": options.cpus_per_replica,
    }
    setting = options.ort_cache
    if setting is None:
        setting = os.environ.get(ort_cache.CACHE_ENV)
    env: dict[str, str] = {}
    if setting is not None:  # validated here, before Ray starts
        env[ort_cache.CACHE_ENV] = ort_cache.replica_setting(setting)
    if options.lora_dir is not None:
        from .lora_requests import LORA_DIR_ENV

        if not os.path.isdir(options.lora_dir):
            raise InputError(f"--lora-dir {options.lora_dir!r} is not a folder")
        env[LORA_DIR_ENV] = os.path.abspath(options.lora_dir)
    if env:
        actor["runtime_env"] = {"env_vars": env}
    return actor


def resolve_models(options: ServeOptions) -> tuple[ModelEntry, ...]:
    """Every served model: the first engine directory, then ``more_engine_dirs`` (each an
    engine directory or a folder of them)."""
    first = str(resolve_engines(options)[0])
    return tuple(load_catalog([first, *options.more_engine_dirs]))


def build_app(options: ServeOptions) -> Any:
    """The Ray Serve application for ``options`` (``serve.run(build_app(...))``)."""
    if options.replicas < 1:
        raise InputError(f"replicas must be at least 1, got {options.replicas}")
    if options.autoscale is not None and not 0 <= options.autoscale[0] <= options.autoscale[1]:
        raise InputError(f"autoscale needs 0 <= MIN <= MAX, got {options.autoscale}")
    if options.cpus_per_replica < 0:
        raise InputError(f"cpus-per-replica must be >= 0, got {options.cpus_per_replica}")
    if options.target_ongoing is not None and options.target_ongoing <= 0:
        raise InputError(
            f"target-ongoing must be > 0 (requests per replica), got {options.target_ongoing}"
        )
    check_limits(options.max_queue, options.timeout_s)
    engine_dir, max_batch = resolve_engines(options)
    # Let every request reach a replica (and be answered 429 there when its queue is full)
    # instead of waiting unseen in Ray's router.
    ongoing = max_batch + options.max_queue + 16
    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.autoscale is not None:
        scaling = {
            "autoscaling_config": {
                "min_replicas": options.autoscale[0],
                "initial_replicas": max(options.autoscale[0], 1),
                "max_replicas": options.autoscale[1],
                "target_ongoing_requests": options.target_ongoing or max_batch,
            }
        }
    generator = serve.deployment(
        name="Generator",
        ray_actor_options=replica_actor_options(options),
        max_ongoing_requests=ongoing,
        health_check_period_s=5.0,
        **scaling,
    )(GeneratorDeployment)
    ingress = serve.deployment(
        name="Ingress",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1000, ongoing * max(options.replicas, 1)),
    )(Ingress)
    replica = generator.bind(
        engine_dir,
        options.backend,
        max_batch,
        options.max_queue,
        options.timeout_s,
    )
    models = resolve_models(options)
    others = {}
    for i, model in enumerate(models[1:], start=1):
        _, batch = resolve_engines(dataclasses.replace(options, engine_dir=model.engine_dir))
        others[model.name] = generator.options(name=f"Generator{i}").bind(
            model.engine_dir, options.backend, batch, options.max_queue, options.timeout_s
        )
    front = FrontConfig(models=models, api_key=options.api_key, limits=options.limits)
    return ingress.bind(replica, options.timeout_s, front, others)
