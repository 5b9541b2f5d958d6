"""One request's sampler loop: a model call per step through :class:`~.denoise.DenoiseStep`.

``Pipeline.__call__`` runs it on the whole request; its independent chains (:mod:`.chains`,
split UNets) run it on slices of the batch. The batching engine has its own loop (many
requests at different steps share a call) over the same ``DenoiseStep``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from trt_sd.models.descriptors import UNET
from trt_sd.models.unet_stages import UNET_SHALLOW

from .denoise import Lane
from .progress import ProgressArg, progress_reporter


def run_unet(pipe: Any, i: int, feeds: dict[str, Any], timings: dict[str, float], cache: Any):
    """UNet call ``i``: the plain UNet, or DeepCache's full / shallow UNet
    (:class:`~.deepcache.DeepCacheState`); its time is added to ``timings["unet"]``."""
    if cache is None:
        return pipe._run(UNET, feeds, timings)
    full, shallow = pipe.engines[UNET], pipe.engines[UNET_SHALLOW]
    keep = full.kind == shallow.kind != "onnxruntime-cpu"  # the feature stays on the GPU
    t0 = time.perf_counter()
    outputs = cache.run(i, feeds, full, shallow, keep=keep)
    timings[UNET] = timings.get(UNET, 0.0) + time.perf_counter() - t0
    return outputs


def denoise(
    pipe: Any,
    req: Any,
    stepper: Any,
    x: np.ndarray,
    conditioning: dict[str, Any],
    timings: dict[str, float],
    progress: ProgressArg,
    cache: Any = None,
    calls: int | None = None,
    control: Any = None,
) -> np.ndarray:
    """The sampler loop of ``pipe`` (a :class:`~.pipeline.Pipeline`) for one lane: this
    request's rows. ``calls``: stop after that many model calls (``denoising_end``);
    ``cache``: DeepCache state; ``control``: the request's ControlNet images and scales."""
    step = pipe.denoise_step
    total = stepper.num_model_calls if calls is None else calls
    bar = progress_reporter(progress, total)
    # Overflow is caught and named (the component, or the sampler's latents); NumPy's
    # RuntimeWarnings would only add noise beside that one line.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        try:
            for i in range(total):
                x_in = np.asarray(stepper.scale_model_input(x, i), dtype=np.float32)
                ctl = control.at(i, stepper.num_model_calls) if control else None
                lane = Lane(x_in, stepper.timesteps[i], req.cfg, conditioning, ctl)
                outputs = run_unet(pipe, i, step.feeds([lane], timings), timings, cache)
                x = step.advance(req, stepper, i, x, step.output(outputs, i, total, x_in))
                if bar is not None:
                    bar(i + 1, total)
        finally:
            if bar is not None:
                bar(-1, total)
    return np.asarray(x, dtype=np.float32)
