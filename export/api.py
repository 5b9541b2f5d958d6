"""``export_model``: checkpoint -> verified ONNX engine directory with its manifest."""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from trt_sd.models import (
    COMPONENT_NAMES,
    SCHEMA_VERSION,
    InputError,
    Manifest,
    Range,
    ShapeRange,
    default_engine_dir,
)
from trt_sd.models.descriptors import UNET, VAE_DECODER, VAE_ENCODER

from . import engine_dir
from .build_context import BuildContext
from .checkpoint import TOKENIZER_FILES, Checkpoint, locate, sha256_file
from .component_build import build_component
from .controlnet import build_controlnets, resolve_controlnets
from .inpaint import check_inpaint_export
from .lora_fuse import lora_key, read_export_loras
from .options import DEFAULT_PROMPT_CHUNKS, ExportOptions, resolve_options
from .partition import build_unet_sections, resolve_unet_cut

_TOOLS = ("trt-sd", "torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime")


def tool_versions() -> dict[str, str]:
    out = {}
    for name in _TOOLS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def component_precisions(
    opts: ExportOptions, names: tuple[str, ...] = COMPONENT_NAMES
) -> dict[str, str]:
    """fp16 exports keep the VAE in fp32 unless asked: SD 1.x / 2.x VAEs overflow in fp16
    (diffusers upcasts them too, ``force_upcast``), SDXL's more so. INT8 exports quantize the
    UNet only; the text encoders stay fp32 and the VAE fp32 (fp16 with ``vae_fp16``).
    ``names``: the family's components."""
    if opts.precision == "int8":
        vae = "fp16" if opts.vae_fp16 else "fp32"
        return {
            name: "int8" if name == UNET else vae if name in (VAE_DECODER, VAE_ENCODER) else "fp32"
            for name in names
        }
    vae = opts.precision if opts.vae_fp16 else "fp32"
    return {name: vae if name in (VAE_DECODER, VAE_ENCODER) else opts.precision for name in names}


