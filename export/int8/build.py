"""Build the INT8 UNet of an export: calibrate, (QAT), export, rewrite to Q/DQ, report.

Order matters for memory and honesty: the fp32 reference trajectories of the report are
sampled before QAT changes the weights; the float graph is exported from the (fine-tuned)
module and verified against it at fp32 tolerance before it is rewritten; the torch UNet is
freed before ONNX Runtime loads the INT8 graph.
"""

from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from trt_sd.models import Component, NumericalError
from trt_sd.models.descriptors import UNET, VAE_DECODER

from ..build_context import BuildContext
from ..engine_build import build_tensorrt_engine
from ..ort_attention import fuse_attention
from ..stage_bar import StageBar
from .conditioning import PromptEncoder, take
from .ptq import calibrate
from .qdq_graph import insert_qdq
from .recipe import ResolvedRecipe
from .report import MIN_MEAN_COSINE, accuracy_report, onnxruntime_unet_fn, report_plan
from .trajectories import decode_images, sample_trajectories, torch_unet_fn

STAGES = ("load", "calib", "ref", "qat", "export", "verify", "q/dq", "report")


class Int8Stages(StageBar):
    STAGES = STAGES


def build_int8_component(builder: BuildContext, component: Component, key: str) -> dict[str, Any]:
    """The INT8 branch of :func:`trt_sd.export.component_build.build_component` (progress
    bar, optional TensorRT engine build of the Q/DQ graph, summary line)."""
    engine = builder.opts.builds_engines
    bar = Int8Stages(component.name, builder.progress, engine=engine)
    t0 = time.perf_counter()
    entry = build_int8_unet(builder, component, key, bar)
    if engine:
        bar.stage("engine")
        entry.update(
            build_tensorrt_engine(builder, component, builder.build / entry["file"], "int8")
        )
    entry["export_seconds"] = round(time.perf_counter() - t0, 2)
    assert builder.quantization is not None  # set by build_int8_unet
    report = builder.quantization["report"]
    graph = builder.quantization["graph"]
    accuracy = report.get("prompt_accuracy")
    bar.close(
        f"{component.name}: int8 ({graph['flavour']} Q/DQ) {graph['size_reduction']:.0%} smaller, "
        f"output cosine to fp32 {report['unet_cosine_mean']:.4f}, image PSNR "
        f"{report['image_psnr_db']['mean']:.1f} dB"
        + (
            f", prompt accuracy {accuracy['int8']:.0%} (fp32 {accuracy['fp32']:.0%})"
            if accuracy
            else ""
        )
    )
    return entry


def _digits_judge(model_dir: Path) -> Any | None:
    """The held-out digit classifier, for the bundled digits model (or a copy of it)."""
    from trt_sd.models import digits

    if not (model_dir / digits.HOLDOUT_FILE).is_file():
        return None
    return digits.DigitJudge(model_dir)


def _export_float_graph(
    builder: BuildContext, wrapper: Any, component: Component, folder: Path
) -> tuple[Path, list]:
    """Export the (possibly fine-tuned) float UNet; returns the graph path and the torch
    reference cases it must match (computed first, as the fp32 export does)."""
    from ..onnx_export import export_onnx, trace_sizes
    from ..verify import random_inputs, torch_reference, verification_sizes

    ckpt, opts = builder.ckpt, builder.opts
    rng = np.random.default_rng(0)
    feed_args = {
        "vocab_size": int(ckpt.text_config.get("vocab_size", 49408)),
        "num_train_timesteps": int(ckpt.scheduler_config.get("num_train_timesteps", 1000)),
    }
    num_up = len(ckpt.unet_config.get("block_out_channels", [0])) - 1
    sizes = trace_sizes(UNET, num_up, ckpt.vae_scale_factor)
    trace = random_inputs(component, sizes, "fp32", rng, **feed_args)
    cases = []
    for s in verification_sizes(builder.shapes):
        feeds = random_inputs(component, s, "fp32", rng, **feed_args)
        cases.append((feeds, torch_reference(wrapper, feeds)))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{UNET}.onnx"
    export_onnx(wrapper, component, trace, path, opset=opts.opset, fp16=False)
    return path, cases


def _save_graph(model: Any, path: Path) -> None:
    """Save, with the weights in ``<file>.data`` when over the protobuf limit."""
    import onnx

    from ..onnx_export import PROTOBUF_LIMIT, external_data_name
    from .qdq_graph import tensor_bytes

    weights = sum(tensor_bytes(t) for t in model.graph.initializer)
    if weights > PROTOBUF_LIMIT - (64 << 20):
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=external_data_name(path),
        )
    else:
        onnx.save_model(model, str(path))


def _files_bytes(path: Path) -> int:
    from ..onnx_export import external_data_name

    ext = path.parent / external_data_name(path)
    return path.stat().st_size + (ext.stat().st_size if ext.is_file() else 0)


