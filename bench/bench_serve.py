"""Serving throughput: continuous batching vs one request at a time, same engines, same run.

    python bench/bench_serve.py                       # the bundled default model, CPU
    python bench/bench_serve.py --http                # also end to end through Ray Serve
    python bench/bench_serve.py --engines DIR --steps 20 --requests 96 --concurrency 8

``--concurrency`` clients each send their next request as soon as the previous one is
answered, ``--requests`` in all (distinct seeds, the model's default prompt and size,
DPM++ 2M, CFG 7.5). Modes, alternated over ``--repeats`` rounds (median reported):

* ``sequential``: ``Pipeline.__call__`` one request after another (no engine);
* ``engine max-batch 1``: the batching engine allowed one request per UNet call, i.e.
  requests served one at a time behind a queue;
* ``engine max-batch B``: continuous batching, up to B requests per UNet call;
* with ``--http``: the last two again through ``trt-sd serve``'s Ray Serve application over
  HTTP on 127.0.0.1 (one replica), PNG encoding and transport included;
* with ``--apis``: one deployment (max-batch B), the same requests through ``POST /generate``,
  the AUTOMATIC1111 ``/sdapi/v1/txt2img`` and the OpenAI ``/v1/images/generations`` adapters,
  rounds interleaved (what the adapters cost: JSON, base64, per-image fan-out).

Without ``--engines`` the default model is exported once (fp32 ONNX, batch 1..8) into
``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def default_engines(workdir: Path) -> Path:
    from trt_sd.export import export_model
    from trt_sd.models.paths import DEFAULT_MODEL_DIR

    out = workdir / "engines-default-b8"
    if not (out / "manifest.json").is_file():
        export_model(DEFAULT_MODEL_DIR, out, precision="fp32", batch="1:8", progress=False)
    return out


def drive(send: Callable[[int], float], requests: int, concurrency: int) -> dict[str, float]:
    """``requests`` calls of ``send(i)`` (returns its latency) from ``concurrency`` clients."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as executor:
        latencies = sorted(executor.map(send, range(requests)))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "req_per_s": requests / seconds,
        "p50_s": latencies[len(latencies) // 2],
        "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def in_process_modes(engines: Path, args: argparse.Namespace) -> dict[str, Callable[[], dict]]:
    from trt_sd.runtime import Pipeline
    from trt_sd.runtime.serve.engine import BatchingEngine

    pipe = Pipeline.load(engines, backend="onnxruntime-cpu")
    max_batch = args.max_batch or pipe.manifest.components["unet"].shape_range.batch.max
    steps = args.steps

    def sequential() -> dict:
        return drive(lambda i: timed(lambda: pipe(steps=steps, seed=i)), args.requests, 1)

    def engine_mode(batch: int) -> Callable[[], dict]:
        def run() -> dict:
            engine = BatchingEngine(pipe, max_batch=batch, max_queue=args.requests)
            try:
                engine.generate(steps=1, seed=0)  # warm the scheduler thread

                def send(i: int) -> float:
                    return timed(lambda: engine.generate(steps=steps, seed=i))

                result = drive(send, args.requests, args.concurrency)
                result["mean_unet_rows"] = engine.stats.to_dict()["mean_rows"]
                return result
            finally:
                engine.close()

        return run

    pipe(steps=2, seed=0)  # warm-up
    return {
        "sequential (Pipeline.__call__)": sequential,
        "engine max-batch 1": engine_mode(1),
        f"engine max-batch {max_batch}": engine_mode(max_batch),
    }


def run_http(engines: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Max-batch 1 and B through ``trt-sd serve``'s application, ``--repeats`` rounds each."""
    import ray
    import requests
    from ray import serve

    from trt_sd.runtime.serve.app import ServeOptions, build_app, resolve_engines

    port = 8765
    url = f"http://127.0.0.1:{port}/generate"
    _, built = resolve_engines(ServeOptions(engine_dir=str(engines)))

    def send(i: int) -> float:
        t0 = time.perf_counter()
        r = requests.post(url, json={"steps": args.steps, "seed": i}, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0

    results: dict[str, list[dict]] = {}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for batch in (1, args.max_batch or built):
            options = ServeOptions(
                engine_dir=str(engines),
                backend="onnxruntime-cpu",
                max_batch=batch,
                max_queue=args.requests,
            )
            serve.run(build_app(options), name="bench", route_prefix="/")
            requests.post(url, json={"steps": 1, "seed": 0}, timeout=600).raise_for_status()
            runs = [drive(send, args.requests, args.concurrency) for _ in range(args.repeats)]
            results[f"http max-batch {batch}"] = runs
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


PROMPT = "a photo of a cat"
#: /generate's defaults in WebUI terms (same sampler, same CFG: the same work)
A1111_SAME = {"sampler_name": "dpm++", "cfg_scale": 7.5}


def run_apis(engines: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    """/generate vs the two client APIs on one deployment, ``--repeats`` interleaved rounds."""
    import ray
    import requests
    from ray import serve

    from trt_sd.runtime.serve.app import ServeOptions, build_app

    base = "http://127.0.0.1:8766"
    steps = args.steps

    def via(path: str, body: Callable[[int], dict], check: Callable[[Any], None]) -> Callable:
        def send(i: int) -> float:
            t0 = time.perf_counter()
            r = requests.post(f"{base}{path}", json=body(i), timeout=600)
            r.raise_for_status()
            check(r)
            return time.perf_counter() - t0

        return send

    modes = {
        "POST /generate": via(
            "/generate", lambda i: {"prompt": PROMPT, "steps": steps, "seed": i}, lambda r: None
        ),
        "A1111 /sdapi/v1/txt2img": via(
            "/sdapi/v1/txt2img",
            lambda i: {"prompt": PROMPT, "steps": steps, "seed": i, **A1111_SAME},
            lambda r: r.json()["images"][0],
        ),
        "OpenAI /v1/images/generations": via(
            "/v1/images/generations",
            lambda i: {"prompt": PROMPT, "steps": steps, "seed": i, "guidance": 7.5},
            lambda r: r.json()["data"][0]["b64_json"],
        ),
    }
    results: dict[str, list[dict]] = {name: [] for name in modes}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8766})
        options = ServeOptions(
            engine_dir=str(engines), backend="onnxruntime-cpu", max_queue=args.requests
        )
        serve.run(build_app(options), name="bench-apis", route_prefix="/")
        for send in modes.values():
            send(0)  # warm each path
        for _ in range(args.repeats):
            for name, send in modes.items():
                results[name].append(drive(send, args.requests, args.concurrency))
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def adapter_cost(engines: Path, calls: int = 200) -> dict[str, float]:
    """Milliseconds of ingress work per one-image request in each adapter, with the replica
    replaced by a canned 512x512 PNG reply: field checks, fan-out, base64, ``info`` - the
    adapters' whole cost, free of the generation noise of a shared machine."""
    import asyncio
    import io

    import numpy as np

    from trt_sd.runtime.infotext import save_png
    from trt_sd.runtime.serve import a1111, openai_images
    from trt_sd.runtime.serve.catalog import model_entry
    from trt_sd.runtime.serve.front import Front, FrontConfig
    from trt_sd.runtime.serve.replica import PARAMS_HEADER, Reply

    model = model_entry(engines)
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    save_png(buffer, rng.integers(0, 256, (512, 512, 3), dtype=np.uint8), "a cat\nSteps: 20")
    params = json.dumps({"seed": 1, "sampler": "dpm++", "guidance": 7.5, "steps": 20})
    reply = Reply(200, buffer.getvalue(), "image/png", {PARAMS_HEADER: params})

    async def generate(name: str, kwargs: dict) -> Reply:
        return reply

    front = Front(FrontConfig((model,)), generate, generate)  # type: ignore[arg-type]
    size = {"width": model.default_width, "height": model.default_height}
    paths = {
        "A1111 /sdapi/v1/txt2img": lambda i: a1111.generate(
            front, {"prompt": PROMPT, "seed": i, **size, **A1111_SAME}, False
        ),
        "OpenAI /v1/images/generations": lambda i: openai_images._generate(
            front, {"prompt": PROMPT, "seed": i, "size": f"{size['width']}x{size['height']}"}, None
        ),
    }
    out = {}
    for name, call in paths.items():

        async def run(call: Callable = call) -> float:
            t0 = time.perf_counter()
            for i in range(calls):
                assert (await call(i)).status == 200
            return time.perf_counter() - t0

        out[name] = asyncio.run(run()) / calls * 1000
        print(f"adapter cost {name:<32} {out[name]:.2f} ms per request (512x512 PNG)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=Path, help="engine directory (default: export)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/trt-sd-bench-serve"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-batch", type=int, help="default: the UNet engine's batch maximum")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--http", action="store_true", help="also through Ray Serve over HTTP")
    parser.add_argument("--apis", action="store_true", help="only: /generate vs the client APIs")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    engines = args.engines or default_engines(args.workdir)

    head = f"{args.requests} requests, {args.concurrency} clients, {args.steps} steps, {engines}"
    if args.apis:
        print(head)
        results = report(run_apis(engines, args))
        results["adapter_ms"] = adapter_cost(engines)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    modes = in_process_modes(engines, args)
    rounds: dict[str, list[dict]] = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, run in modes.items():
            rounds[name].append(run())
    print(f"{args.requests} requests, {args.concurrency} clients, {args.steps} steps, {engines}")
    results = report(rounds)
    if args.http:
        results.update(report(run_http(engines, args)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def report(rounds: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Print the median of each mode's rounds; return them."""
    results = {}
    print(f"{'mode':<32} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'UNet rows':>9}", flush=True)
    for name, runs in rounds.items():
        best = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results[name] = best
        rows = f"{best['mean_unet_rows']:.1f}" if "mean_unet_rows" in best else "-"
        print(
            f"{name:<32} {best['req_per_s']:>7.2f} {best['p50_s']:>7.2f} "
            f"{best['p95_s']:>7.2f} {rows:>9}",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
