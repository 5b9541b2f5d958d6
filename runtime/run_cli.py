"""``trt-sd run``: generate images from an engine directory.

Every flag is optional: the engine directory defaults to ``default_engine_dir()``, the prompt
and sizes to the manifest's defaults, the output to ``trt-sd-<seed>.png`` in the current
directory (``-<i>`` suffixes for a batch). ``--from-png FILE`` reads the parameters an earlier
run embedded in FILE; flags given explicitly override them. ``--json`` ends stdout with one
JSON object describing the run (images, per-component timings, UNet calls, parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from trt_sd.models.errors import InputError
from trt_sd.runtime.controlnet_cli import add_control_arguments, control_kwargs

# Pipeline keyword -> CLI destination, for the values --from-png may supply.
_FROM_PNG_KEYS = (
    "prompt",
    "negative_prompt",
    "sampler",
    "karras",
    "steps",
    "guidance",
    "seed",
    "width",
    "height",
    "strength",
    "eta",
    "guidance_rescale",
    "sampler_options",
    "emphasis",
    "mask_blur",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trt_sd.runtime.backends import BACKEND_CHOICES
    from trt_sd.runtime.prompt_chunks import EMPHASIS_MODES

    parser.add_argument("--engines", metavar="DIR", help="engine directory (default: the cache)")
    parser.add_argument("--prompt", metavar="TEXT", help="prompt (default: the model's)")
    parser.add_argument("--negative-prompt", metavar="TEXT", help="negative prompt")
    parser.add_argument("--sampler", metavar="NAME", help="sampler (see `trt-sd samplers`)")
    parser.add_argument("--steps", type=int, metavar="N", help="sampling steps")
    parser.add_argument("--guidance", type=float, metavar="G", help="CFG scale; <= 1 disables")
    parser.add_argument("--seed", type=int, metavar="S", help="seed (default: random)")
    parser.add_argument("--height", type=int, metavar="H", help="image height in pixels")
    parser.add_argument("--width", type=int, metavar="W", help="image width in pixels")
    parser.add_argument("--batch", type=int, metavar="B", help="images per run (default 1)")
    parser.add_argument(
        "--karras",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Karras sigmas (default: the scheduler config's choice)",
    )
    parser.add_argument(
        "--eta",
        type=float,
        help="noise of DDIM and the ancestral samplers (ddim, euler-a, dpm2-a, dpm++2s-a)",
    )
    parser.add_argument(
        "--emphasis",
        choices=EMPHASIS_MODES,
        help="how (word:1.3) and [word] weight the prompt: original (the WebUI's default), "
        "no_norm, ignore (weights off, BREAK kept) or none (brackets are plain text, as in "
        "diffusers)",
    )
    parser.add_argument("--image", metavar="FILE", help="init image: img2img")
    parser.add_argument("--strength", type=float, help="img2img strength in (0, 1] (default 0.8)")
    parser.add_argument(
        "--mask", metavar="FILE", help="inpainting mask for --image (white = repaint; strength 1.0)"
    )
    parser.add_argument(
        "--mask-blur", type=float, metavar="PX", help="blur the mask by PX pixels first (0-64)"
    )
    parser.add_argument("--out", metavar="PATH", help="output PNG (default trt-sd-<seed>.png)")
    parser.add_argument("--from-png", metavar="FILE", help="reuse the parameters stored in FILE")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    parser.add_argument("--device", type=int, metavar="ID", help="GPU id (GPU backends)")
    parser.add_argument(
        "--devices",
        metavar="LIST",
        help="devices of a split UNet (export --split-unet N): cuda:0,cuda:1 or cpu,cpu "
        "(one CPU thread each; cpu:N pins to core N)",
    )
    parser.add_argument(
        "--deepcache",
        metavar="N",
        help="DeepCache interval: full UNet every N calls, shallow UNet between (engines "
        "exported with --deepcache); N:nonuniform for the paper's non-uniform schedule",
    )
    add_control_arguments(parser)
    parser.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:SCALE]",
        help="apply a LoRA .safetensors file at SCALE (default 1) without re-export; repeatable",
    )
    parser.add_argument("--json", action="store_true", help="end stdout with a JSON summary")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or timing table")


def _request_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Pipeline keyword arguments: the PNG's parameters (if any), overridden by explicit flags."""
    kwargs: dict[str, Any] = {}
    if args.from_png:
        from trt_sd.runtime.infotext import parse_infotext, read_infotext

        stored = parse_infotext(read_infotext(args.from_png))
        kwargs.update({k: stored[k] for k in _FROM_PNG_KEYS if k in stored})
        kwargs["_stored_model_hash"] = stored.get("model_hash")
    for key in _FROM_PNG_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            kwargs[key] = value
    if args.lora:
        from trt_sd.models.lora import parse_lora_arg

        kwargs["loras"] = [parse_lora_arg(text) for text in args.lora]
    if args.batch is not None:
        from trt_sd.runtime.request import check_batch

        kwargs["batch"] = check_batch(args.batch)  # before anything is sized by it
    kwargs.update(control_kwargs(args))
    if kwargs.get("strength") is not None and not args.image:
        raise InputError(
            "img2img parameters need the init image: pass it with --image FILE"
            if args.from_png
            else "--strength needs --image"
        )
    if args.mask_blur is not None and not args.mask:
        raise InputError("--mask-blur needs --mask")
    if not args.mask:
        kwargs.pop("mask_blur", None)  # a PNG's blur applies only to a mask given again
    return kwargs


