"""Export the UNet as sections: pipeline stages (``--split-unet N``) or DeepCache's full +
shallow UNets (``--deepcache``), each its own verified ONNX graph (and TensorRT engine).

Planning: a partition cuts the layer list where the most expensive stage is cheapest, by
FLOPs counted per layer at the optimum shape (so a 2-way split of SD 1.5 cuts inside the up
path, where most of the work is). The plan is keyed by the UNet weights, split count and shape
range; an unchanged plan is read back from the previous manifest without loading torch.

Verification runs the exported graphs the way the runtime will, on ONNX Runtime CPU: stages in
a chain, each fed by the previous graphs' outputs; DeepCache's shallow UNet fed with the feature
the full graph returned. Every output must match the torch UNet's own tensor within the
precision's tolerance (``export.verify.TOLERANCE``); for a partition the last stage's error is
the whole chain's error against the unsplit UNet.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trt_sd.models import Component, InputError
from trt_sd.models.descriptors import UNET
from trt_sd.models.unet_plans import DeepCachePlan, UNetPartition, check_split_count
from trt_sd.models.unet_stages import UNetLayout

from . import engine_dir
from .build_context import BuildContext, fuses_attention
from .engine_build import build_tensorrt_engine
from .stage_bar import StageBar

#: Manifest keys of the two plans.
PARTITION_KEY = "unet_partition"
DEEPCACHE_KEY = "unet_deepcache"


@dataclass
class SectionPlan:
    """The sections to export, in run order, and the manifest record describing them."""

    record_key: str
    record: dict[str, Any]
    sections: list[tuple[Component, list[int]]]
    layout: UNetLayout
    unet: Any = None  # the torch UNet when planning had to load it (reused by the export)


def check_unet_cut(split_unet: Any, deepcache: Any, precision: str, layout: UNetLayout) -> None:
    """Refuse impossible requests before anything heavy runs (one-line InputErrors)."""
    if split_unet is None and deepcache is None:
        return
    if split_unet is not None and deepcache is not None:
        raise InputError("--split-unet and --deepcache cannot be combined in one export")
    if precision == "int8":
        raise InputError("--split-unet / --deepcache need --precision fp32 or fp16, not int8")
    if split_unet is not None:
        check_split_count(layout, split_unet)
    else:
        if isinstance(deepcache, bool) or not isinstance(deepcache, int):
            raise InputError(f"DeepCache skip branch must be an integer, got {deepcache!r}")
        DeepCachePlan(layout, deepcache)


def _opt_feeds(builder: BuildContext, component: Component) -> dict[str, np.ndarray]:
    """One row of random UNet inputs at the optimum latent size (what FLOPs are counted on)."""
    from .verify import axis_sizes

    shapes = builder.shapes
    sizes = axis_sizes(1, shapes.height.opt, shapes.width.opt, shapes.vae_scale_factor)
    return _random_unet_inputs(builder, component, sizes, np.random.default_rng(0))


def _random_unet_inputs(
    builder: BuildContext, component: Component, sizes: dict[str, int], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    from .verify import random_inputs

    ckpt = builder.ckpt
    return random_inputs(
        component,
        sizes,
        "fp32",
        rng,
        vocab_size=int(ckpt.text_config.get("vocab_size", 49408)),
        num_train_timesteps=int(ckpt.scheduler_config.get("num_train_timesteps", 1000)),
    )


def plan_sections(
    builder: BuildContext, split_unet: int | None, deepcache: int | None
) -> SectionPlan:
    """The sections of this export (loads the torch UNet only to count FLOPs of a new split)."""
    layout = _layout(builder.ckpt)
    if deepcache is not None:
        dc = DeepCachePlan(layout, deepcache)
        sections = [(dc.full(), list(range(len(layout)))), (dc.shallow(), dc.shallow_layers)]
        return SectionPlan(DEEPCACHE_KEY, dc.to_dict(), sections, layout)
    assert split_unet is not None
    plan_key = engine_dir.cache_key(
        {
            "plan": PARTITION_KEY,
            "weights": builder.ckpt.weights_hash(UNET),
            "stages": split_unet,
            "shape_range": builder.shapes.to_dict(),
            "layers": [layer.name for layer in layout.layers],  # this version's layer list
        }
    )
    previous = builder.previous.raw.get(PARTITION_KEY) if builder.previous else None
    unet = None
    if previous and previous.get("plan_key") == plan_key:
        partition = UNetPartition.from_dict(previous, builder.ckpt.dims, layout.base)
        record = dict(previous)
    else:
        from .unet_sections import layer_costs, torch_feeds

        unet = builder.loader().wrapper(UNET).unet
        costs = layer_costs(unet, layout, torch_feeds(_opt_feeds(builder, layout.base)))
        partition = UNetPartition.balanced(layout, split_unet, costs)
        record = {**partition.to_dict(), "plan_key": plan_key}
    sections = [(comp, partition.stage_layers(k)) for k, comp in enumerate(partition.components())]
    return SectionPlan(PARTITION_KEY, record, sections, layout, unet)


def section_key(ctx: BuildContext, component: Component, plan: SectionPlan) -> str:
    """Cache key of one section graph: the usual component inputs plus the section's I/O."""
    section = {
        "section": [component.input_names, component.output_names],
        "layers": [plan.layout.layers[i].name for s in plan.sections for i in s[1]],
    }
    return ctx.cache_key(component, section)


