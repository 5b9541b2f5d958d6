"""``export_model``: checkpoint -> verified ONNX engine directory with its manifest."""

from __future__ import annotations

import os
import shutil
import sys
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
from .checkpoint import TOKENIZER_FILES, Checkpoint, locate
from .component_build import attention_revision, build_component, trt_settings
from .options import ExportOptions, resolve_options
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
    int8: Any = None,
    split_unet: int | None = None,
    deepcache: int | None = None,
) -> Manifest:
    """Export ``model`` (diffusers folder, single ``.safetensors``, or ``None`` for the bundled
    default) to ``out_dir`` (default: :func:`trt_sd.models.default_engine_dir`).

    ``height`` / ``width`` are ``H``, ``MIN:MAX`` or ``MIN:OPT:MAX`` pixels (default: the
    model's native size); ``batch`` is images per call. ``config`` is a local diffusers folder
    supplying configs and tokenizer for a single-file checkpoint. With the TensorRT backend
    each verified ONNX graph is also built into an engine (``trt_*``: builder optimisation
    level, version / hardware compatibility ``none|ampere+|same-cc``, static shapes for CUDA
    graphs; see :mod:`trt_sd.export.tensorrt_build`). Components whose inputs are
    unchanged since the last export to ``out_dir`` are reused. ``int8`` (precision ``int8``
    only) is a :class:`trt_sd.export.int8.Int8Recipe` or a dict of its fields (calibration
    prompts / size / steps, calibrator, QAT, Q/DQ flavour, ...). ``split_unet=N`` exports the
    UNet as N pipeline stages (``unet_stage0..``) for multi-device runs; ``deepcache=B`` adds
    the DeepCache feature output at skip branch ``B`` (0 = shallowest) to the UNet and a shallow
    UNet (see :mod:`trt_sd.export.partition`). Raises ``InputError`` for bad
    arguments, ``NumericalError`` (naming the component) when a graph fails verification.
    """
    ckpt = locate(model, config=config, allow_pickle=allow_pickle)
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
    )
    shapes = ShapeRange(opts.batch, opts.height, opts.width, ckpt.vae_scale_factor)
    int8_recipe = _int8_recipe(int8, opts, ckpt, shapes)
    unet_cut = resolve_unet_cut(split_unet, deepcache, opts.precision, ckpt)
    out = Path(default_engine_dir() if out_dir is None else out_dir).expanduser().absolute()
    engine_dir.check_output_dir(out)
    engine_dir.remove_stale_builds(out)
    build = engine_dir.new_build_dir(out)
    try:
        _Builder(ckpt, opts, shapes, out, build, progress, int8_recipe, unet_cut).run()
        engine_dir.publish(build, out)
    except BaseException:
        engine_dir.discard(build)
        raise
    return Manifest.load(out)


