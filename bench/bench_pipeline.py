"""End-to-end generation time: trt-sd's lean runtime vs diffusers, same checkpoint, same work.

    nice python bench/bench_pipeline.py --model sd15 [--size 256 --steps 10 --repeats 3]
    python bench/bench_pipeline.py --model tiny   # fixed overheads dominate

``sd15``: an SD 1.5-architecture checkpoint (860M-param UNet, CLIP ViT-L text encoder, SD VAE)
with random weights, built from configs into ``--workdir`` and exported once with
``trt_sd.export.export_model`` (fp32 ONNX, the requested size, batch 1). ``tiny``: the tests'
tiny pipeline at 16x16. Both sides get the same prompt, negative prompt, initial latents,
sampler (DPM++ 2M, diffusers' ``DPMSolverMultistepScheduler``), steps and CFG scale, run on
the CPU with as many threads as physical cores, one warm-up call each, then ``--repeats``
rounds alternating the two (so a change in machine load hits both alike); the figure is the
median. Per-component times for diffusers come from wrapping its
modules' ``forward`` with timers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Runner = tuple[float, Callable[[], tuple[dict[str, float], np.ndarray]]]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_export import build_sd15  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, low quality"


def prepare(args: argparse.Namespace) -> tuple[Path, Path, int]:
    """(model folder, engine directory, image size), building what is missing."""
    from trt_sd.export import export_model

    work = Path(args.workdir) / args.model
    if args.model == "sd15":
        model, size = build_sd15(work / "model"), args.size
    else:
        from tiny_pipeline import make_tiny_pipeline

        model, size = work / "model", 16
        if not (model / "model_index.json").is_file():
            make_tiny_pipeline(model)
    engines = work / f"engines-{size}"
    t0 = time.perf_counter()  # reuses the components whose content key is unchanged
    export_model(model, engines, precision="fp32", height=size, width=size, batch="1")
    print(f"export: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model, engines, size


def runtime_runner(engines: Path, latents: np.ndarray, args: argparse.Namespace) -> Runner:
    """Load trt-sd's Pipeline; return (load seconds, one-call function)."""
    from trt_sd.runtime import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.load(engines, backend="onnxruntime-cpu")
    load = time.perf_counter() - t0
    kwargs = dict(sampler="dpm++", steps=args.steps, guidance=args.guidance, latents=latents)

    def call() -> tuple[dict[str, float], np.ndarray]:
        result = pipe(PROMPT, NEGATIVE, **kwargs)
        return result.timings, result.images[0]

    return load, call


def diffusers_runner(model: Path, latents: np.ndarray, args: argparse.Namespace) -> Runner:
    """Load diffusers' StableDiffusionPipeline (DPM++ 2M); per-component times come from
    timers around its modules' forward / decode."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from trt_sd.runtime.backends import physical_cores

    torch.set_num_threads(args.threads or physical_cores())
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        str(model), safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t0
    spent: dict[str, float] = defaultdict(float)

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t

        return wrapper

    pipe.text_encoder.forward = timed("text_encoder", pipe.text_encoder.forward)
    pipe.unet.forward = timed("unet", pipe.unet.forward)
    pipe.vae.decode = timed("vae_decoder", pipe.vae.decode)
    size = latents.shape[-1] * pipe.vae_scale_factor

    def call() -> tuple[dict[str, float], np.ndarray]:
        spent.clear()
        t = time.perf_counter()
        with torch.inference_mode():
            out = pipe(
                PROMPT,
                negative_prompt=NEGATIVE,
                height=size,
                width=size,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                latents=torch.from_numpy(latents),
                output_type="np",
            )
        timings = {**spent, "total": time.perf_counter() - t}
        return timings, (out.images[0] * 255).round().astype(np.uint8)

    return load, call


def interleaved(runners: dict[str, Runner], repeats: int) -> dict[str, dict[str, Any]]:
    """One warm-up call each, then ``repeats`` rounds of one call each, alternating, so a
    change in machine load hits both sides alike; the median-total call is reported."""
    calls = {name: call for name, (_, call) in runners.items()}
    for call in calls.values():
        call()
    runs: dict[str, list[tuple[dict[str, float], np.ndarray]]] = {n: [] for n in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            runs[name].append(call())
    out = {}
    for name, results in runs.items():
        results.sort(key=lambda r: r[0]["total"])
        timings, image = results[len(results) // 2]
        out[name] = {
            "load_s": runners[name][0],
            "total_s": timings["total"],
            "all_totals_s": sorted(r[0]["total"] for r in results),
            "components_s": timings,
            "image": image,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--size", type=int, default=256, help="image size (sd15)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/trt-sd-bench")
    parser.add_argument(
        "--threads", type=int, default=0, help="threads for both sides (0: physical cores)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--prepare-only", action="store_true", help="build + export, no timing")
    args = parser.parse_args()
    if args.threads:
        os.environ["TRT_SD_NUM_THREADS"] = str(args.threads)
    model, engines, size = prepare(args)
    if args.prepare_only:
        return
    factor = 8 if args.model == "sd15" else 2
    latents = np.random.default_rng(0).standard_normal(
        (1, 4, size // factor, size // factor), np.float32
    )
    load_before = os.getloadavg()[0]
    results = interleaved(
        {
            "trt_sd": runtime_runner(engines, latents, args),
            "diffusers": diffusers_runner(model, latents, args),
        },
        args.repeats,
    )
    ours, theirs = results["trt_sd"], results["diffusers"]
    diff = np.abs(ours.pop("image").astype(int) - theirs.pop("image").astype(int))
    ratio = ours["total_s"] / theirs["total_s"]
    threads = args.threads or "physical cores"
    print(
        f"{args.model} {size}x{size}, DPM++ 2M {args.steps} steps, CFG {args.guidance}, CPU, "
        f"threads: {threads}"
    )
    print(f"{'component':<14}{'trt-sd (s)':>12}{'diffusers (s)':>15}{'ratio':>8}")
    for name in ("text_encoder", "unet", "vae_decoder", "total"):
        a, b = ours["components_s"].get(name, 0.0), theirs["components_s"].get(name, 0.0)
        print(f"{name:<14}{a:>12.3f}{b:>15.3f}{(a / b if b else float('nan')):>8.2f}")
    print(f"load: trt-sd {ours['load_s']:.2f} s, diffusers {theirs['load_s']:.2f} s")
    print(f"end-to-end ratio trt-sd / diffusers: {ratio:.2f}; max pixel diff {diff.max()}")
    print(f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "size": size,
                    "steps": args.steps,
                    "ratio": ratio,
                    "trt_sd": ours,
                    "diffusers": theirs,
                    "max_pixel_diff": int(diff.max()),
                }
            )
        )


if __name__ == "__main__":
    main()
