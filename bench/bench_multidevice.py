"""Multi-device UNet scaling: the SD 1.5 architecture split in 2 stages, on 1 vs 2 devices.

Builds the SD 1.5-architecture checkpoint of ``bench_export.py`` (random weights), exports it
once with ``--split-unet 2`` at ``--size`` pixels, then generates with the same engines on
one simulated device (``devices="cpu"``: both stages, one after the other, on one ONNX Runtime
thread) and on two (``"cpu,cpu"`` or, with ``--pin``, ``"cpu:0,cpu:1"``: one thread per
stage, the batch's images as concurrent chains). Both use identical graphs, so the ratio is
the pipelining alone (both layouts share the same stage sessions: one copy of the weights).
Rounds alternate the layouts so a change in machine load hits both; each row reports the
1-minute load average next to its figures. Run it on an otherwise idle machine: the second
"device" is the second core, and another process's work on it is lost scaling.

    python bench/bench_multidevice.py --work /tmp/trt-sd-bench-md [--model SD15_FOLDER
        --size 256 --batch 2 --steps 10 --repeats 3 --pin]

Throughput = images x steps / UNet seconds (``timings["unet"]``, the denoising loop's UNet
time; with chains, the slowest chain's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_export import build_sd15

PROMPT = "a photo of an astronaut riding a horse on the moon"


def export(model: Path, out: Path, size: int, batch: int, stages: int) -> None:
    from trt_sd.export import export_model

    t0 = time.perf_counter()
    export_model(
        model, out, height=size, width=size, batch=f"1:{batch}", split_unet=stages, progress=True
    )
    print(f"export: {time.perf_counter() - t0:.0f} s -> {out}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an SD 1.5-architecture folder (default: build one)")
    parser.add_argument("--work", default="/tmp/trt-sd-bench-md", help="scratch folder")
    parser.add_argument("--size", type=int, default=256, help="image pixels (latent = size/8)")
    parser.add_argument("--batch", type=int, default=2, help="images per generation (chains)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pin", action="store_true", help="pin each stage thread to a core")
    parser.add_argument("--json", help="also write the raw rows here")
    args = parser.parse_args()

    from trt_sd.runtime import Pipeline
    from trt_sd.runtime.multidevice import StagedUNet, parse_devices

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else build_sd15(work / "sd15")
    engines = work / f"engines-split2-{args.size}"
    export(model, engines, args.size, args.batch, 2)
    two = "cpu:0,cpu:1" if args.pin else "cpu,cpu"
    pipe = Pipeline.load(engines, backend="onnxruntime-cpu", devices=two)
    staged = pipe.engines["unet"]
    # The same one-thread stage sessions behind both layouts (one copy of the weights).
    one = StagedUNet(staged.plan, staged.stages, parse_devices("cpu"))
    unets = {"1 device (cpu)": one, f"2 devices ({two})": staged}
    call = {"steps": args.steps, "batch": args.batch, "height": args.size, "width": args.size}
    for unet in unets.values():  # warm-up: ORT plans its buffers on the first call
        pipe.engines["unet"] = unet
        pipe(PROMPT, seed=0, **{**call, "steps": 1})
    rows = []
    for r in range(args.repeats):
        order = list(unets) if r % 2 == 0 else list(unets)[::-1]
        for label in order:
            pipe.engines["unet"] = unets[label]
            stages_before = list(pipe.engines["unet"].stage_seconds)
            load = os.getloadavg()[0]
            result = pipe(PROMPT, seed=r, **call)
            unet = result.timings["unet"]
            stages = [
                round(a - b, 2)
                for a, b in zip(pipe.engines["unet"].stage_seconds, stages_before, strict=True)
            ]
            row = {
                "round": r,
                "layout": label,
                "load_1min": round(load, 2),
                "unet_s": round(unet, 2),
                "total_s": round(result.timings["total"], 2),
                "image_steps_per_s": round(args.batch * args.steps / unet, 3),
                "stage_busy_s": stages,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not rows:
        return 0
    print("\n| layout | load (1 min) | UNet s (median) | image-steps / s | speed-up |")
    print("|---|---|---|---|---|")
    base = None
    for label in unets:
        mine = [x for x in rows if x["layout"] == label]
        unet = statistics.median(x["unet_s"] for x in mine)
        rate = args.batch * args.steps / unet
        base = base or rate
        loads = ", ".join(f"{x['load_1min']:.1f}" for x in mine)
        print(f"| {label} | {loads} | {unet:.2f} | {rate:.3f} | {rate / base:.2f}x |")
    ratios = []
    for r in range(args.repeats):
        one, two_ = (next(x for x in rows if x["round"] == r and x["layout"] == k) for k in unets)
        ratios.append(one["unet_s"] / two_["unet_s"])
    print(f"\nper-round speed-up: {', '.join(f'{x:.2f}' for x in ratios)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
