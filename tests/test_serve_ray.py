"""``trt-sd serve`` for real: the Ray Serve application on a local Ray instance, over HTTP on
127.0.0.1. One Ray instance and one deployment for the whole module (Ray starts in ~10 s).

Soak: hundreds of requests, 8 at a time, each answer checked against its own request (the
PNG's parameters and a reference image from ``Pipeline.__call__``), resident memory of the
replica flat. Overload: 429s, never anything else. Fault: the replica process is killed under
load; in-flight requests get a one-line JSON 503, Ray starts a new replica, retries succeed.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from PIL import Image
from runtime_engines import tiny_engines

from trt_sd.models.paths import DEFAULT_MODEL_DIR
from trt_sd.runtime import Pipeline
from trt_sd.runtime.cli import _version
from trt_sd.runtime.infotext import PNG_KEY, format_infotext, parse_infotext

pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow

CONCURRENCY = 8
SOAK_REQUESTS = int(os.environ.get("TRT_SD_SOAK_REQUESTS", "320"))
WARMUP_REQUESTS = 160  # Ray's and the allocators' buffers settle by then
MAX_QUEUE = 8
PROMPTS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SAMPLERS = ["dpm++", "euler_a", "ddim", "unipc"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled default model exported for batches up to 8, or (until it exists) the tiny
    test pipeline."""
    if not (DEFAULT_MODEL_DIR / "unet").is_dir():
        return tiny_engines()
    from trt_sd.export import export_model

    out = tmp_path_factory.mktemp("serve") / "engines"
    export_model(DEFAULT_MODEL_DIR, out, precision="fp32", batch="1:8", progress=False)
    return out


@pytest.fixture(scope="module")
def pipe(engines: Path) -> Pipeline:
    return Pipeline.load(engines, backend="onnxruntime-cpu")


def distinct_requests() -> list[dict[str, Any]]:
    """16 different requests (prompt, sampler, steps, seed, guidance): a mix-up between any
    two shows in the image and in the PNG parameters."""
    return [
        {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "sampler": SAMPLERS[i % len(SAMPLERS)],
            "steps": 3 + i % 4,
            "seed": 1000 + i,
            "guidance": 1.0 if i % 5 == 4 else 7.5,
        }
        for i in range(16)
    ]


Reference = tuple[np.ndarray, str]  # image, PNG parameters text


def reference(pipe: Pipeline, request: dict[str, Any]) -> Reference:
    """What ``trt-sd run`` makes for ``request``: the image and the PNG's parameters."""
    result = pipe(**request)
    return result.images[0], format_infotext(result.params, 0, f"trt-sd {_version()}")


