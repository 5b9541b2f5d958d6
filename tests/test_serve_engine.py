"""Continuous batching (trt_sd.runtime.serve.engine) on a tiny exported pipeline, no Ray.

The central promise: a request's image does not depend on which other requests shared its
UNet calls, so every image is compared with ``Pipeline.__call__`` for the same arguments.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from runtime_engines import tiny_engines

from trt_sd.models.errors import InputError, NumericalError
from trt_sd.runtime import Pipeline
from trt_sd.runtime.serve.engine import (
    BatchingEngine,
    EngineStoppedError,
    QueueFullError,
    RequestTimeoutError,
)

EARLY = [
    {"prompt": "a cat", "sampler": "dpm++", "steps": 6, "seed": 1},
    {"prompt": "a dog", "sampler": "euler_a", "steps": 5, "seed": 2},  # stochastic
    {"prompt": "the moon", "sampler": "ddim", "steps": 7, "seed": 3, "guidance": 1.0},  # 1 row
]
LATE = [
    {"prompt": "a horse", "sampler": "heun", "steps": 3, "seed": 4},  # 2 model calls per step
    {"prompt": "seven", "sampler": "unipc", "steps": 4, "seed": 5, "height": 24},  # other size
    {"prompt": "digit", "sampler": "dpm++2m sde karras", "steps": 5, "seed": 6},
    {"prompt": "nine", "sampler": "euler", "steps": 2, "seed": 7, "guidance": 3.0},
]


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")


class UnetSpy:
    """Wraps the UNet engine: records each call's timesteps and runs ``hook(call_index)``
    inside the call, i.e. while the scheduler is busy with a batch."""

    def __init__(self, pipe: Pipeline, hook: Callable[[int], None] | None = None) -> None:
        self.engine = pipe.engines["unet"]
        self.original = self.engine.run
        self.hook = hook
        self.timesteps: list[np.ndarray] = []

    def run(self, feeds: dict[str, Any], keep_on_device: Any = ()) -> Any:
        self.timesteps.append(np.array(feeds["timestep"]))
        if self.hook is not None:
            self.hook(len(self.timesteps))
        return self.original(feeds, keep_on_device=keep_on_device)

    def __enter__(self) -> UnetSpy:
        self.engine.run = self.run  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.engine.run


@pytest.fixture
def engine_factory(pipe: Pipeline) -> Iterator[Callable[..., BatchingEngine]]:
    engines: list[BatchingEngine] = []

    def make(**kwargs: Any) -> BatchingEngine:
        engine = BatchingEngine(pipe, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def test_concurrent_requests_match_running_alone(pipe, engine_factory) -> None:
    """Requests joining mid-flight share UNet calls at different steps and still produce
    the images Pipeline.__call__ makes for them alone (within 1/255)."""
    engine = engine_factory(max_batch=4)
    late_tickets: list[Any] = []

    def join_late(call: int) -> None:
        if call == 2:  # the early requests are at step 1 of theirs
            late_tickets.extend(engine.submit(**r) for r in LATE)

    with UnetSpy(pipe, join_late) as spy:
        early_tickets = [engine.submit(**r) for r in EARLY]
        results = [t.future.result(timeout=60) for t in early_tickets]
        while len(late_tickets) < len(LATE):
            time.sleep(0.01)
        results += [t.future.result(timeout=60) for t in late_tickets]

    for request, result in zip(EARLY + LATE, results, strict=True):
        alone = pipe(**request)
        diff = np.abs(alone.images[0].astype(int) - result.image.astype(int)).max()
        assert diff <= 1, (request, diff)
        assert result.params == alone.params
        assert result.unet_calls == alone.unet_calls
    # batching happened: calls of several requests, rows at different timesteps
    assert max(len(t) for t in spy.timesteps) >= 5
    assert any(len(set(t.tolist())) >= 3 for t in spy.timesteps)
    assert len(spy.timesteps) < sum(r.unet_calls for r in results)
    assert engine.stats.completed == len(EARLY + LATE) and engine.stats.failed == 0


def test_validation_uses_the_cli_rules(engine_factory) -> None:
    engine = engine_factory()
    with pytest.raises(InputError, match="steps must be at least 1, got 0"):
        engine.submit(steps=0)
    with pytest.raises(InputError, match="unknown sampler"):
        engine.submit(sampler="nope")
    with pytest.raises(InputError, match="height must be a positive multiple of 8"):
        engine.submit(height=20)
    with pytest.raises(InputError, match="eta applies only to"):
        engine.submit(sampler="heun", eta=0.5)
    assert engine.stats.submitted == 0


def test_full_queue_is_refused_and_the_rest_served(pipe, engine_factory) -> None:
    engine = engine_factory(max_batch=1, max_queue=2)
    entered, release = threading.Event(), threading.Event()

    def block(call: int) -> None:
        entered.set()
        release.wait(30)

    with UnetSpy(pipe, block):
        first = engine.submit(prompt="a", steps=2, seed=1)
        assert entered.wait(30)
        queued = [engine.submit(prompt="b", steps=2, seed=s) for s in (2, 3)]
        with pytest.raises(QueueFullError, match="server busy"):
            engine.submit(prompt="c", steps=2, seed=4)
        release.set()
        for ticket in [first, *queued]:
            assert ticket.future.result(timeout=30).image.shape == (16, 16, 3)
    assert engine.stats.rejected == 1 and engine.stats.completed == 3


def test_deadline_fails_the_request_and_frees_its_slot(pipe, engine_factory) -> None:
    engine = engine_factory(max_batch=1, timeout_s=0.5)

    def slow(call: int) -> None:
        time.sleep(0.3)

    with UnetSpy(pipe, slow):
        ticket = engine.submit(prompt="slow", steps=10, seed=1)
        with pytest.raises(RequestTimeoutError, match=r"timed out after 0\.5 s \(at step"):
            ticket.future.result(timeout=30)
    assert engine.generate(prompt="fast", steps=1, seed=2).unet_calls == 1
    assert engine.stats.timed_out == 1


def test_cancelled_request_leaves_the_batch(pipe, engine_factory) -> None:
    engine = engine_factory(max_batch=2)
    tickets: dict[str, Any] = {}
    first_call, kept_submitted = threading.Event(), threading.Event()

    def cancel(call: int) -> None:
        if call == 1:  # "gone" runs alone; "kept" is queued during this call and joins at 2
            first_call.set()
            assert kept_submitted.wait(30)
        if call == 2:
            tickets["gone"].cancel()

    with UnetSpy(pipe, cancel) as spy:
        tickets["gone"] = engine.submit(prompt="gone", steps=8, seed=1)
        assert first_call.wait(30)
        kept = engine.submit(prompt="kept", steps=8, seed=2)
        kept_submitted.set()
        assert kept.future.result(timeout=30).unet_calls == 8
    assert not tickets["gone"].future.done()
    # 2 rows (gone alone), 4 (both, cancelled inside this call), then kept alone to the end.
    assert [len(t) for t in spy.timesteps] == [2, 4] + [2] * 7


def test_engine_error_fails_its_batch_only(pipe, engine_factory) -> None:
    engine = engine_factory()

    def explode(call: int) -> None:
        if call == 1:
            raise RuntimeError("engine failure")

    with UnetSpy(pipe, explode):
        ticket = engine.submit(prompt="x", steps=2, seed=1)
        with pytest.raises(RuntimeError, match="engine failure"):
            ticket.future.result(timeout=30)
        assert engine.generate(prompt="y", steps=2, seed=2).unet_calls == 2
    assert engine.alive and engine.stats.failed == 1


def test_close_fails_pending_and_refuses_new(pipe, engine_factory) -> None:
    engine = engine_factory(max_batch=1)
    entered, release = threading.Event(), threading.Event()

    def block(call: int) -> None:
        entered.set()
        release.wait(30)

    with UnetSpy(pipe, block):
        running = engine.submit(prompt="a", steps=3, seed=1)
        assert entered.wait(30)
        waiting = engine.submit(prompt="b", steps=3, seed=2)
        closer = threading.Thread(target=engine.close)
        closer.start()
        release.set()
        closer.join(30)
    for ticket in (running, waiting):
        with pytest.raises(EngineStoppedError):
            ticket.future.result(timeout=30)
    with pytest.raises(EngineStoppedError):
        engine.submit(prompt="c")
    assert not engine.alive


def test_max_batch_beyond_the_engine_is_refused(pipe) -> None:
    with pytest.raises(InputError, match=r"max-batch 5 is more than .* \(1\.\.4\)"):
        BatchingEngine(pipe, max_batch=5)


def test_a_diverging_request_fails_alone(pipe, engine_factory) -> None:
    """Absurd guidance blows up one request's latents; it fails with a line that says so, and
    the request sharing its UNet calls and VAE batch is served."""
    engine = engine_factory(max_batch=2)
    entered, release = threading.Event(), threading.Event()

    def hold(call: int) -> None:  # both requests join before the first UNet call returns
        if call == 1:
            entered.set()
            release.wait(30)

    with UnetSpy(pipe, hold):
        blocker = engine.submit(prompt="z", steps=1, seed=3)
        assert entered.wait(30)
        bad = engine.submit(prompt="x", steps=4, seed=1, guidance=1e300)
        good = engine.submit(prompt="y", steps=4, seed=2)
        release.set()
        with pytest.raises(NumericalError, match=r"latents became NaN or inf .* guidance"):
            bad.future.result(timeout=30)
        assert good.future.result(timeout=30).image.shape == (16, 16, 3)
        assert blocker.future.result(timeout=30).unet_calls == 1
