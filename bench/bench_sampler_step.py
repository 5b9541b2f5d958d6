"""Time one DPM++ 2M sampler step: trt_sd.samplers (NumPy) vs diffusers' scheduler.step (torch).

Both step a 2x4x64x64 float32 latent (a CFG batch of one 512x512 image) with SD 1.5's scheduler
config through the same 2nd-order steps of a long schedule; the model output is a fixed array,
so only the sampler's own work is timed. Prints a small table and the ratio.

    python bench/bench_sampler_step.py [--steps-timed 400] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}
SHAPE = (2, 4, 64, 64)
WARMUP = 5
STEPS = 500  # 2nd-order steps all along (>= 15 steps, no repeated timesteps)


def time_loop(
    make_run: Callable[[], Callable[[int], None]], timed: int, repeats: int
) -> list[float]:
    """Microseconds per step for each repeat; each repeat uses a fresh sampler."""
    per_step = []
    for _ in range(repeats):
        run = make_run()
        for i in range(WARMUP):
            run(i)
        start = time.perf_counter()
        for i in range(WARMUP, WARMUP + timed):
            run(i)
        per_step.append((time.perf_counter() - start) / timed * 1e6)
    return per_step


def ours(timed: int) -> Callable[[], Callable[[int], None]]:
    from trt_sd.samplers import stepper

    rng = np.random.default_rng(0)
    eps = rng.standard_normal(SHAPE).astype(np.float32)
    start = rng.standard_normal(SHAPE).astype(np.float32)

    def make() -> Callable[[int], None]:
        st = stepper("dpm++2m", SD15, STEPS)
        state = {"x": start}

        def run(i: int) -> None:
            state["x"] = st.step(eps, i, state["x"])

        return run

    return make


def theirs(timed: int) -> Callable[[], Callable[[int], None]]:
    import torch
    from diffusers import DPMSolverMultistepScheduler

    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(SHAPE, generator=gen)
    start = torch.randn(SHAPE, generator=gen)

    def make() -> Callable[[int], None]:
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
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import torch

    names = [
        "diffusers DPMSolverMultistepScheduler.step (torch)",
        "trt_sd.samplers stepper('dpm++2m').step (numpy)",
    ]
    makers = [theirs(args.steps_timed), ours(args.steps_timed)]
    rows: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):  # interleaved, so background load hits both alike
        for name, make in zip(names, makers, strict=False):
            rows[name] += time_loop(make, args.steps_timed, 1)
    print(
        f"DPM++ 2M step, latent {'x'.join(map(str, SHAPE))} float32, "
        f"{args.steps_timed} steps x {args.repeats} repeats, torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"{'sampler':<52} {'median us':>10} {'min us':>8}")
    medians, mins = [], []
    for name, values in rows.items():
        medians.append(statistics.median(values))
        mins.append(min(values))
        print(f"{name:<52} {medians[-1]:>10.1f} {mins[-1]:>8.1f}")
    print(
        f"ratio trt_sd / diffusers: median {medians[1] / medians[0]:.3f}, "
        f"min {mins[1] / mins[0]:.3f}  (goal <= 0.1)"
    )


if __name__ == "__main__":
    main()
