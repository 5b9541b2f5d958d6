"""Published scheduler configs that the tests, benchmarks and the default model refer to.

One copy, so "SD 1.5's config" means the same dict in a parity test, a benchmark and the
bundled model's recipe. A function, not a constant: callers add or override keys.
"""

from __future__ import annotations

from typing import Any


def sd15_scheduler_config() -> dict[str, Any]:
    """``runwayml/stable-diffusion-v1-5``'s ``scheduler/scheduler_config.json`` (what SD 1.x
    checkpoints ship), with its implicit ``prediction_type`` written out."""
    return {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
        "prediction_type": "epsilon",
    }
