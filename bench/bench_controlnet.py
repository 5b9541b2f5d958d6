"""ControlNet overhead per denoising step: trt-sd against diffusers on the CPU, same run.

Per step, with CFG (2 UNet rows): the UNet alone (no control image; trt-sd's UNet then gets
zero residuals) and the UNet plus one ControlNet (with a control image). Figures are seconds per
step and the overhead ratio (with control / without) for each side, and trt-sd / diffusers with
control. trt-sd times come from the pipeline's own per-component timings; diffusers' from
forward hooks on its UNet and ControlNet modules (so neither side counts text encoder or VAE).

The ControlNet is ``ControlNetModel.from_unet(unet)`` of the model (random-weights SD 1.5
architecture here); weights do not change the arithmetic cost.

Prepare (once): the ControlNet folder, then an export with it::

    python bench/bench_controlnet.py make-controlnet --model MODEL --out CN
    trt-sd export MODEL --controlnet CN --out ENGINES --batch 1 --height 256:384:512 ...

Run::

    python bench/bench_controlnet.py run --model MODEL --controlnet CN --engines ENGINES \
        --size 512 --steps 4
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np

PROMPT = "a photo of an astronaut riding a horse on the moon"


def make_controlnet(model: str, out: str) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(Path(model) / "unet"))
    ControlNetModel.from_unet(unet).save_pretrained(out)
    print(f"wrote {out}")


def _control(size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def ours(engines: str, backend: str, size: int, steps: int, rounds: int) -> dict[str, float]:
    from trt_sd.runtime import Pipeline

    pipe = Pipeline.load(engines, backend=backend)
    args = {"steps": steps, "seed": 1, "height": size, "width": size, "sampler": "euler"}
    pipe(PROMPT, **{**args, "steps": 1})  # warm-up (first-call allocations)
    pipe(PROMPT, **{**args, "steps": 1}, control_image=_control(size))
    plain, control = [], []
    for _ in range(rounds):
        t = pipe(PROMPT, **args).timings
        plain.append(t["unet"] / steps)
        t = pipe(PROMPT, **args, control_image=_control(size)).timings
        control.append((t["unet"] + t["controlnet_0"]) / steps)
    backend_name = pipe.backend
    del pipe
    gc.collect()
    return {"plain": min(plain), "control": min(control), "backend": backend_name}  # type: ignore[dict-item]


def theirs(model: str, controlnet: str, size: int, steps: int, rounds: int) -> dict[str, float]:
    import torch
    from diffusers import (
        ControlNetModel,
        EulerDiscreteScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )
    from PIL import Image

    cn = ControlNetModel.from_pretrained(controlnet)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        model, controlnet=cn, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    plain_pipe = StableDiffusionPipeline(
        **{k: v for k, v in pipe.components.items() if k != "controlnet"},
    )
    plain_pipe.set_progress_bar_config(disable=True)
    spent = {"unet": 0.0, "controlnet": 0.0}

    def timed(name: str, module: torch.nn.Module) -> None:
        start: list[float] = []
        module.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))
        module.register_forward_hook(
            lambda *_: spent.__setitem__(name, spent[name] + time.perf_counter() - start.pop())
        )

    timed("unet", pipe.unet)
    timed("controlnet", pipe.controlnet)
    args = {"height": size, "width": size, "num_inference_steps": steps, "output_type": "latent"}
    image = Image.fromarray(_control(size))
    plain, control = [], []
    with torch.no_grad():
        plain_pipe(PROMPT, **{**args, "num_inference_steps": 1})  # warm-up
        for _ in range(rounds):
            spent.update(unet=0.0, controlnet=0.0)
            plain_pipe(PROMPT, **args)
            plain.append(spent["unet"] / steps)
            spent.update(unet=0.0, controlnet=0.0)
            pipe(PROMPT, image=image, **args)
            control.append((spent["unet"] + spent["controlnet"]) / steps)
    return {"plain": min(plain), "control": min(control), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-controlnet")
    make.add_argument("--model", required=True)
    make.add_argument("--out", required=True)
    run = sub.add_parser("run")
    run.add_argument("--model", required=True, help="diffusers folder (the exported model)")
    run.add_argument("--controlnet", required=True, help="the exported ControlNet's folder")
    run.add_argument("--engines", required=True, help="engines exported with --controlnet")
    run.add_argument("--backend", default="auto")
    run.add_argument("--size", type=int, default=512)
    run.add_argument("--steps", type=int, default=4)
    run.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.command == "make-controlnet":
        make_controlnet(args.model, args.out)
        return
    a = ours(args.engines, args.backend, args.size, args.steps, args.rounds)
    b = theirs(args.model, args.controlnet, args.size, args.steps, args.rounds)
    result = {
        "size": args.size,
        "steps": args.steps,
        "trt_sd": a,
        "diffusers": b,
        "trt_sd_overhead": a["control"] / a["plain"],
        "diffusers_overhead": b["control"] / b["plain"],
        "trt_sd_over_diffusers_with_control": a["control"] / b["control"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