def build_sections(
    builder: BuildContext, plan: SectionPlan
) -> tuple[dict[str, dict[str, Any]], bool]:
    """Manifest entries of every section (reused when all are unchanged); ``True`` if reused."""
    keys = {comp.name: section_key(builder, comp, plan) for comp, _ in plan.sections}
    reused = {name: builder.reusable(name, key) for name, key in keys.items()}
    if all(entry is not None for entry in reused.values()):
        return {name: dict(e) for name, e in reused.items() if e is not None}, True
    return _export_sections(builder, plan, keys), False


def _export_sections(
    builder: BuildContext, plan: SectionPlan, keys: dict[str, str]
) -> dict[str, dict[str, Any]]:
    from .onnx_export import EXPORTER, export_onnx, trace_sizes
    from .ort_attention import fuse_attention_file
    from .unet_sections import UNetSection, check_supported, torch_env
    from .verify import verification_sizes

    ckpt, opts = builder.ckpt, builder.opts
    precision = builder.precisions[UNET]
    layout = plan.layout

    labels = ("load", "torch", *(f"export{k}" for k in range(len(plan.sections))), "verify")

    class SectionStages(StageBar):
        STAGES = labels  # more stages than a single graph has

    label = f"unet x{len(plan.sections)}"
    bar = SectionStages(label, builder.progress, engine=opts.builds_engines)
    t0 = time.perf_counter()
    bar.stage("load")
    unet = plan.unet if plan.unet is not None else builder.loader().wrapper(UNET).unet
    plan.unet = None  # freed before ONNX Runtime loads the graphs (peak memory)
    check_supported(unet)
    rng = np.random.default_rng(0)
    num_up = len(ckpt.unet_config.get("block_out_channels", [0])) - 1
    trace_env = torch_env(
        unet,
        layout,
        _random_unet_inputs(
            builder, layout.base, trace_sizes(UNET, num_up, ckpt.vae_scale_factor), rng
        ),
    )
    bar.stage("torch")
    cases = [
        torch_env(unet, layout, _random_unet_inputs(builder, layout.base, sizes, rng))
        for sizes in verification_sizes(builder.shapes)
    ]
    paths, fused = {}, {}
    for k, (comp, layers) in enumerate(plan.sections):
        bar.stage(f"export{k}")
        module = UNetSection(unet, layout, layers, comp.input_names, comp.output_names)
        feeds = {t.name: trace_env[t.name].astype(t.resolved_dtype(precision)) for t in comp.inputs}
        path = builder.build / f"{comp.name}.onnx"
        export_onnx(module, comp, feeds, path, opset=opts.opset, fp16=precision == "fp16")
        if fuses_attention(opts.backend, precision):  # before verification, like whole graphs
            fused[comp.name] = fuse_attention_file(path)
        paths[comp.name] = path
        del module
    del unet, trace_env
    gc.collect()
    bar.stage("verify")
    records = verify_chain(
        [c for c, _ in plan.sections], paths, cases, precision, layout.base.input_names
    )
    entries = {}
    for comp, _ in plan.sections:
        extra = {"fused_attention": fused[comp.name]} if fused.get(comp.name) else {}
        path, record, key = paths[comp.name], records[comp.name], keys[comp.name]
        entries[comp.name] = builder.entry(comp, path, precision, record, key, EXPORTER, **extra)
    if opts.builds_engines:
        bar.stage("engine")
        for comp, _ in plan.sections:
            entries[comp.name].update(
                build_tensorrt_engine(builder, comp, paths[comp.name], precision)
            )
    seconds = round(time.perf_counter() - t0, 2)
    for entry in entries.values():
        entry["export_seconds"] = seconds
    worst = max(r["max_rel_error"] for r in records.values())
    bar.close(
        f"unet: {len(plan.sections)} sections ({', '.join(entries)}), {precision}, max error "
        f"{worst:.2e} relative (tolerance {records[plan.sections[0][0].name]['tolerance']:g})"
    )
    return entries


