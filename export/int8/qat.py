"""Quantization-aware fine-tuning: distil the fp32 UNet into its fake-quantized copy.

Data: the calibration trajectories (every timestep's real UNet inputs, CFG halves included);
targets: the fp32 UNet's outputs recorded with them, so no teacher runs during training. The
student starts from the PTQ ranges; its weights and its LSQ scales (activation per tensor,
weight per channel) are trained together with Adam on the MSE to the teacher's output, with a
cosine learning-rate decay. The result is exported exactly like PTQ: the fine-tuned float weights
plus the learned ranges go through the same Q/DQ rewrite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .fake_quant import attach, detach, scale_parameters
from .ptq import Calibration
from .qdq_graph import LayerRanges
from .recipe import Int8Recipe

#: Rows of the calibration set held out to measure the distillation loss before and after.
EVAL_ROWS = 256
#: Weights move this much slower than the (log-)scales: they start from a trained model and
#: their learning rate is absolute, the scales' relative.
WEIGHT_LR_FACTOR = 0.01


def _batch(
    calibration: Calibration, rows: np.ndarray
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    inputs = calibration.trajectories.inputs(rows)
    args = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in inputs)
    return args, torch.from_numpy(calibration.trajectories.outputs[rows])


@torch.no_grad()
def _eval_loss(wrapper: nn.Module, calibration: Calibration, rows: np.ndarray) -> float:
    total = 0.0
    for chunk in np.array_split(rows, max(1, len(rows) // 64)):
        args, target = _batch(calibration, chunk)
        total += float(nn.functional.mse_loss(wrapper(*args), target, reduction="sum"))
    return total / (len(rows) * calibration.trajectories.outputs[0].size)


def finetune(
    wrapper: nn.Module,
    calibration: Calibration,
    recipe: Int8Recipe,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, LayerRanges], dict[str, Any]]:
    """Fine-tune ``wrapper`` (its ``.unet``, in place) and return the learned ranges plus the
    training record for the manifest."""
    unet = wrapper.get_submodule("unet")
    rng = np.random.default_rng(recipe.seed)
    n = len(calibration.trajectories)
    order = rng.permutation(n)
    eval_rows = np.sort(order[: min(EVAL_ROWS, max(1, n // 5))])
    train_rows = order[len(eval_rows) :] if n > len(eval_rows) else order
    layers = attach(unet, calibration.ranges)
    scales = list(scale_parameters(layers))
    scale_ids = {id(p) for p in scales}
    wrapper.requires_grad_(True)
    weights = [p for p in wrapper.parameters() if id(p) not in scale_ids]
    optimizer = torch.optim.Adam(
        [
            {"params": weights, "lr": recipe.qat_lr * WEIGHT_LR_FACTOR},
            {"params": scales, "lr": recipe.qat_lr},
        ]
    )
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    before = _eval_loss(wrapper, calibration, eval_rows)
    losses = []
    try:
        for step in range(recipe.qat_steps):
            decay = 0.5 * (1.0 + math.cos(math.pi * step / recipe.qat_steps))
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr * decay
            rows = rng.choice(
                train_rows, size=min(recipe.qat_batch, len(train_rows)), replace=False
            )
            args, target = _batch(calibration, rows)
            loss = nn.functional.mse_loss(wrapper(*args), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(weights, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
        after = _eval_loss(wrapper, calibration, eval_rows)
        ranges = {name: layer.ranges() for name, layer in layers.items()}
    finally:
        detach(unet, layers)
        wrapper.requires_grad_(False)
    record = {
        "steps": recipe.qat_steps,
        "batch": recipe.qat_batch,
        "lr_scales": recipe.qat_lr,
        "lr_weights": recipe.qat_lr * WEIGHT_LR_FACTOR,
        "optimizer": "Adam, cosine decay, grad-norm clip 1.0 on weights",
        "scales": "LSQ (torch._fake_quantize_learnable_per_tensor/per_channel_affine)",
        "eval_rows": len(eval_rows),
        "eval_mse_ptq": before,
        "eval_mse_qat": after,
        "train_loss_first_last": [losses[0], float(np.mean(losses[-10:]))] if losses else None,
    }
    return ranges, record
