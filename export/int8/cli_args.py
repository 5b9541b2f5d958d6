"""``trt-sd export`` INT8 flags and the INT8 lines of its summary (no torch at import)."""

from __future__ import annotations

import argparse
from typing import Any

from .layers import DEFAULT_EXCLUDE
from .qdq_graph import QDQ_FLAVOURS
from .recipe import CALIBRATORS, Int8Recipe

#: argparse destination -> Int8Recipe field
_FIELDS = {
    "calib_prompts": "calib_prompts",
    "calib_size": "calib_size",
    "calib_steps": "calib_steps",
    "calibrator": "calibrator",
    "percentile": "percentile",
    "qat": "qat",
    "qat_steps": "qat_steps",
    "qdq_flavour": "qdq_flavour",
    "int8_exclude": "exclude",
    "int8_report_images": "report_images",
}


def add_int8_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("INT8 (with --precision int8; the UNet is quantized)")
    defaults = Int8Recipe()
    group.add_argument(
        "--calib-prompts",
        metavar="FILE",
        default=None,
        help="calibration prompts, one per line (default: the bundled set for the bundled "
        "model, a generic set otherwise)",
    )
    group.add_argument(
        "--calib-size",
        type=int,
        metavar="N",
        default=None,
        help="prompts (= sampler trajectories) to calibrate on (default: min(64, prompts))",
    )
    group.add_argument(
        "--calib-steps",
        type=int,
        metavar="N",
        default=None,
        help=f"DPM++ 2M steps per trajectory, all captured (default {defaults.calib_steps})",
    )
    group.add_argument(
        "--calibrator",
        default=None,
        choices=CALIBRATORS,
        help=f"activation range calibrator (default {defaults.calibrator})",
    )
    group.add_argument(
        "--percentile",
        type=float,
        default=None,
        help=f"share of |activations| kept by the percentile calibrator (default "
        f"{defaults.percentile})",
    )
    group.add_argument(
        "--qat",
        action="store_true",
        default=None,
        help="quantization-aware fine-tuning by distillation from the fp32 UNet",
    )
    group.add_argument(
        "--qat-steps",
        type=int,
        metavar="N",
        default=None,
        help=f"QAT optimizer steps (default {defaults.qat_steps})",
    )
    group.add_argument(
        "--qdq-flavour",
        default=None,
        choices=QDQ_FLAVOURS,
        help="Q/DQ placement: tensorrt (s8, inputs only; TensorRT's recipe) or onnxruntime "
        "(u8 activations, Conv outputs quantized too, so ONNX Runtime's CPU int8 kernels run); "
        "default: the backend's",
    )
    group.add_argument(
        "--int8-exclude",
        metavar="PATTERNS",
        default=None,
        help="comma-separated module-name patterns kept float, replacing the default "
        f"({','.join(DEFAULT_EXCLUDE)})",
    )
    group.add_argument(
        "--int8-report-images",
        type=int,
        metavar="N",
        default=None,
        help="images the accuracy report generates in fp32 and int8 (default: 100 on the "
        "bundled model, 4 otherwise)",
    )


def int8_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The INT8 recipe fields the user set (None when none and the precision is not int8)."""
    chosen = {
        field: getattr(args, dest)
        for dest, field in _FIELDS.items()
        if getattr(args, dest, None) is not None
    }
    if not chosen and args.precision != "int8":
        return None
    return chosen


def describe(quantization: dict[str, Any] | None) -> str:
    """A few lines on the INT8 UNet for the export summary (empty when not quantized)."""
    if not quantization:
        return ""
    graph, report = quantization["graph"], quantization["report"]
    recipe = quantization["recipe"]
    lines = [
        f"\nINT8 UNet: {recipe['calibrator']} calibration on {recipe['calib_size']} prompts x "
        f"{recipe['calib_steps']} steps"
        + (", QAT" if recipe.get("qat") else "")
        + f"; {graph['flavour']} Q/DQ; {graph['size_reduction']:.0%} smaller than fp32",
        f"  UNet output cosine to fp32: mean {report['unet_cosine_mean']:.4f}, "
        f"min {report['unet_cosine_min']:.4f}",
    ]
    lines.append(
        f"  {report['images']} images vs fp32 (same noise): PSNR "
        f"{report['image_psnr_db']['mean']:.1f} dB mean"
    )
    accuracy = report.get("prompt_accuracy")
    if accuracy:
        lines.append(f"  prompt accuracy: int8 {accuracy['int8']:.1%}, fp32 {accuracy['fp32']:.1%}")
    return "\n".join(lines)
