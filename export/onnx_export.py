"""torch module -> optimised ONNX file, named and shaped by the component descriptor.

Exporter choice: ``torch.onnx.export(dynamo=False)`` (the TorchScript tracer) at opset 17, then
onnxscript's optimizer (constant folding, rewrite rules, dead-code and common-subexpression
elimination). Measured on the SD 1.5 UNet (random weights; bench/bench_export.py, figures in
docs/benchmarks.md "## Export") against ``dynamo=True``:

* the compute graph is the same: Conv 98, MatMul 224, Gemm 24, InstanceNormalization 61,
  LayerNormalization 48, Softmax 32, Resize 3 in both. The tracer graph has 2166 nodes against
  dynamo's 1943; the difference is shape arithmetic (Shape/Gather/Unsqueeze/Concat) around
  diffusers' reshapes, which TensorRT resolves at build time from the optimisation profile.
  ONNX Runtime CPU runs both at the same speed, and both match torch to ~1.5e-6;
* the tracer exports in 40 s, dynamo in 93-116 s: its non-strict ``torch.export`` failed on
  the upsample-size arithmetic and it fell back to strict mode; at opset 17 dynamo also wrote
  ``Split(num_outputs=...)``, an opset-18 attribute ONNX Runtime refuses to load;
* tracing records the Python branch we choose: the UNet is traced at latent sizes that are
  *not* multiples of ``2**num_upsamplers``, which makes diffusers forward the skip tensors'
  sizes to every upsampler. The graph then resizes to the skip tensor's runtime shape and
  serves every image size that is a multiple of 8 (e.g. 520 px); a graph traced at a 64-pixel
  multiple upsamples blindly by 2 and fails on the skip concatenation at other sizes.

torch 2.9+ marks the TorchScript exporter deprecated. If it is removed, ``dynamo=True`` at
opset 18 exports SD 1.5 correctly (see above); only ``_trace`` needs to change.

Models over 2 GB (the protobuf limit) store their weights in one ``<file>.data`` side file.
"""

from __future__ import annotations

import math
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from trt_sd.models import Component

from .modules import half_copy

PROTOBUF_LIMIT = 2 << 30
EXPORTER = "torch.onnx.export(dynamo=False) + onnxscript.optimizer"


def external_data_name(path: Path) -> str:
    return path.name + ".data"


def trace_sizes(
    component: str, num_upsamplers: int, vae_scale_factor: int, text_length: int = 154
) -> dict[str, int]:
    """Small axis sizes to trace at (see the module docstring for the UNet's odd sizes).

    The UNet's context is traced two prompt chunks long (154), not at 77: a size that is not
    also a fixed size of the model keeps the tracer from folding it into a constant."""
    step = 2**num_upsamplers
    # Any latent side not divisible by `step` switches diffusers to size-forwarding upsamplers.
    lat_h, lat_w = (step + 1, 2 * step + 1) if component == "unet" else (3, 5)
    return {
        "batch": 2,
        "unet_batch": 2,
        "latent_height": lat_h,
        "latent_width": lat_w,
        "height": lat_h * vae_scale_factor,
        "width": lat_w * vae_scale_factor,
        "text_length": text_length,
    }


def _to_torch(feeds: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())


def export_onnx(
    module: nn.Module,
    component: Component,
    feeds: dict[str, np.ndarray],
    path: Path,
    *,
    opset: int,
    fp16: bool,
) -> None:
    """Trace ``module`` on ``feeds`` (descriptor-ordered, already in the graph's dtypes) and
    write the optimised graph to ``path`` (plus ``path.data`` when over 2 GB)."""
    raw_dir = path.parent / f".{path.stem}.raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    raw = raw_dir / "model.onnx"
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # Tracer warnings flag the Python branches we deliberately freeze (see above).
            warnings.simplefilter("ignore")
            _trace(half_copy(module) if fp16 else module, component, feeds, raw, opset)
        _optimise_and_save(raw, path, component)
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)


@contextmanager
def _static_attention_scale() -> Iterator[None]:
    """Trace ``scaled_dot_product_attention`` with its ``1/sqrt(head_dim)`` scale as a constant.

    Called without ``scale`` (as diffusers and transformers do), the exporter derives it from
    the query's runtime shape: Shape -> Gather -> Cast -> Sqrt -> Div per attention, ~190 nodes
    on the SD 1.5 UNet that no optimizer folds (the reshapes around attention hide the static
    head size). The head size is fixed by the weights, so it is read once at trace time.
    """
    original = F.scaled_dot_product_attention

    def with_scale(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if scale is None:
            scale = 1.0 / math.sqrt(int(query.shape[-1]))
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)

    F.scaled_dot_product_attention = with_scale  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _trace(
    module: nn.Module, component: Component, feeds: dict[str, np.ndarray], raw: Path, opset: int
) -> None:
    with _static_attention_scale():
        _export_torchscript(module, component, feeds, raw, opset)


def _export_torchscript(
    module: nn.Module, component: Component, feeds: dict[str, np.ndarray], raw: Path, opset: int
) -> None:
    torch.onnx.export(
        module,
        _to_torch(feeds),
        str(raw),
        input_names=component.input_names,
        output_names=component.output_names,
        dynamic_axes=component.dynamic_axes(),
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )


def _optimise_and_save(raw: Path, path: Path, component: Component) -> None:
    import onnx_ir as ir
    import onnxscript.optimizer

    model = ir.load(str(raw))
    model = onnxscript.optimizer.optimize(model)
    _stamp_io_shapes(model, component)
    weight_bytes = sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )
    if weight_bytes > PROTOBUF_LIMIT - (64 << 20):
        ir.save(model, str(path), external_data=external_data_name(path))
    else:
        ir.save(model, str(path))


def _stamp_io_shapes(model: Any, component: Component) -> None:
    """Write the descriptor's axis names and fixed sizes on the graph inputs and outputs.

    The tracer names only the axes listed as dynamic and sometimes leaves a fixed axis
    symbolic (the text encoder's 77 tokens); TensorRT profiles and the runtime read these.
    """
    import onnx_ir as ir

    specs = {t.name: t for t in (*component.inputs, *component.outputs)}
    for value in (*model.graph.inputs, *model.graph.outputs):
        spec = specs[value.name]
        value.shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in spec.shape])
