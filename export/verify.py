"""Check an exported graph against the fp32 torch module on ONNX Runtime CPU.

Each component runs on random inputs at two different shapes (different batch and spatial
sizes, so a wrongly frozen dimension shows up). The error is measured relative to the
reference's largest magnitude: ``max|onnx - torch| / max|torch|``. Element-wise relative error
is meaningless where outputs cross zero, and this scale-free form lets one tolerance cover a
text encoder (values ~1) and a VAE decoder (values ~1, but large activations inside).

Tolerances: fp32 graphs match torch to ~1e-6 (the tolerance leaves room for real checkpoints'
larger activations and kernel differences); fp16 graphs carry fp16 rounding of weights and
activations (measured ~1e-3 on the test models), so they get a looser bound that still
catches a broken graph (errors of order 1).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from trt_sd.models import Component, NumericalError, ShapeRange
from trt_sd.models.unet_stages import resolve_axis

#: Allowed ``max|onnx - torch| / max|torch|`` per graph precision.
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
PROVIDER = "CPUExecutionProvider"


class VerificationError(NumericalError):
    """An exported graph does not match torch within tolerance (the message names it)."""


def axis_sizes(
    rows: int, height: int, width: int, vae_scale_factor: int, text_length: int = 77
) -> dict[str, int]:
    """Concrete sizes for every axis symbol of the descriptors."""
    return {
        "text_length": text_length,
        "batch": rows,
        "unet_batch": rows,
        "height": height,
        "width": width,
        "latent_height": height // vae_scale_factor,
        "latent_width": width // vae_scale_factor,
    }


def verification_sizes(shapes: ShapeRange) -> list[dict[str, int]]:
    """Two different shapes inside the range: the minimum corner and the optimum size, with a
    different batch so the batch axis is exercised even when the image size is fixed, and
    the longest context (every prompt chunk) so the text-length axis is too."""
    f = shapes.vae_scale_factor
    text = shapes.text_length
    first = axis_sizes(shapes.batch.min, shapes.height.min, shapes.width.min, f, text.min)
    rows = 2 if shapes.batch.min == 1 else 1
    second = axis_sizes(rows, shapes.height.opt, shapes.width.opt, f, text.max)
    return [first, second]


def random_inputs(
    component: Component,
    sizes: dict[str, int],
    precision: str,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    num_train_timesteps: int,
) -> dict[str, np.ndarray]:
    """Random feeds in the graph's dtypes: token ids below ``vocab_size``, fixed-float32 inputs
    (the timestep) uniform over the training timesteps, other floats standard normal."""
    feeds = {}
    arr: np.ndarray
    for spec in component.inputs:
        shape = tuple(resolve_axis(s, sizes) if isinstance(s, str) else s for s in spec.shape)
        dtype = spec.resolved_dtype(precision)
        if dtype.startswith("int"):
            arr = rng.integers(0, vocab_size, shape)
        elif spec.dtype == "float32":
            arr = rng.uniform(0, num_train_timesteps - 1, shape)
        else:
            arr = rng.standard_normal(shape)
        feeds[spec.name] = arr.astype(dtype)
    return feeds


def torch_reference(module: nn.Module, feeds: dict[str, np.ndarray]) -> Any:
    """The fp32 module's output (fp16 feeds are promoted: fp32 is the reference): one array,
    or a tuple of arrays in the descriptor's output order for multi-output components.

    Computed before the export so the torch module can be freed before ONNX Runtime loads the
    graph: holding both doubles the peak memory of a UNet export."""
    args = []
    for v in feeds.values():
        t = torch.from_numpy(np.ascontiguousarray(v))
        args.append(t.float() if t.is_floating_point() else t)
    with torch.no_grad():
        out = module(*args)
    if isinstance(out, tuple | list):
        return tuple(o.float().numpy() for o in out)
    return out.float().numpy()


def verify(
    name: str,
    onnx_path: str,
    cases: list[tuple[dict[str, np.ndarray], Any]],
    precision: str,
) -> dict[str, Any]:
    """Run ONNX Runtime on each ``(feeds, torch_reference)`` case; raise if an output is
    non-finite or off. Every output is checked (a reference tuple has one array per graph
    output, in order); the record holds the worst error over all of them.

    Returns the manifest's ``verification`` record.
    """
    import onnxruntime as ort

    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(onnx_path, opts, providers=[PROVIDER])
    except Exception as e:  # ONNX Runtime raises its own exception types
        raise VerificationError(f"{name}: ONNX Runtime cannot load the exported graph: {e}") from e
    tolerance = TOLERANCE[precision]
    worst_abs = worst_rel = 0.0
    shapes = []
    for feeds, reference in cases:
        shapes.append({k: list(v.shape) for k, v in feeds.items()})
        try:
            outputs = session.run(None, feeds)
        except Exception as e:
            first = str(e).strip().splitlines()[0]
            raise VerificationError(
                f"{name}: ONNX Runtime failed on inputs {shapes[-1]}: {first}"
            ) from e
        references = reference if isinstance(reference, tuple | list) else (reference,)
        if len(outputs) != len(references):
            raise VerificationError(
                f"{name}: the graph has {len(outputs)} outputs, torch {len(references)}"
            )
        for output, ref in zip(outputs, references, strict=True):
            max_abs, max_rel = _compare(name, precision, output, ref, shapes[-1])
            worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, max_rel)
    record = {
        "max_abs_error": worst_abs,
        "max_rel_error": worst_rel,
        "tolerance": tolerance,
        "metric": "max|onnx - torch| / max|torch|",
        "reference": "torch fp32",
        "provider": PROVIDER,
        "shapes": shapes,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if worst_rel > tolerance:
        raise VerificationError(
            f"{name}: exported {precision} graph differs from torch by {worst_rel:.3g} "
            f"(max|diff| / max|torch|), above the tolerance {tolerance:g}"
        )
    return record


def _compare(
    name: str, precision: str, output: np.ndarray, reference: np.ndarray, shapes: dict
) -> tuple[float, float]:
    """(max abs error, max abs error / max |reference|) of one output; raises on a shape
    mismatch or non-finite values."""
    if output.shape != reference.shape:
        raise VerificationError(
            f"{name}: ONNX output shape {list(output.shape)} differs from torch's "
            f"{list(reference.shape)} for inputs {shapes}"
        )
    if not np.isfinite(reference).all():
        raise NumericalError(f"{name}: the torch model itself produced NaN or inf")
    if not np.isfinite(output).all():
        raise NumericalError(
            f"{name}: the exported {precision} graph produced NaN or inf "
            f"(inputs {shapes}); export this component in fp32"
        )
    err = np.abs(output.astype(np.float64) - reference.astype(np.float64))
    max_abs = float(err.max())
    return max_abs, max_abs / max(float(np.abs(reference).max()), 1e-12)