class _Builder:
    """One export run: per component reuse-or-build, then tokenizer files and manifest."""

    def __init__(
        self,
        ckpt: Checkpoint,
        opts: ExportOptions,
        shapes: ShapeRange,
        out: Path,
        build: Path,
        progress: bool,
        int8: Any = None,
        unet_cut: tuple[int | None, int | None] | None = None,
    ) -> None:
        self.ckpt, self.opts, self.shapes = ckpt, opts, shapes
        self.out, self.build, self.progress = out, build, progress
        self.int8 = int8  # ResolvedRecipe for precision int8
        self.quantization: dict[str, Any] | None = None  # set by the INT8 UNet build
        self.unet_cut = unet_cut  # (split_unet, deepcache branch) when the UNet is cut
        self.unet_records: dict[str, Any] = {}  # unet_partition / unet_deepcache
        self.tools = tool_versions()
        self.precisions = component_precisions(opts, ckpt.family_spec.component_names)
        self.previous = engine_dir.previous_manifest(out)
        self._loader: Any = None

    def run(self) -> None:
        started = time.perf_counter()
        components = self.ckpt.family_spec.components(self.ckpt.dims)
        entries, reused = {}, []
        for name in self.ckpt.family_spec.component_names:
            if name == UNET and self.unet_cut is not None:
                sections, self.unet_records, was_reused = build_unet_sections(self, *self.unet_cut)
                entries.update(sections)
                reused += list(sections) if was_reused else []
                continue
            key = self._cache_key(name)
            entry = self._reusable(name, key)
            if entry is not None:
                reused.append(name)
                self._log(f"{name}: unchanged, reused from {self.out}")
                if name == UNET and self.int8 is not None and self.previous is not None:
                    self.quantization = self.previous.quantization
            else:
                entry = build_component(self, components[name], key)
            entries[name] = entry
        self._copy_tokenizer()
        raw = self._manifest(entries, reused, time.perf_counter() - started)
        Manifest.from_dict(raw).write(self.build)  # validates before anything is published

    # ---- reuse ------------------------------------------------------------------------------
    def _cache_key(self, name: str) -> str:
        int8 = {"int8": self.int8.to_dict()} if name == UNET and self.int8 is not None else {}
        return engine_dir.cache_key(
            {
                **int8,
                "weights": self.ckpt.weights_hash(name),
                "component": name,
                "precision": self.precisions[name],
                "opset": self.opts.opset,
                "backend": self.opts.backend,
                "fused_attention": attention_revision(self.opts.backend, self.precisions[name]),
                "tensorrt": trt_settings(self.opts) if self.opts.backend == "tensorrt" else None,
                "shape_range": self.shapes.to_dict(),
                "tools": self.tools,
            }
        )

    def _reusable(self, name: str, key: str) -> dict[str, Any] | None:
        if self.previous is None or name not in self.previous.components:
            return None
        entry = self.previous.components[name].to_dict()
        if entry.get("cache_key") != key or not engine_dir.files_intact(self.out, entry):
            return None
        for fname, _ in engine_dir.entry_files(entry):
            engine_dir.link_or_copy(self.out / str(fname), self.build / str(fname))
        return entry

    # ---- helpers used by build_component ------------------------------------------------------
    def loader(self) -> Any:
        """The torch module loader (imports torch on first use)."""
        if self._loader is None:
            from .modules import ModuleLoader

            self._loader = ModuleLoader(self.ckpt)
        return self._loader

    def _log(self, message: str) -> None:
        if self.progress:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    def _copy_tokenizer(self) -> None:
        for sub in self.ckpt.tokenizer_entries():  # one folder per text encoder
            dst = self.build / sub
            dst.mkdir()
            for fname in TOKENIZER_FILES:
                src = self.ckpt.config_dir / sub / fname
                if src.is_file():
                    shutil.copyfile(src, dst / fname)

    def _manifest(
        self, entries: dict[str, dict[str, Any]], reused: list[str], seconds: float
    ) -> dict[str, Any]:
        ckpt = self.ckpt
        return {
            "schema_version": SCHEMA_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": ckpt.identity(),
            "tools": self.tools,
            "components": entries,
            "scheduler": ckpt.scheduler_config,
            "prediction_type": ckpt.prediction_type,
            "vae_scaling_factor": float(ckpt.vae_config.get("scaling_factor", 0.18215)),
            "dims": ckpt.dims.to_dict(),
            **ckpt.tokenizer_entries(),  # "tokenizer" (+ "tokenizer_2", ...)
            "family_config": ckpt.family_config(),
            "defaults": ckpt.defaults(),
            "unet_partition": None,
            **self.unet_records,
            "quantization": self.quantization,
            "export": {
                "precision": self.opts.precision,
                "vae_fp16": self.opts.vae_fp16,
                "opset": self.opts.opset,
                "shape_range": self.shapes.to_dict(),
                "reused": reused,
                "seconds": round(seconds, 2),
            },
        }


def _int8_recipe(value: Any, opts: ExportOptions, ckpt: Checkpoint, shapes: ShapeRange) -> Any:
    """The resolved INT8 recipe (checked, memory estimated) for precision int8, else None."""
    if opts.precision != "int8":
        if value is not None:
            raise InputError("INT8 options (calibration, --qat, ...) need --precision int8")
        return None
    from .int8.preflight import prepare_int8

    return prepare_int8(value, ckpt, shapes, opts.backend)
