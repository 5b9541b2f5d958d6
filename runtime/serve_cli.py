"""``trt-sd serve``: an engine directory as an HTTP service on Ray Serve.

::

    trt-sd serve [ENGINE_DIR] --host 127.0.0.1 --port 8000 [--replicas N] [--max-batch B]

``POST /generate`` takes JSON (prompt, negative_prompt, sampler, steps, guidance, seed, height,
width; also karras, eta, guidance_rescale) and answers ``image/png`` carrying its parameters
as ``trt-sd run`` writes them; ``GET /health`` answers JSON. Each replica batches concurrent
requests into shared UNet calls (continuous batching). Without ``--address`` a local Ray
instance is started; with it the application is deployed on that cluster (every node needs
trt-sd installed and the engine directory at the same path).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time

from trt_sd.models.errors import BackendUnavailableError, InputError


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM -> KeyboardInterrupt once; repeats (a process-group kill) must not break the
    shutdown already under way."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, got {text!r}") from None
    return lo, hi


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trt_sd.runtime.backends import BACKEND_CHOICES

    from .serve.engine import DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT_S

    parser.add_argument(
        "engine_dir",
        nargs="*",
        metavar="ENGINE_DIR",
        help="engine directories, or folders of them, each served as one model named after "
        "its folder (default: the cache)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--replicas", type=int, default=1, help="generation replicas")
    parser.add_argument(
        "--max-batch",
        type=int,
        metavar="B",
        help="requests per UNet call (default: the engine's batch maximum)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        metavar="N",
        help=f"requests waiting per replica before 429 (default {DEFAULT_MAX_QUEUE})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"per-request deadline in seconds (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--autoscale",
        type=_range,
        metavar="MIN:MAX",
        help="autoscale replicas between MIN and MAX instead of a fixed --replicas",
    )
    parser.add_argument(
        "--target-ongoing",
        type=float,
        metavar="N",
        help="autoscaling target of requests per replica (default: --max-batch)",
    )
    parser.add_argument(
        "--gpus-per-replica",
        type=float,
        metavar="G",
        help="GPUs per replica (default: 1 when the Ray cluster has GPUs, else 0)",
    )
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    parser.add_argument(
        "--lora-dir",
        metavar="DIR",
        help="folder of LoRA .safetensors files requests may name (loras field, <lora:name:w>)",
    )
    parser.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    from .serve.front import DEFAULT_LIMITS as LIM

    parser.add_argument("--api-key", metavar="KEY", help="require this key (Bearer or basic auth)")
    parser.add_argument("--api-key-file", metavar="FILE", help="read the API key from FILE")
    parser.add_argument("--max-images", type=int, default=LIM.max_images, metavar="N")
    parser.add_argument("--max-steps", type=int, default=LIM.max_steps, metavar="N")
    parser.add_argument("--max-pixels", type=int, default=LIM.max_pixels, metavar="N")
    parser.add_argument(
        "--ort-cache",
        metavar="1|0|DIR",
        help="keep ONNX Runtime's optimised CPU graphs on each machine so replicas that restart "
        "or scale out load ~5x faster: 1 = $TRT_SD_HOME/ort-cache, or a folder, 0 = off; "
        "costs a copy of the weights on disk (default: $TRT_SD_ORT_CACHE)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve

        from .serve.app import ServeOptions, build_app
    except ImportError as e:
        raise BackendUnavailableError(
            f"`trt-sd serve` needs Ray Serve ({e.name or e}); install it with: "
            "pip install 'trt-sd[serve]'"
        ) from None
    if not 0 < args.port < 65536:
        raise InputError(f"port must be in 1..65535, got {args.port}")
    from .serve.auth import resolve_api_key
    from .serve.front import DEFAULT_LIMITS

    for flag in ("max_images", "max_steps", "max_pixels"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    limits = dataclasses.replace(
        DEFAULT_LIMITS,
        max_images=args.max_images,
        max_steps=args.max_steps,
        max_pixels=args.max_pixels,
    )
    from .serve.catalog import expand_dirs

    dirs = [str(p) for p in expand_dirs(list(args.engine_dir or []))]
    options = ServeOptions(
        engine_dir=dirs[0] if dirs else None,
        more_engine_dirs=tuple(dirs[1:]),
        api_key=resolve_api_key(args.api_key, args.api_key_file),
        limits=limits,
        backend=args.backend,
        replicas=args.replicas,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        cpus_per_replica=args.cpus_per_replica,
        autoscale=args.autoscale,
        target_ongoing=args.target_ongoing,
        ort_cache=args.ort_cache,
        lora_dir=args.lora_dir,
    )
    build_app(options)  # validates everything before Ray starts
    ray.init(address=args.address, include_dashboard=False)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops Ray as cleanly as Ctrl-C does
    try:
        gpus = args.gpus_per_replica
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        options = dataclasses.replace(options, gpus_per_replica=gpus)
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(options), name="trt-sd", route_prefix="/")
        print(
            f"serving on http://{args.host}:{args.port} (POST /generate, GET /health, "
            "/sdapi/v1/*, /v1/images/*, /metrics); "
            "Ctrl-C stops",
            file=sys.stderr,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
