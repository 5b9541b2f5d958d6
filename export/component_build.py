"""Export of one component: torch module -> verified ONNX (-> TensorRT engine) + its manifest entry.

:func:`build_component` is what :mod:`trt_sd.export.api` runs for every whole component that
cannot be reused; it works on a :class:`~trt_sd.export.build_context.BuildContext` (state,
cache key, manifest entry) and imports nothing above it.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import numpy as np

from trt_sd.models import Component
from trt_sd.models.errors import NumericalError

from .build_context import BuildContext, fuses_attention
from .engine_build import build_tensorrt_engine
from .lora_map import LORA_COMPONENTS, lora_fingerprints, write_lora_map
from .stage_bar import StageBar

__all__ = ["build_component"]


def build_component(ctx: BuildContext, component: Component, key: str) -> dict[str, Any]:
    """Load, export and verify one component; returns its manifest entry."""
    from .onnx_export import EXPORTER, export_onnx, trace_sizes
    from .verify import random_inputs, torch_reference, verification_sizes, verify

    name, precision = component.name, ctx.precisions[component.name]
    if precision == "int8":
        from .int8.build import build_int8_component

        return build_int8_component(ctx, component, key)
    ckpt, opts = ctx.ckpt, ctx.opts
    bar = StageBar(name, ctx.progress, engine=opts.builds_engines)
    t0 = time.perf_counter()
    bar.stage("load")
    module = ctx.loader().wrapper(name, component)
    rng = np.random.default_rng(0)
    feed_args = {
        "vocab_size": int(ckpt.text_config.get("vocab_size", 49408)),
        "num_train_timesteps": int(ckpt.scheduler_config.get("num_train_timesteps", 1000)),
    }
    num_up = len(ckpt.unet_config.get("block_out_channels", [0])) - 1
    trace = random_inputs(
        component,
        trace_sizes(name, num_up, ckpt.vae_scale_factor),
        precision,
        rng,
        **feed_args,
    )
    bar.stage("torch")  # reference outputs first, so the module is freed before verification
    cases = []
    for sizes in verification_sizes(ctx.shapes):
        feeds = random_inputs(component, sizes, precision, rng, **feed_args)
        cases.append((feeds, torch_reference(module, feeds)))
    bar.stage("export")
    path = ctx.build / f"{name}.onnx"
    export_onnx(module, component, trace, path, opset=opts.opset, fp16=precision == "fp16")
    fingerprints = (
        lora_fingerprints(module, precision == "fp16") if name in LORA_COMPONENTS else None
    )
    del module
    gc.collect()
    fused = 0
    if fuses_attention(opts.backend, precision):
        from .ort_attention import fuse_attention_file

        candidate = path.with_name(path.name + ".fused")
        fused = fuse_attention_file(path, candidate)  # the plain graph stays at `path`
    bar.stage("verify")
    record = None
    if fused:
        # The fusion is an optimisation: a graph it got wrong (an attention variant it did not
        # expect) is dropped, and the plain graph must then verify on its own.
        try:
            record = verify(name, str(candidate), cases, precision)
            candidate.replace(path)
        except NumericalError as e:
            fused = 0
            ctx.log(f"{name}: fused attention failed verification ({e}); kept the plain graph")
        finally:
            candidate.unlink(missing_ok=True)
    if record is None:
        record = verify(name, str(path), cases, precision)
    bar.stage("hash")
    extra: dict[str, Any] = {"fused_attention": fused} if fused else {}
    if fingerprints is not None:  # where run-time LoRAs patch this engine (export/lora_map.py)
        extra.update(write_lora_map(fingerprints, path, name))
    entry = ctx.entry(component, path, precision, record, key, EXPORTER, **extra)
    if opts.builds_engines:
        bar.stage("engine")
        entry.update(build_tensorrt_engine(ctx, component, path, precision))
    entry["export_seconds"] = round(time.perf_counter() - t0, 2)
    bar.close(
        f"{name}: {precision} max error {record['max_rel_error']:.2e} relative "
        f"({record['max_abs_error']:.2e} abs, tolerance {record['tolerance']:g})"
    )
    return entry
