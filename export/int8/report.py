"""The INT8 accuracy report written to the manifest: INT8 graph vs the fp32 model.

Three views, from the closest to the user's:

* per-timestep UNet agreement: cosine similarity of the INT8 graph's output to the fp32
  output on the very inputs the fp32 pipeline produced at each step (teacher forcing), so an
  error that grows toward the noisy or the clean end is visible;
* images: PSNR of INT8 images against fp32 images from the same prompts and starting noise
  (the whole DPM++ 2M trajectory runs on the INT8 UNet; text encoder and VAE are fp32 in both);
* prompt accuracy (bundled digits model only): the share of images the held-out digit
  classifier (:class:`trt_sd.models.digits.DigitJudge`) reads as the digit the prompt asked
  for, for fp32 and INT8 alike.

The report prompts are not the calibration prompts' trajectories: they use their own noise
(``seed + 1``), and on the bundled model the canonical prompt of each digit in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .trajectories import SAMPLER, Trajectories, UnetFn

#: Rows per ONNX Runtime call when replaying captured inputs.
ROWS_PER_CALL = 64
#: A graph whose mean output cosine to fp32 falls below this is broken, not merely imprecise.
MIN_MEAN_COSINE = 0.9


@dataclass
class ReportPlan:
    """Which images the report generates (and, on the digits model, which digit each shows)."""

    prompts: list[str]
    labels: np.ndarray | None  # digit asked for, when a judge exists
    seed: int
    steps: int
    guidance: float


def report_plan(
    n_images: int,
    calibration_prompts: tuple[str, ...],
    *,
    digits_model: bool,
    seed: int,
    steps: int,
    guidance: float,
) -> ReportPlan:
    if digits_model:
        from trt_sd.models import digits

        labels = np.arange(n_images) % 10
        prompts = [digits.prompt_for_digit(int(d)) for d in labels]
        return ReportPlan(prompts, labels, seed + 1, steps, guidance)
    prompts = [calibration_prompts[i % len(calibration_prompts)] for i in range(n_images)]
    return ReportPlan(prompts, None, seed + 1, steps, guidance)


def onnxruntime_unet_fn(path: str | Path, component: Any = None) -> UnetFn:
    """An ONNX Runtime CPU session on the graph, as a NumPy UNet function; inputs beyond
    sample / timestep / context (ControlNet residuals of ``component``) get zeros."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    names = [i.name for i in session.get_inputs()]  # the UNet descriptor's, in its order

    def run(*inputs: np.ndarray) -> np.ndarray:
        feeds = dict(zip(names, inputs, strict=False))  # the caller's inputs come first
        if len(names) > len(inputs):  # ControlNet residuals: zeros (the plain UNet)
            feeds.update(zero_inputs(component, names[len(inputs) :], inputs[0].shape))
        return np.asarray(session.run(None, feeds)[0], dtype=np.float32)

    return run


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` to the same row of ``b`` (flattened, float64)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(denom, 1e-30)


def psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """PSNR in dB per image, images in [-1, 1] mapped to [0, 1]; identical images -> inf."""
    diff = (images.astype(np.float64) - reference.astype(np.float64)) / 2.0
    mse = np.mean(diff.reshape(len(diff), -1) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


def replay_outputs(unet_fn: UnetFn, reference: Trajectories) -> np.ndarray:
    """The graph's outputs on every captured input row of the fp32 trajectories."""
    outs = []
    for start in range(0, len(reference), ROWS_PER_CALL):
        rows = np.arange(start, min(start + ROWS_PER_CALL, len(reference)))
        outs.append(unet_fn(*reference.inputs(rows)))
    return np.concatenate(outs)


def per_step_cosine(outputs: np.ndarray, reference: Trajectories) -> list[dict[str, float]]:
    cos = cosine_rows(outputs, reference.outputs)
    table = []
    for step in np.unique(reference.step_index):
        rows = reference.step_index == step
        table.append(
            {
                "step": int(step),
                "timestep": float(reference.timesteps[rows][0]),
                "mean": round(float(cos[rows].mean()), 6),
                "min": round(float(cos[rows].min()), 6),
            }
        )
    return table


def _stats(values: np.ndarray) -> dict[str, float]:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return {"mean": float("inf"), "min": float("inf")}
    return {"mean": round(float(finite.mean()), 3), "min": round(float(values.min()), 3)}


def accuracy_report(
    plan: ReportPlan,
    reference: Trajectories,
    reference_images: np.ndarray,
    int8_fn: UnetFn,
    int8_images: Callable[[], np.ndarray],
    judge: Any | None,
) -> dict[str, Any]:
    """Compare the INT8 graph with the fp32 reference; ``int8_images()`` samples and decodes
    the INT8 trajectories (called once)."""
    outputs = replay_outputs(int8_fn, reference)
    if not np.isfinite(outputs).all():
        from trt_sd.models import NumericalError

        raise NumericalError("unet: the INT8 graph produced NaN or inf on real sampler inputs")
    cos = cosine_rows(outputs, reference.outputs)
    err = np.abs(outputs.astype(np.float64) - reference.outputs)
    images = int8_images()
    report: dict[str, Any] = {
        "reference": "fp32 torch pipeline, same prompts and starting noise",
        "sampler": SAMPLER,
        "steps": plan.steps,
        "guidance": plan.guidance,
        "seed": plan.seed,
        "images": len(plan.prompts),
        "unet_cosine_mean": round(float(cos.mean()), 6),
        "unet_cosine_min": round(float(cos.min()), 6),
        "unet_max_rel_error": float(err.max() / max(np.abs(reference.outputs).max(), 1e-12)),
        "unet_cosine_per_step": per_step_cosine(outputs, reference),
        "image_psnr_db": _stats(psnr(images, reference_images)),
        "prompt_accuracy": None,
    }
    if judge is not None and plan.labels is not None:
        report["prompt_accuracy"] = {
            "judge": "DigitJudge: RBF SVM on the model's held-out digits (trt_sd.models.digits)",
            "fp32": judge.accuracy(reference_images, plan.labels),
            "int8": judge.accuracy(images, plan.labels),
        }
    return report


def zero_inputs(component: Any, names: list[str], sample_shape: tuple[int, ...]) -> dict:
    """Zeros for the named inputs of ``component`` at the sample's batch and latent size."""
    from trt_sd.models.unet_stages import resolve_axis

    rows, _, height, width = sample_shape
    sizes = {"unet_batch": rows, "latent_height": height, "latent_width": width}
    return {
        n: np.zeros(
            [resolve_axis(d, sizes) if isinstance(d, str) else d for d in component.input(n).shape],
            np.float32,
        )
        for n in names
    }