def output_paths(out: str | None, seed: int, batch: int) -> list[Path]:
    """``--out`` (``stem-<i>.png`` per image of a batch) or ``trt-sd-<seed>[-<i>].png``; an
    ``--out`` that is a directory (or ends with a separator) gets those default names inside
    it, never a ``DIR.png`` beside it."""
    default = f"trt-sd-{seed}.png"
    if not out:
        base = Path.cwd() / default
    elif out.endswith(("/", os.sep)) or Path(out).is_dir():
        base = Path(out) / default
    else:
        base = Path(out)
    if base.suffix.lower() != ".png":
        base = base.with_name(base.name + ".png")
    if batch == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i}{base.suffix}") for i in range(batch)]


def timing_table(timings: dict[str, float], unet_calls: int) -> str:
    rows = [("component", "seconds")]
    for name, seconds in timings.items():
        label = f"{name} ({unet_calls} calls)" if name == "unet" else name
        rows.append((label, f"{seconds:.3f}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>8}" for a, b in rows)


def main(args: argparse.Namespace) -> int:
    from trt_sd.runtime.infotext import format_infotext, write_pngs
    from trt_sd.runtime.pipeline import Pipeline

    kwargs = _request_kwargs(args)
    stored_hash = kwargs.pop("_stored_model_hash", None)
    if args.out:  # refuse an unwritable --out before any generation work
        paths = output_paths(args.out, 0, kwargs.get("batch", 1))
        parent = paths[0].parent
        if not parent.is_dir():
            raise InputError(f"output directory {str(parent)!r} does not exist")
        for path in paths:
            if path.is_dir():
                raise InputError(f"cannot write {str(path)!r}: it is a directory")
    if args.device is not None and args.devices:
        raise InputError("give --device (one GPU) or --devices (a split UNet), not both")
    pipe = Pipeline.load(
        args.engines,
        backend=args.backend,
        devices=args.devices or args.device,
        deepcache=args.deepcache,
    )
    model_hash = str(pipe.manifest.model.get("hash", ""))
    if stored_hash and model_hash and not model_hash.startswith(stored_hash):
        print(
            f"warning: {args.from_png} was made with model hash {stored_hash}; these engines "
            f"are {model_hash[:10]}, so the image will differ",
            file=sys.stderr,
        )
    progress = None if args.quiet else True
    result = pipe(**kwargs, image=args.image, mask=args.mask, progress=progress)
    params = result.params
    paths = output_paths(args.out, params["seed"], len(result.images))
    version = f"trt-sd {_version()}"
    write_pngs(
        [
            (path, image, format_infotext(params, i, version))
            for i, (path, image) in enumerate(zip(paths, result.images, strict=True))
        ]
    )
    for path in paths:
        print(path)
    if not args.quiet:
        print(timing_table(result.timings, result.unet_calls))
    if args.json:
        summary = {
            "images": [str(p) for p in paths],
            "timings_s": result.timings,
            "unet_calls": result.unet_calls,
            "params": params,
        }
        print(json.dumps(summary, ensure_ascii=False))
    return 0


def _version() -> str:
    from trt_sd.runtime.cli import _version as version

    return version()
