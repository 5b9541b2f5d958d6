"""Export of one component: torch module -> verified ONNX (-> TensorRT engine) + its manifest entry.

:func:`build_component` is what :class:`trt_sd.export.api._Builder` runs for every component
that cannot be reused; the UNet partition and INT8 paths reuse its engine build and progress
bar.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trt_sd.models import Component
from trt_sd.models.errors import NumericalError

from . import engine_dir
from .checkpoint import sha256_file
from .options import ExportOptions

if TYPE_CHECKING:
    from .api import _Builder as Builder


def build_component(builder: Builder, component: Component, key: str) -> dict[str, Any]:
    """Load, export and verify one component; returns its manifest entry."""
    from .onnx_export import EXPORTER, export_onnx, external_data_name, trace_sizes
    from .verify import random_inputs, torch_reference, verification_sizes, verify

    name, precision = component.name, builder.precisions[component.name]
    if precision == "int8":
        from .int8.build import build_int8_component

        return build_int8_component(builder, component, key)
    ckpt, opts = builder.ckpt, builder.opts
    bar = StageBar(name, builder.progress, engine=opts.backend == "tensorrt")
    t0 = time.perf_counter()
    bar.stage("load")
    module = builder.loader().wrapper(name)
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
    for sizes in verification_sizes(builder.shapes):
        feeds = random_inputs(component, sizes, precision, rng, **feed_args)
        cases.append((feeds, torch_reference(module, feeds)))
    bar.stage("export")
    path = builder.build / f"{name}.onnx"
    export_onnx(module, component, trace, path, opset=opts.opset, fp16=precision == "fp16")
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
            builder._log(f"{name}: fused attention failed verification ({e}); kept the plain graph")
        finally:
            candidate.unlink(missing_ok=True)
    if record is None:
        record = verify(name, str(path), cases, precision)
    bar.stage("hash")
    entry: dict[str, Any] = {
        "file": path.name,
        "sha256": sha256_file(path),
        "backend": opts.backend,
        "precision": precision,
        "inputs": [t.to_dict(precision) for t in component.inputs],
        "outputs": [t.to_dict(precision) for t in component.outputs],
        "shape_range": builder.shapes.to_dict(),
        "verification": record,
        "cache_key": key,
        "opset": opts.opset,
        "exporter": EXPORTER,
        "bytes": path.stat().st_size,
    }
    if fused:
        entry["fused_attention"] = fused
    ext = path.parent / external_data_name(path)
    if ext.is_file():
        entry["external_data"] = {"file": ext.name, "sha256": sha256_file(ext)}
        entry["bytes"] += ext.stat().st_size
    if opts.backend == "tensorrt":
        bar.stage("engine")
        entry.update(build_tensorrt_engine(builder, component, path, precision))
    entry["export_seconds"] = round(time.perf_counter() - t0, 2)
    bar.close(
        f"{name}: {precision} max error {record['max_rel_error']:.2e} relative "
        f"({record['max_abs_error']:.2e} abs, tolerance {record['tolerance']:g})"
    )
    return entry


def fuses_attention(backend: str, precision: str) -> bool:
    """Float graphs for ONNX Runtime get ``com.microsoft.MultiHeadAttention`` (see
    :mod:`.ort_attention`; INT8 has its own pass); TensorRT fuses attention itself and has no
    such op."""
    return backend == "onnxruntime" and precision in ("fp32", "fp16")


def attention_revision(backend: str, precision: str) -> int | None:
    """The fusion pass revision for the content key of a graph it touches (INT8: its
    ``onnxruntime`` Q/DQ flavour fuses too; the recipe's flavour is in the key already)."""
    if precision != "int8" and not fuses_attention(backend, precision):
        return None
    from .ort_attention import REVISION

    return REVISION


def trt_settings(opts: ExportOptions) -> dict[str, Any]:
    return {
        "optimization_level": opts.trt_optimization_level,
        "version_compatible": opts.trt_version_compatible,
        "hardware_compatible": opts.trt_hardware_compatible,
        "static_shapes": opts.trt_static_shapes,
    }


def build_tensorrt_engine(
    builder: Builder, component: Component, onnx_path: Path, precision: str
) -> dict[str, Any]:
    """Build (or take from the engine cache) the TensorRT engine of a verified ONNX graph and
    place it in the engine directory; returns the manifest fields that change.

    The ONNX graph stays beside the engine (``onnx_file``): it is what a rebuild on another
    GPU or TensorRT version starts from.
    """
    from trt_sd.models.paths import cache_root

    from .options import trt_build_options
    from .tensorrt_build import build_engine

    options = trt_build_options(builder.opts, precision)
    result = build_engine(onnx_path, component, builder.shapes, options, cache_root() / "tensorrt")
    engine_dir.link_or_copy(result.engine, builder.build / result.engine.name)
    return {
        "file": result.engine.name,
        "sha256": sha256_file(result.engine),
        "backend": "tensorrt",
        "onnx_file": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "tensorrt_version": result.tensorrt_version,
        "compute_capability": result.compute_capability,
        "engine_cache_key": result.cache_key,
        "build_seconds": round(result.seconds, 2),
        "engine_bytes": result.size_bytes,
        **trt_settings(builder.opts),
    }


class StageBar:
    """A tqdm bar per component whose steps are the export stages."""

    STAGES = ("load", "torch", "export", "verify", "hash")

    def __init__(self, name: str, enabled: bool, engine: bool = False) -> None:
        self.name = name
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=len(self.STAGES) + int(engine),
                desc=f"{name:<12} {'':<6}",
                file=sys.stderr,
                bar_format="{desc} {bar:20} {n}/{total} [{elapsed}]",
            )
        self._started = False

    def stage(self, label: str) -> None:
        if self.bar is not None:
            if self._started:
                self.bar.update(1)
            self._started = True
            self.bar.set_description_str(f"{self.name:<12} {label:<6}")

    def close(self, message: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_description_str(f"{self.name:<12} {'done':<6}")
            self.bar.close()
            self.bar.write(message, file=sys.stderr)
