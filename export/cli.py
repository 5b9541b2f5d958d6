"""``trt-sd export``: checkpoint -> engine directory, with a summary table.

``add_arguments`` imports nothing heavy; torch and friends load inside ``main`` (through
:func:`trt_sd.export.export_model`), so ``trt-sd export --help`` is instant.
"""

from __future__ import annotations

import argparse
import os

from trt_sd.models import Manifest, default_engine_dir

from .int8.cli_args import add_int8_arguments, describe, int8_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="diffusers folder (model_index.json) or single .safetensors checkpoint "
        "(default: the bundled model)",
    )
    parser.add_argument(
        "--out", default=None, help=f"engine directory to write (default: {default_engine_dir()})"
    )
    parser.add_argument("--precision", default="fp32", help="fp32 | fp16 | int8 (default fp32)")
    parser.add_argument(
        "--backend",
        default="auto",
        help="auto | onnxruntime | tensorrt | tensorrt-rtx (default auto: TensorRT where a GPU "
        "and TensorRT are here, else onnxruntime; tensorrt-rtx builds on any machine)",
    )
    parser.add_argument(
        "--height", default=None, help="H, MIN:MAX or MIN:OPT:MAX pixels (default: native)"
    )
    parser.add_argument(
        "--width", default=None, help="W, MIN:MAX or MIN:OPT:MAX pixels (default: native)"
    )
    parser.add_argument("--batch", default="1:4", help="images per call, MIN:MAX (default 1:4)")
    parser.add_argument(
        "--prompt-chunks",
        type=int,
        default=3,
        help="longest prompt the UNet takes, in 75-token chunks (default 3: 225 tokens); "
        "longer prompts are truncated",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 17-20 (default 17)")
    parser.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:SCALE]",
        help="fuse a LoRA .safetensors file into the weights at SCALE (default 1); repeatable",
    )
    parser.add_argument(
        "--vae-fp16", action="store_true", help="export the VAE in fp16 too (it may overflow)"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load pickle checkpoints (.ckpt/.bin/.pt): they run code when loaded",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="for a single .safetensors file: local diffusers folder with its configs and "
        "tokenizer",
    )
    trt = parser.add_argument_group("TensorRT (with --backend tensorrt or tensorrt-rtx)")
    trt.add_argument(
        "--trt-opt-level", type=int, default=3, help="builder optimisation level 0-5 (default 3)"
    )
    trt.add_argument(
        "--version-compatible",
        action="store_true",
        help="engines that load on later runtimes of the same major version (slightly slower)",
    )
    trt.add_argument(
        "--hardware-compatible",
        default="none",
        help="none | ampere+ | same-cc: engines that run on other GPUs (default none)",
    )
    trt.add_argument(
        "--static-shapes",
        action="store_true",
        help="fix every shape at its optimum so the runtime can capture CUDA graphs",
    )
    trt.add_argument(
        "--refittable",
        action="store_true",
        help="engines whose weights can be refit after load (LoRA); slightly larger",
    )
    rtx = parser.add_argument_group("TensorRT-RTX (with --backend tensorrt-rtx)")
    rtx.add_argument(
        "--compute-capability",
        default=None,
        metavar="LIST",
        help="GPU targets, e.g. 8.6,8.9 or 120 (default: all that TensorRT-RTX supports)",
    )
    rtx.add_argument(
        "--runtime-cache",
        default=None,
        metavar="PATH",
        help="where the runtime keeps TensorRT-RTX's JIT cache (relative: inside the engine "
        "directory; default ~/.cache/trt-sd/tensorrt-rtx/runtime-cache)",
    )
    add_int8_arguments(parser)
    unet = parser.add_argument_group("UNet sections")
    unet.add_argument(
        "--split-unet",
        type=int,
        metavar="N",
        help="export the UNet as N pipeline stages, for `trt-sd run --devices` on N devices",
    )
    unet.add_argument(
        "--deepcache",
        type=int,
        nargs="?",
        const=0,
        metavar="BRANCH",
        help="add DeepCache: the UNet also returns the feature at skip BRANCH (default 0, the "
        "shallowest) and a shallow UNet reads it; run with `--deepcache N`",
    )
    parser.add_argument(
        "--controlnet",
        action="append",
        default=None,
        metavar="DIR_OR_FILE",
        help="export a ControlNet (diffusers folder, or .safetensors with config.json beside "
        "it) and a UNet that takes its residuals; repeat for several",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    # Before torch loads: OpenMP threads that sleep instead of spinning between ops. INT8
    # calibration makes thousands of small UNet calls; on a shared 2-core machine spinning made
    # each call 2-4x slower (bundled model, batch 128: 1.0-1.2 s spinning, 0.3-0.5 s passive).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from trt_sd.export import export_model

    manifest = export_model(
        args.model,
        args.out,
        precision=args.precision,
        backend=args.backend,
        height=args.height,
        width=args.width,
        batch=args.batch,
        prompt_chunks=args.prompt_chunks,
        opset=args.opset,
        vae_fp16=args.vae_fp16,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
        config=args.config,
        trt_optimization_level=args.trt_opt_level,
        trt_version_compatible=args.version_compatible,
        trt_hardware_compatible=args.hardware_compatible,
        trt_static_shapes=args.static_shapes,
        trt_compute_capabilities=args.compute_capability,
        trt_runtime_cache=args.runtime_cache,
        trt_refittable=args.refittable,
        int8=int8_options(args),
        split_unet=args.split_unet,
        deepcache=args.deepcache,
        controlnet=args.controlnet,
        loras=args.lora or (),
    )
    out = default_engine_dir() if args.out is None else args.out
    print(summary_table(manifest) + describe(manifest.quantization))
    hint = "trt-sd run" if args.out is None else f"trt-sd run --engines {out}"
    print(f"\nengine directory: {out}\nnext: {hint}")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def summary_table(manifest: Manifest) -> str:
    """component | precision | file size | max error | time (``reused`` when unchanged)."""
    reused = set((manifest.raw.get("export") or {}).get("reused", []))
    rows = [("component", "precision", "size", "max rel error", "time")]
    for name, entry in manifest.components.items():
        v = entry.verification
        err = f"{v['max_rel_error']:.1e}" if "max_rel_error" in v else "-"
        seconds = entry.extra.get("export_seconds")
        when = "reused" if name in reused else (f"{seconds:.1f} s" if seconds is not None else "-")
        size = int(entry.extra.get("engine_bytes", entry.extra.get("bytes", 0)))  # engine if built
        rows.append((name, entry.precision, _size(size), err, when))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