def export_model(
    model: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    precision: str = "fp32",
    backend: str = "auto",
    height: str | int | Range | None = None,
    width: str | int | Range | None = None,
    batch: str | int | Range = "1:4",
    opset: int = 17,
    vae_fp16: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    config: str | os.PathLike[str] | None = None,
    trt_optimization_level: int = 3,
    trt_version_compatible: bool = False,
    trt_hardware_compatible: str = "none",
    trt_static_shapes: bool = False,
    trt_compute_capabilities: str | tuple[str, ...] | list[str] | None = None,
    trt_runtime_cache: str | os.PathLike[str] | None = None,
    trt_refittable: bool = False,
    int8: Any = None,
    split_unet: int | None = None,
    deepcache: int | None = None,
    prompt_chunks: int = DEFAULT_PROMPT_CHUNKS,
    controlnet: str | os.PathLike[str] | list[str | os.PathLike[str]] | None = None,
    loras: Any = (),
) -> Manifest:
    """Export ``model`` (diffusers folder, single ``.safetensors``, or ``None`` for the bundled
    default) to ``out_dir`` (default: :func:`trt_sd.models.default_engine_dir`).

    ``height`` / ``width`` are ``H``, ``MIN:MAX`` or ``MIN:OPT:MAX`` pixels (default: the
    model's native size); ``batch`` is images per call. ``config`` is a local diffusers folder
    supplying configs and tokenizer for a single-file checkpoint. With the TensorRT backend
    each verified ONNX graph is also built into an engine (``trt_*``: builder optimisation
    level, version / hardware compatibility ``none|ampere+|same-cc``, static shapes for CUDA
    graphs; see :mod:`trt_sd.export.tensorrt_build`). ``backend="tensorrt-rtx"`` builds
    TensorRT-RTX engines ahead of time (no GPU needed) for ``trt_compute_capabilities``
    (``"8.6,8.9"``; default: every target TensorRT-RTX supports); ``trt_runtime_cache`` is
    where the runtime keeps its JIT cache (relative paths are inside the engine directory);
    ``trt_refittable`` builds engines whose weights can be refit. Components whose inputs are
    unchanged since the last export to ``out_dir`` are reused. ``int8`` (precision ``int8``
    only) is a :class:`trt_sd.export.int8.Int8Recipe` or a dict of its fields (calibration
    prompts / size / steps, calibrator, QAT, Q/DQ flavour, ...). ``split_unet=N`` exports the
    UNet as N pipeline stages (``unet_stage0..``) for multi-device runs; ``deepcache=B`` adds
    the DeepCache feature output at skip branch ``B`` (0 = shallowest) to the UNet and a shallow
    UNet (see :mod:`trt_sd.export.partition`). ``prompt_chunks=N``: the UNet takes contexts of
    1..N prompt chunks (77..77*N tokens; long prompts, :mod:`trt_sd.runtime.prompt_chunks`);
    static TensorRT shapes pin it to one chunk. ``controlnet``: one ControlNet folder / file or a
    list of them, each exported as ``controlnet_<i>`` with a UNet that takes their residuals
    (:mod:`trt_sd.export.controlnet`). ``loras``: ``[(path, scale), ...]`` or
    ``"PATH[:SCALE]"`` strings fused into the weights (:mod:`trt_sd.export.lora_fuse`).
    Raises ``InputError`` for bad arguments, ``NumericalError`` (naming the component) when a
    graph fails verification.
    """
    ckpt = locate(model, config=config, allow_pickle=allow_pickle)
    fused_loras = read_export_loras(loras)
    opts = resolve_options(
        precision=precision,
        backend=backend,
        height=height,
        width=width,
        batch=batch,
        opset=opset,
        vae_fp16=vae_fp16,
        allow_pickle=allow_pickle,
        default_size=ckpt.native_size,
        trt_optimization_level=trt_optimization_level,
        trt_version_compatible=trt_version_compatible,
        trt_hardware_compatible=trt_hardware_compatible,
        trt_static_shapes=trt_static_shapes,
        trt_compute_capabilities=trt_compute_capabilities,
        trt_runtime_cache=None if trt_runtime_cache is None else str(trt_runtime_cache),
        trt_refittable=trt_refittable,
        prompt_chunks=prompt_chunks,
    )
    shapes = ShapeRange(
        opts.batch, opts.height, opts.width, ckpt.vae_scale_factor, text_length_range(opts, ckpt)
    )
    check_inpaint_export(
        ckpt.dims, opts.precision == "int8", split_unet, deepcache, bool(controlnet)
    )
    int8_recipe = _int8_recipe(int8, opts, ckpt, shapes)
    unet_cut = resolve_unet_cut(split_unet, deepcache, opts.precision, ckpt)
    controlnets = resolve_controlnets(
        controlnet, ckpt, precision=opts.precision, split_unet=split_unet, deepcache=deepcache
    )
    out = Path(default_engine_dir() if out_dir is None else out_dir).expanduser().absolute()
    engine_dir.check_output_dir(out)
    engine_dir.remove_stale_builds(out)
    build = engine_dir.new_build_dir(out)
    try:
        ctx = BuildContext(
            ckpt=ckpt,
            opts=opts,
            shapes=shapes,
            out=out,
            build=build,
            progress=progress,
            precisions=component_precisions(opts, ckpt.family_spec.component_names),
            tools=tool_versions(),
            previous=engine_dir.previous_manifest(out),
            int8=int8_recipe,
            controlnet=controlnets[0] if controlnets else None,
            loras=fused_loras,
        )
        _run(ctx, unet_cut, controlnets[1] if controlnets else [])
        engine_dir.publish(build, out)
    except BaseException:
        engine_dir.discard(build)
        raise
    return Manifest.load(out)


