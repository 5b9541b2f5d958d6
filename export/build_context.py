"""The state of one export run, and the ONE place that computes a component's cache key and
writes its manifest entry.

Every build step (whole components in :mod:`.component_build`, UNet sections in
:mod:`.partition`, the INT8 UNet in :mod:`.int8.build`, engines in :mod:`.engine_build`)
receives a :class:`BuildContext`; none of them imports the orchestration in :mod:`.api`, which
keeps the export package free of import cycles (``lint-imports`` checks it in CI).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_sd.models import Component, Manifest, ShapeRange
from trt_sd.models.descriptors import UNET
from trt_sd.models.lora import MAP_VERSION

from . import engine_dir
from .checkpoint import Checkpoint, sha256_file
from .lora_fuse import LORA_COMPONENTS, lora_key
from .options import ExportOptions


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
    """The TensorRT build settings recorded in the manifest and hashed into cache keys."""
    settings: dict[str, Any] = {
        "optimization_level": opts.trt_optimization_level,
        "version_compatible": opts.trt_version_compatible,
        "hardware_compatible": opts.trt_hardware_compatible,
        "static_shapes": opts.trt_static_shapes,
        "refittable": opts.trt_refittable,
    }
    if opts.backend == "tensorrt-rtx":
        settings["runtime_cache"] = opts.trt_runtime_cache
    return settings


@dataclass
class BuildContext:
    """One export run: inputs, where it writes, and what the steps record for the manifest."""

    ckpt: Checkpoint
    opts: ExportOptions
    shapes: ShapeRange
    out: Path  # the engine directory being replaced
    build: Path  # the temporary directory being filled
    progress: bool
    precisions: dict[str, str]
    tools: dict[str, str]
    previous: Manifest | None
    int8: Any = None  # ResolvedRecipe for precision int8
    quantization: dict[str, Any] | None = None  # set by the INT8 UNet build
    unet_records: dict[str, Any] = field(default_factory=dict)  # unet_partition / deepcache
    controlnet: Any = None  # ControlNetPlan of ``--controlnet`` (the UNet takes residuals)
    loras: tuple = ()  # --lora: ((LoraFile, scale), ...) fused at export (export/lora_fuse.py)
    _loader: Any = None

    # ---- the one cache key ------------------------------------------------------------------
    def cache_key(self, component: Component, section: dict[str, Any] | None = None) -> str:
        """Content key of one component's build: weights, precision, opset, backend and its
        TensorRT settings (flavour included), shapes, tool versions; ``section`` adds a UNet
        section's I/O and layers."""
        weights_of = UNET if section is not None else component.name
        precision = self.precisions[weights_of]
        parts: dict[str, Any] = {
            "weights": self.ckpt.weights_hash(weights_of),
            "component": component.name,
            "precision": precision,
            "opset": self.opts.opset,
            "backend": self.opts.backend,
            "fused_attention": attention_revision(self.opts.backend, precision),
            "tensorrt": trt_settings(self.opts) if self.opts.builds_engines else None,
            "shape_range": self.shapes.to_dict(),
            "tools": self.tools,
        }
        if section is not None:
            parts.update(section)
        if component.name == UNET and self.controlnet is not None:
            parts["controlnet_residuals"] = self.controlnet.residual_names
        if weights_of in LORA_COMPONENTS:  # weight-map format, fused LoRAs (export/lora_*.py)
            parts["lora"] = {"map": MAP_VERSION, "fused": lora_key(self.loras)}
        if component.name == UNET and self.int8 is not None:
            parts["int8"] = self.int8.to_dict()
        return engine_dir.cache_key(parts)

    # ---- the one manifest-entry writer --------------------------------------------------------
    def entry(
        self,
        component: Component,
        path: Path,
        precision: str,
        verification: dict[str, Any],
        key: str,
        exporter: str,
        **extra: Any,
    ) -> dict[str, Any]:
        """The manifest entry of an exported ONNX graph (engine fields are added by
        :func:`trt_sd.export.engine_build.build_tensorrt_engine`)."""
        from .onnx_export import external_data_name

        entry: dict[str, Any] = {
            "file": path.name,
            "sha256": sha256_file(path),
            "backend": self.opts.backend,
            "precision": precision,
            "inputs": [t.to_dict(precision) for t in component.inputs],
            "outputs": [t.to_dict(precision) for t in component.outputs],
            "shape_range": self.shapes.to_dict(),
            "verification": verification,
            "cache_key": key,
            "opset": self.opts.opset,
            "exporter": exporter,
            "bytes": path.stat().st_size,
        }
        ext = path.parent / external_data_name(path)
        if ext.is_file():
            entry["external_data"] = {"file": ext.name, "sha256": sha256_file(ext)}
            entry["bytes"] += ext.stat().st_size
        entry.update(extra)
        return entry

    # ---- reuse ------------------------------------------------------------------------------
    def reusable(self, name: str, key: str) -> dict[str, Any] | None:
        """The previous export's entry for ``name`` (its files linked into the new build)
        when its key matches and its files still hash to what it recorded."""
        if self.previous is None or name not in self.previous.components:
            return None
        entry = self.previous.components[name].to_dict()
        if entry.get("cache_key") != key or not engine_dir.files_intact(self.out, entry):
            return None
        for fname, _ in engine_dir.entry_files(entry):
            engine_dir.link_or_copy(self.out / str(fname), self.build / str(fname))
        return entry

    # ---- helpers ----------------------------------------------------------------------------
    def loader(self) -> Any:
        """The torch module loader (imports torch on first use)."""
        if self._loader is None:
            from .modules import ModuleLoader

            self._loader = ModuleLoader(self.ckpt, self.loras)
        return self._loader

    def log(self, message: str) -> None:
        if self.progress:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)
