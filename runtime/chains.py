"""Denoise the images of a batch as independent chains, one thread each.

The images of a batch never interact during denoising (CFG pairs each image's own rows), so
they can advance at their own pace. A staged UNet on several devices
(:mod:`trt_sd.runtime.multidevice`) needs that: while one chain's micro-batch is in stage 2,
another's can be in stage 1, and every device stays busy.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import numpy as np

from trt_sd.models.descriptors import UNET

from .denoise import take_rows
from .multidevice import StagedUNet
from .sampling_loop import denoise


def run_chains(
    pipe: Any,
    req: Any,
    x: np.ndarray,
    conditioning: dict,
    timings: dict,
    progress: Any,
    calls: int | None = None,
) -> np.ndarray:
    """Denoise the images of a batch as independent chains, one thread each, so a staged
    UNet on several devices has a micro-batch for every device at every moment.

    Image ``i`` keeps its seed ``seed + i`` and its rows of the conditioning
    (``[uncond..., cond...]``), so the images equal those of one batched chain. The UNet time
    reported is that of the slowest chain (the chains' UNet calls overlap).
    """
    unet: StagedUNet = pipe.engines[UNET]
    chains = min(req.batch, unet.num_devices)
    bounds = np.linspace(0, req.batch, chains + 1).astype(int)
    # Two micro-batches per device in flight: the pipeline's fill and drain at the ends of a
    # generation cost one micro-batch's stage time, so smaller micro-batches waste less.
    micro = 1 if unet.num_devices == 1 else -(-2 * unet.num_devices // chains)
    results: list[Any] = [None] * chains
    chain_timings: list[dict[str, float]] = [{} for _ in range(chains)]

    def chain(c: int) -> None:
        lo, hi = int(bounds[c]), int(bounds[c + 1])
        sub = replace(
            req,
            prompts=req.prompts[lo:hi],
            negative_prompts=req.negative_prompts[lo:hi],
            seed=req.seed + lo,
            batch=hi - lo,
        )
        rows = take_rows(conditioning, lo, hi, req.batch, req.cfg)
        try:
            with unet.micro_batching(micro):
                results[c] = denoise(
                    pipe,
                    sub,
                    pipe.make_stepper(sub),
                    x[lo:hi],
                    rows,
                    chain_timings[c],
                    progress if c == 0 else None,
                    None,
                    calls,
                )
        except BaseException as e:  # re-raised in the caller
            results[c] = e

    threads = [threading.Thread(target=chain, args=(c,)) for c in range(1, chains)]
    for t in threads:
        t.start()
    chain(0)
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    for name in {n for t in chain_timings for n in t}:
        timings[name] = timings.get(name, 0.0) + max(t.get(name, 0.0) for t in chain_timings)
    return np.concatenate(results)
