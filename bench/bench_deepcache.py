"""DeepCache: UNet time on the SD 1.5 architecture, prompt accuracy on the bundled model.

``speed``: the SD 1.5-architecture checkpoint of ``bench_export.py`` (random weights) exported
with ``--deepcache`` (skip branch ``--branch``) at ``--size`` pixels; DPM++ 2M, ``--steps``
steps, CFG on, one image, with and without the cache (interval ``--interval``), alternating,
``--repeats`` rounds. The figure is ``timings["unet"]`` (every UNet call of the loop, full and
shallow) with the 1-minute load average beside it.

``quality``: the bundled digits model (``models/default``) exported with ``--deepcache``;
``--per-digit`` images of every digit ("a handwritten digit seven", ...) with and without the
cache (uniform and non-uniform schedules), same seeds, read by the model's held-out digit
classifier (``trt_sd.models.digits.DigitJudge``, the judge of the INT8 report).

    python bench/bench_deepcache.py speed --work /tmp/trt-sd-bench-dc [--size 256 --steps 20]
    python bench/bench_deepcache.py quality --work /tmp/trt-sd-bench-dc [--per-digit 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_export import build_sd15

PROMPT = "a photo of an astronaut riding a horse on the moon"


def export(model: Path, out: Path, branch: int, **shape: object) -> None:
    from trt_sd.export import export_model

    t0 = time.perf_counter()
    export_model(model, out, deepcache=branch, progress=True, **shape)
    print(f"export: {time.perf_counter() - t0:.0f} s -> {out}", flush=True)


def speed(args: argparse.Namespace) -> None:
    from trt_sd.runtime import Pipeline

    work = Path(args.work)
    model = Path(args.model) if args.model else build_sd15(work / "sd15")
    engines = work / f"engines-deepcache{args.branch}-{args.size}"
    export(model, engines, args.branch, height=args.size, width=args.size, batch="1")
    pipe = Pipeline.load(engines, backend="onnxruntime-cpu")
    call = {"steps": args.steps, "height": args.size, "width": args.size, "sampler": "dpm++"}
    pipe(PROMPT, seed=0, **{**call, "steps": 2})  # warm-up (both UNets)
    pipe(PROMPT, seed=0, deepcache=2, **{**call, "steps": 2})
    rows = []
    for r in range(args.repeats):
        settings = [0, args.interval] if r % 2 == 0 else [args.interval, 0]
        for interval in settings:
            load = os.getloadavg()[0]
            result = pipe(PROMPT, seed=r, deepcache=interval, **call)
            row = {
                "round": r,
                "deepcache": interval,
                "load_1min": round(load, 2),
                "unet_s": round(result.timings["unet"], 2),
                "unet_calls": result.unet_calls,
                "calls": result.params.get("deepcache"),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    ratios = []
    for r in range(args.repeats):
        off, on = (
            next(x["unet_s"] for x in rows if x["round"] == r and x["deepcache"] == k)
            for k in (0, args.interval)
        )
        ratios.append(on / off)
    calls_ratio(pipe, args)
    off = statistics.median(x["unet_s"] for x in rows if x["deepcache"] == 0)
    on = statistics.median(x["unet_s"] for x in rows if x["deepcache"] == args.interval)
    print(f"\nUNet s median: no cache {off:.2f}, deepcache {args.interval}: {on:.2f}")
    print(f"per-round ratio: {', '.join(f'{x:.3f}' for x in ratios)}")


def calls_ratio(pipe: object, args: argparse.Namespace, pairs: int = 10) -> None:
    """Full and shallow UNet calls timed alternately (each pair sees the same machine load):
    the UNet time of a DeepCache run predicted from the medians, robust to load swings."""
    from trt_sd.runtime.deepcache import DeepCacheConfig

    engines = pipe.engines  # type: ignore[attr-defined]
    full, shallow = engines["unet"], engines["unet_shallow"]
    latent = args.size // 8
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, latent, latent), dtype=np.float32),
        "timestep": np.full(2, 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32),
    }
    feature_name = shallow.component.input_names[-1]
    feature = full.run(feeds)[feature_name]
    times: dict[str, list[float]] = {"full": [], "shallow": []}
    for _ in range(pairs):
        for name, engine, extra in (
            ("full", full, {}),
            ("shallow", shallow, {feature_name: feature}),
        ):
            t0 = time.perf_counter()
            engine.run({**feeds, **extra})
            times[name].append(time.perf_counter() - t0)
    f, sh = statistics.median(times["full"]), statistics.median(times["shallow"])
    keys = len(DeepCacheConfig(args.interval).key_calls(args.steps))
    predicted = (keys * f + (args.steps - keys) * sh) / (args.steps * f)
    print(
        f"\nper call (median of {pairs} alternating pairs, CFG batch of 2 rows): full {f:.3f} s, "
        f"shallow {sh:.3f} s ({sh / f:.3f} of full); {keys} full + {args.steps - keys} shallow "
        f"calls -> {predicted:.3f} of the UNet time without cache"
    )


def quality(args: argparse.Namespace) -> None:
    from trt_sd.models import digits
    from trt_sd.models.paths import DEFAULT_MODEL_DIR
    from trt_sd.runtime import Pipeline

    work = Path(args.work)
    engines = work / f"engines-default-deepcache{args.branch}"
    export(DEFAULT_MODEL_DIR, engines, args.branch, batch="1:10")
    pipe = Pipeline.load(engines, backend="onnxruntime-cpu")
    judge = digits.DigitJudge(DEFAULT_MODEL_DIR)
    prompts = [digits.prompt_for_digit(d) for d in range(10)]
    labels = np.arange(10)
    settings = {
        "no cache": None,
        f"deepcache {args.interval} uniform": f"{args.interval}:uniform",
        f"deepcache {args.interval} nonuniform": f"{args.interval}:nonuniform",
    }
    images: dict[str, list[np.ndarray]] = {k: [] for k in settings}
    unet_s = dict.fromkeys(settings, 0.0)
    for seed in range(args.per_digit):
        for label, setting in settings.items():
            result = pipe(
                prompts,
                steps=args.steps,
                guidance=args.guidance,
                sampler=args.sampler,
                seed=1000 * seed,
                batch=10,
                deepcache=setting or 0,
            )
            images[label].extend(result.images)
            unet_s[label] += result.timings["unet"]
    reference = np.stack(images["no cache"]).astype(np.float64)
    n = len(reference)
    print(
        f"\n{n} images ({args.per_digit} per digit), {args.sampler} {args.steps} steps, "
        f"CFG {args.guidance}, skip branch {args.branch}\n"
    )
    print("| setting | prompt accuracy | vs no cache | mean abs pixel diff | UNet s |")
    print("|---|---|---|---|---|")
    base = None
    for label in settings:
        stack = np.stack(images[label])
        accuracy = judge.accuracy(stack, np.tile(labels, args.per_digit))
        base = accuracy if base is None else base
        diff = float(np.abs(stack.astype(np.float64) - reference).mean())
        print(
            f"| {label} | {accuracy:.1%} | {100 * (accuracy - base):+.1f} points | "
            f"{diff:.2f} / 255 | {unet_s[label]:.1f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("speed", "quality"))
    parser.add_argument("--model", help="an SD 1.5-architecture folder (default: build one)")
    parser.add_argument("--work", default="/tmp/trt-sd-bench-dc", help="scratch folder")
    parser.add_argument("--branch", type=int, default=0, help="DeepCache skip branch")
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="speed: image pixels")
    parser.add_argument("--repeats", type=int, default=3, help="speed: rounds")
    parser.add_argument("--per-digit", type=int, default=30, help="quality: images per digit")
    parser.add_argument("--guidance", type=float, default=5.0, help="quality: CFG scale")
    parser.add_argument("--sampler", default="dpm++", help="quality: sampler")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    speed(args) if args.mode == "speed" else quality(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