@pytest.fixture(scope="module")
def references(pipe: Pipeline) -> dict[int, Reference]:
    return {r["seed"]: reference(pipe, r) for r in distinct_requests()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def url(engines: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``trt-sd serve`` in a subprocess (its own local Ray), stopped with SIGTERM at the end."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    command = [sys.executable, "-m", "trt_sd.runtime.cli", "serve", str(engines)]
    command += ["--port", str(port), "--backend", "onnxruntime-cpu", "--max-queue", str(MAX_QUEUE)]
    with open(log, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, server, log)
        yield base
    finally:
        try:
            descendants = psutil.Process(server.pid).children(recursive=True)
        except psutil.NoSuchProcess:  # it already exited (the log says why)
            descendants = []
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
    assert code == 0, log.read_text()[-3000:]
    _assert_all_gone(descendants)


def _wait_ready(base: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"trt-sd serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass  # not listening yet, or too busy starting to answer in time
        time.sleep(0.5)
    pytest.fail(f"trt-sd serve did not become ready:\n{log.read_text()[-3000:]}")


def _assert_all_gone(processes: list[Any]) -> None:
    """Ray's processes (raylet, GCS, workers, replicas) end with the server."""
    deadline = time.monotonic() + 30
    while True:
        left = [p for p in processes if _running(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, [p.name() for p in left]


def _running(process: Any) -> bool:
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def generate(url: str, request: dict[str, Any]) -> requests.Response:
    return requests.post(f"{url}/generate", json=request, timeout=120)


def check_image(response: requests.Response, request: dict[str, Any], expected: Reference):
    """The response is this request's image, with this request's parameters."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as im:
        image, text = np.asarray(im.convert("RGB")), im.info[PNG_KEY]
    params = parse_infotext(text)
    assert (params["prompt"], params["seed"]) == (request["prompt"], request["seed"])
    assert text == expected[1]
    assert np.abs(image.astype(int) - expected[0].astype(int)).max() <= 1, request


def health(url: str) -> dict[str, Any]:
    response = requests.get(f"{url}/health", timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_health_routes_and_errors(url: str) -> None:
    status = health(url)
    assert status["status"] == "ok" and status["backend"] == "onnxruntime-cpu"
    bad = generate(url, {"steps": 0})
    assert bad.status_code == 400
    assert bad.json() == {"error": "steps must be at least 1, got 0"}
    assert requests.get(f"{url}/generate", timeout=30).status_code == 405
    missing = requests.get(f"{url}/nothing", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()


def test_soak(url: str, references: dict[int, Reference]) -> None:
    """Every response is its own request's image; the replica's memory stays flat."""
    pool = distinct_requests()

    def one(i: int) -> None:
        request = pool[i % len(pool)]
        check_image(generate(url, request), request, references[request["seed"]])

    with ThreadPoolExecutor(CONCURRENCY) as executor:
        list(executor.map(one, range(WARMUP_REQUESTS)))
        before = health(url)
        start = time.perf_counter()
        list(executor.map(one, range(SOAK_REQUESTS)))
        seconds = time.perf_counter() - start
    after = health(url)
    assert after["pid"] == before["pid"]  # no replica restart hid anything
    stats = after["stats"]
    assert stats["failed"] == stats["rejected"] == stats["timed_out"] == 0
    assert stats["completed"] - before["stats"]["completed"] == SOAK_REQUESTS
    assert stats["max_rows"] > 2, stats  # requests did share UNet calls
    growth = after["rss_bytes"] / before["rss_bytes"] - 1
    print(
        f"soak: {SOAK_REQUESTS} requests in {seconds:.1f} s "
        f"({SOAK_REQUESTS / seconds:.1f}/s), mean UNet rows {stats['mean_rows']}, "
        f"RSS {before['rss_bytes'] / 2**20:.0f} -> {after['rss_bytes'] / 2**20:.0f} MiB"
    )
    assert growth < 0.05, f"resident memory grew {growth:.1%}"


def test_overload_is_answered_429(url: str) -> None:
    request = {"prompt": "seven", "steps": 30, "seed": 7}
    with ThreadPoolExecutor(48) as executor:
        responses = list(executor.map(lambda _: generate(url, request), range(48)))
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429}, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"].startswith("server busy")
    assert refused.headers["retry-after"] == "1"


def test_killed_replica_fails_cleanly_and_retries_succeed(url: str, pipe: Pipeline) -> None:
    pool = [dict(r, steps=100) for r in distinct_requests()[:CONCURRENCY]]
    victim = health(url)["pid"]
    with ThreadPoolExecutor(CONCURRENCY) as executor:
        in_flight = [executor.submit(generate, url, r) for r in pool]
        # Kill as soon as the replica holds work, however fast this machine is.
        deadline = time.monotonic() + 30
        while health(url)["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        responses = [f.result() for f in in_flight]
    failed = [(req, r) for req, r in zip(pool, responses, strict=True) if r.status_code != 200]
    assert failed, "the kill came too late: every request had finished"
    for _, response in failed:
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/json"
        assert response.text.count("\n") == 0 and "Traceback" not in response.text
        assert response.json() == {
            "error": "the generation replica failed while serving this request; retry it"
        }
    deadline = time.monotonic() + 90
    for request, _ in failed:
        while True:
            response = generate(url, request)
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            assert response.status_code == 503, response.text
            time.sleep(0.5)
        check_image(response, request, reference(pipe, request))
    assert health(url)["pid"] != victim