def verify_chain(
    components: Sequence[Component],
    paths: dict[str, Path],
    cases: Sequence[dict[str, np.ndarray]],
    precision: str,
    unet_inputs: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Run the section graphs in order on ONNX Runtime CPU, each fed by the UNet inputs and
    the earlier graphs' outputs, and compare every output with the torch tensor of the same
    name (``cases``: torch environments holding every tensor of the layout)."""
    import onnxruntime as ort

    from .verify import PROVIDER, TOLERANCE, VerificationError

    tolerance = TOLERANCE[precision]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sessions = {
        c.name: ort.InferenceSession(str(paths[c.name]), so, providers=[PROVIDER])
        for c in components
    }
    worst = {c.name: [0.0, 0.0] for c in components}
    shapes: dict[str, list] = {c.name: [] for c in components}
    t0 = time.perf_counter()
    for env in cases:
        # Only the UNet's own inputs come from outside; everything else from earlier graphs.
        onnx_env = {name: env[name] for name in unet_inputs}
        for comp in components:
            feeds = {t.name: _as(onnx_env[t.name], t, precision) for t in comp.inputs}
            shapes[comp.name].append({k: list(v.shape) for k, v in feeds.items()})
            outputs = sessions[comp.name].run(comp.output_names, feeds)
            for name, value in zip(comp.output_names, outputs, strict=True):
                reference = env[name]
                if value.shape != reference.shape or not np.isfinite(value).all():
                    raise VerificationError(
                        f"{comp.name}: output {name} has shape {list(value.shape)} or "
                        f"non-finite values (torch: {list(reference.shape)})"
                    )
                err = float(np.abs(value.astype(np.float64) - reference).max())
                rel = err / max(float(np.abs(reference).max()), 1e-12)
                worst[comp.name] = [max(worst[comp.name][0], err), max(worst[comp.name][1], rel)]
                onnx_env[name] = value
    records = {}
    for comp in components:
        max_abs, max_rel = worst[comp.name]
        if max_rel > tolerance:
            raise VerificationError(
                f"{comp.name}: exported {precision} section differs from torch by "
                f"{max_rel:.3g} (max|diff| / max|torch|), above the tolerance {tolerance:g}"
            )
        records[comp.name] = {
            "max_abs_error": max_abs,
            "max_rel_error": max_rel,
            "tolerance": tolerance,
            "metric": "max|onnx - torch| / max|torch|, fed by the earlier sections' outputs",
            "reference": "torch fp32 (whole UNet)",
            "provider": PROVIDER,
            "shapes": shapes[comp.name],
            "seconds": round(time.perf_counter() - t0, 3),
        }
    return records


def _as(value: np.ndarray, spec: Any, precision: str) -> np.ndarray:
    return np.ascontiguousarray(value, dtype=spec.resolved_dtype(precision))


def _layout(ckpt: Any) -> UNetLayout:
    """The layer list of the checkpoint's UNet, its inputs those of the family's UNet."""
    base = ckpt.family_spec.components(ckpt.dims)[UNET]
    return UNetLayout.from_unet_config(ckpt.unet_config, ckpt.dims, base)


def resolve_unet_cut(
    split_unet: Any, deepcache: Any, precision: str, ckpt: Any
) -> tuple[int | None, int | None] | None:
    """Validated ``(split_unet, deepcache_branch)``, or None when the UNet stays whole."""
    if split_unet is None and deepcache is None:
        return None
    family = ckpt.family_spec
    for feature, flag, value in (
        ("split_unet", "--split-unet", split_unet),
        ("deepcache", "--deepcache", deepcache),
    ):
        if value is not None and feature not in family.features:
            raise InputError(f"{flag} is not available for {family.label} models yet")
        if value is not None and ckpt.dims.time_cond_proj_dim:  # the layer list has no input
            raise InputError(f"{flag} is not available for LCM-distilled UNets yet")
    layout = _layout(ckpt)
    check_unet_cut(split_unet, deepcache, precision, layout)
    return split_unet, deepcache


def build_unet_sections(
    builder: BuildContext, split_unet: int | None, deepcache: int | None
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], bool]:
    """(manifest entries, manifest records, reused?) of the UNet sections of an export."""
    plan = plan_sections(builder, split_unet, deepcache)
    entries, reused = build_sections(builder, plan)
    if reused:
        builder.log(f"{', '.join(entries)}: unchanged, reused from {builder.out}")
    return entries, {plan.record_key: plan.record}, reused
