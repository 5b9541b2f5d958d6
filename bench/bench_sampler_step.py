"""Time one DPM++ 2M sampler step: trt_sd.samplers (NumPy) vs diffusers' scheduler.step (torch).

Both step a 2x4x64x64 float32 latent (a CFG batch of one 512x512 image) with SD 1.5's scheduler
config through the same 2nd-order steps of a long schedule; the model output is a fixed array,
so only the sampler's own work is timed.

Each step is timed on its own and the two samplers alternate in rounds (a fresh sampler per
round), so background load hits both alike; the table gives per-step percentiles. On a shared
machine the low percentiles are the steps no other process interrupted, and the ratio of like
percentiles is the figure to compare (docs/benchmarks.md, "Sampler step").

    python bench/bench_sampler_step.py [--steps-timed 400] [--rounds 8]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np

from trt_sd.models.scheduler_configs import sd15_scheduler_config

SD15 = sd15_scheduler_config()
SHAPE = (2, 4, 64, 64)
WARMUP = 5
STEPS = 500  # 2nd-order steps all along (>= 15 steps, no repeated timesteps)
PERCENTILES = (10, 25, 50)

Run = Callable[[int], None]


def time_steps(make_run: Callable[[], Run], timed: int) -> list[float]:
    """Microseconds of each of ``timed`` steps of a fresh sampler (after a short warm-up)."""
    run, clock = make_run(), time.perf_counter_ns
    for i in range(WARMUP):
        run(i)
    times = []
    for i in range(WARMUP, WARMUP + timed):
        start = clock()
        run(i)
        times.append((clock() - start) / 1e3)
    return times


def ours() -> Callable[[], Run]:
    from trt_sd.samplers import stepper

    rng = np.random.default_rng(0)
    eps = rng.standard_normal(SHAPE).astype(np.float32)
    start = rng.standard_normal(SHAPE).astype(np.float32)

    def make() -> Run:
        st = stepper("dpm++2m", SD15, STEPS)
        state = {"x": start}

        def run(i: int) -> None:
            state["x"] = st.step(eps, i, state["x"])

        return run

    return make


def theirs() -> Callable[[], Run]:
    import torch
    from diffusers import DPMSolverMultistepScheduler

    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(SHAPE, generator=gen)
    start = torch.randn(SHAPE, generator=gen)

    def make() -> Run:
        sched = DPMSolverMultistepScheduler.from_config(SD15)
        sched.set_timesteps(STEPS)
        timesteps = sched.timesteps
        state = {"x": start}

        def run(i: int) -> None:
            state["x"] = sched.step(eps, timesteps[i], state["x"]).prev_sample

        return run

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-timed", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()

    import torch

    names = [
        "diffusers DPMSolverMultistepScheduler.step (torch)",
        "trt_sd.samplers stepper('dpm++2m').step (numpy)",
    ]
    makers = [theirs(), ours()]
    times: dict[str, list[float]] = {name: [] for name in names}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):  # interleaved, so background load hits both alike
        for name, make in zip(names, makers, strict=True):
            times[name] += time_steps(make, args.steps_timed)
    load_after = os.getloadavg()[0]
    print(
        f"DPM++ 2M step, latent {'x'.join(map(str, SHAPE))} float32, {args.rounds} rounds x "
        f"{args.steps_timed} steps each, torch threads {torch.get_num_threads()}, "
        f"load average {load_before:.2f} -> {load_after:.2f}"
    )
    head = "  ".join(f"{f'p{p} us':>8}" for p in PERCENTILES)
    print(f"{'sampler':<52} {head}")
    rows = {name: np.percentile(values, PERCENTILES) for name, values in times.items()}
    for name, row in rows.items():
        print(f"{name:<52} " + "  ".join(f"{v:>8.1f}" for v in row))
    ratio = rows[names[1]] / rows[names[0]]
    cells = ", ".join(f"p{p} {r:.3f}" for p, r in zip(PERCENTILES, ratio, strict=True))
    print(f"ratio trt_sd / diffusers: {cells}  (goal <= 0.1)")


if __name__ == "__main__":
    main()