def build_int8_unet(
    builder: BuildContext, component: Component, key: str, bar: Any
) -> dict[str, Any]:
    """Build ``unet.onnx`` in INT8 into ``builder.build``; returns its manifest entry and sets
    ``builder.quantization`` (the manifest's quantization record)."""
    import onnx
    import torch

    resolved: ResolvedRecipe = builder.int8
    recipe = resolved.recipe
    ckpt, _opts = builder.ckpt, builder.opts
    from .preflight import latent_shape

    shape = latent_shape(ckpt, builder.shapes)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 2)
        clock = now

    bar.stage("load")
    loader = builder.loader()
    wrapper = loader.wrapper(UNET, component)  # calibrated without residuals (zeros)
    f = builder.shapes.vae_scale_factor
    encoder = PromptEncoder(ckpt, loader, (shape[1] * f, shape[2] * f))
    judge = _digits_judge(ckpt.path) if ckpt.kind == "folder" else None
    plan = report_plan(
        int(recipe.report_images or 0),
        resolved.prompts,
        digits_model=judge is not None,
        seed=recipe.seed,
        steps=recipe.report_steps,
        guidance=float(recipe.guidance or 0.0),
    )
    calib_embeddings = encoder(resolved.prompts)
    uncond = encoder([""], negative=True)
    report_embeddings = encoder(plan.prompts) if plan.prompts else take(calib_embeddings, [])
    del encoder
    lap("load")

    bar.stage("calib")
    calibration = calibrate(
        wrapper, calib_embeddings, uncond, ckpt.scheduler_config, resolved, shape
    )
    lap("calibration")

    bar.stage("ref")
    reference = sample_trajectories(
        torch_unet_fn(wrapper),
        report_embeddings,
        uncond,
        ckpt.scheduler_config,
        latent_shape=shape,
        steps=plan.steps,
        guidance=plan.guidance,
        seed=plan.seed,
    )
    lap("reference")

    bar.stage("qat")
    ranges, qat_record = calibration.ranges, None
    if recipe.qat:
        from .qat import finetune

        torch.manual_seed(recipe.seed)
        ranges, qat_record = finetune(wrapper, calibration, recipe)
        lap("qat")

    bar.stage("export")
    float_dir = builder.build / ".unet-float"
    float_path, cases = _export_float_graph(builder, wrapper, component, float_dir)
    del wrapper
    gc.collect()
    lap("export")

    bar.stage("verify")
    from ..verify import verify

    float_record = verify(UNET, str(float_path), cases, "fp32")
    float_bytes = _files_bytes(float_path)
    lap("verify_float")

    bar.stage("q/dq")
    model = onnx.load(str(float_path))
    plan_ranges = {f"unet.{name}": r for name, r in ranges.items()}
    summary = insert_qdq(model, plan_ranges, recipe.qdq_flavour or "tensorrt")
    fused_attention = fuse_attention(model) if summary.flavour == "onnxruntime" else 0
    path = builder.build / f"{UNET}.onnx"
    _save_graph(model, path)
    del model
    shutil.rmtree(float_dir, ignore_errors=True)
    lap("qdq")

    bar.stage("report")
    int8_fn = onnxruntime_unet_fn(path, component)
    decoder = loader.wrapper(VAE_DECODER)
    scaling = float(ckpt.vae_config.get("scaling_factor", 0.18215))

    def int8_images() -> np.ndarray:
        traj = sample_trajectories(
            int8_fn,
            report_embeddings,
            uncond,
            ckpt.scheduler_config,
            latent_shape=shape,
            steps=plan.steps,
            guidance=plan.guidance,
            seed=plan.seed,
            capture=False,
        )
        return decode_images(decoder, traj.final_latents, scaling)

    reference_images = decode_images(decoder, reference.final_latents, scaling)
    report = accuracy_report(plan, reference, reference_images, int8_fn, int8_images, judge)
    lap("report")
    if report["unet_cosine_mean"] < MIN_MEAN_COSINE:
        raise NumericalError(
            f"unet: the INT8 graph's output agrees with fp32 only to cosine "
            f"{report['unet_cosine_mean']:.3f} on real sampler inputs (below "
            f"{MIN_MEAN_COSINE}); exclude more layers (--int8-exclude) or try --calibrator"
        )

    int8_bytes = _files_bytes(path)
    verification = {
        "max_rel_error": report["unet_max_rel_error"],
        "metric": "max|int8 - fp32| / max|fp32| on the report's real sampler inputs",
        "mean_cosine": report["unet_cosine_mean"],
        "min_mean_cosine": MIN_MEAN_COSINE,
        "reference": "torch fp32 (the checkpoint's weights, before any QAT)",
        "provider": "CPUExecutionProvider",
        "float_graph": float_record,
    }
    exporter = "trt_sd.export.int8 (float graph + explicit Q/DQ)"
    entry = builder.entry(
        component, path, "int8", verification, key, exporter,
        fp32_bytes=float_bytes, qdq_flavour=summary.flavour,
    )  # fmt: skip
    builder.quantization = {
        "component": UNET,
        "recipe": resolved.to_dict(),
        "calibration": calibration.summary(),
        "qat": qat_record,
        "graph": {
            "flavour": summary.flavour,
            "quantized_ops": summary.op_counts(),
            "output_quantized_convs": len(summary.output_quantized),
            "weight_only_layers": len(summary.weight_only),
            "fused_attention": fused_attention,
            "weight_bytes_fp32": summary.weight_bytes_before,
            "weight_bytes_int8": summary.weight_bytes_after,
            "file_bytes_fp32": float_bytes,
            "file_bytes_int8": int8_bytes,
            "size_reduction": round(1.0 - int8_bytes / float_bytes, 4),
        },
        "report": report,
        "seconds": seconds,
    }
    return entry