def _run(
    ctx: BuildContext, unet_cut: tuple[int | None, int | None] | None, controlnets: list
) -> None:
    """Per component reuse-or-build, then tokenizer files and the manifest (validated before
    anything is published)."""
    started = time.perf_counter()
    family = ctx.ckpt.family_spec
    components = family.components(ctx.ckpt.dims)
    if ctx.controlnet is not None:  # the UNet with residual inputs
        components[UNET] = ctx.controlnet.unet()
    entries, reused = {}, []
    for name in family.component_names:
        if name == UNET and unet_cut is not None:
            sections, ctx.unet_records, was_reused = build_unet_sections(ctx, *unet_cut)
            entries.update(sections)
            reused += list(sections) if was_reused else []
            continue
        key = ctx.cache_key(components[name])
        entry = ctx.reusable(name, key)
        if entry is not None:
            reused.append(name)
            ctx.log(f"{name}: unchanged, reused from {ctx.out}")
            if name == UNET and ctx.int8 is not None and ctx.previous is not None:
                ctx.quantization = ctx.previous.quantization
        else:
            entry = build_component(ctx, components[name], key)
        entries[name] = entry
    if ctx.controlnet is not None:
        built, was_reused = build_controlnets(ctx, ctx.controlnet, controlnets)
        entries.update(built)
        reused += was_reused
    _copy_tokenizer(ctx)
    raw = _manifest(ctx, entries, reused, time.perf_counter() - started)
    for key in ctx.ckpt.tokenizer_entries():  # the runtime verifies these like engine files
        tok = raw[key]
        tok["sha256"] = {
            part: sha256_file(ctx.build / tok[part])
            for part in ("vocab", "merges")
            if (ctx.build / tok[part]).is_file()
        }
    Manifest.from_dict(raw).write(ctx.build)


def _copy_tokenizer(ctx: BuildContext) -> None:
    for enc in ctx.ckpt.family_spec.text_encoders:  # one folder per text encoder
        dst = ctx.build / enc.tokenizer
        dst.mkdir()
        for fname in TOKENIZER_FILES:
            src = ctx.ckpt.config_dir / enc.source_folder / fname
            if src.is_file():
                shutil.copyfile(src, dst / fname)


def _manifest(
    ctx: BuildContext, entries: dict[str, dict[str, Any]], reused: list[str], seconds: float
) -> dict[str, Any]:
    ckpt = ctx.ckpt
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": ckpt.identity(),
        "tools": ctx.tools,
        "components": entries,
        "scheduler": ckpt.scheduler_config,
        "prediction_type": ckpt.prediction_type,
        "vae_scaling_factor": float(ckpt.vae_config.get("scaling_factor", 0.18215)),
        "dims": ckpt.dims.to_dict(),
        **ckpt.tokenizer_entries(),  # "tokenizer" (+ "tokenizer_2", ...)
        "family_config": ckpt.family_config(),
        "defaults": ckpt.defaults(),
        "unet_partition": None,
        **ctx.unet_records,
        "quantization": ctx.quantization,
        "export": {
            "precision": ctx.opts.precision,
            "vae_fp16": ctx.opts.vae_fp16,
            "opset": ctx.opts.opset,
            "shape_range": ctx.shapes.to_dict(),
            "reused": reused,
            "loras": [
                {"name": name, "sha256": sha, "scale": scale}
                for name, sha, scale in lora_key(ctx.loras)
            ],
            "seconds": round(seconds, 2),
        },
    }


def text_length_range(opts: ExportOptions, ckpt: Checkpoint) -> Range:
    """The UNet context range: one prompt chunk (the text encoder's length, opt) up to
    ``prompt_chunks`` of them; static TensorRT shapes build one chunk only."""
    length = ckpt.dims.text_max_length
    chunks = 1 if opts.trt_static_shapes else opts.prompt_chunks
    return Range(length, length, length * chunks)


def _int8_recipe(value: Any, opts: ExportOptions, ckpt: Checkpoint, shapes: ShapeRange) -> Any:
    """The resolved INT8 recipe (checked, memory estimated) for precision int8, else None."""
    if opts.precision != "int8":
        if value is not None:
            raise InputError("INT8 options (calibration, --qat, ...) need --precision int8")
        return None
    from .int8.preflight import prepare_int8

    return prepare_int8(value, ckpt, shapes, opts.backend)
