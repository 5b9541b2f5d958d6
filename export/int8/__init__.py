"""INT8 UNet: calibration on real sampler trajectories, PTQ, QAT, explicit Q/DQ graphs, report.

``trt-sd export --precision int8`` runs, for the UNet only (text encoder and VAE stay float):

1. :mod:`.preflight` checks the recipe (:mod:`.recipe`, prompts from :mod:`.prompts`) and the
   memory estimate before anything heavy loads;
2. :mod:`.trajectories` samples whole fp32 DPM++ 2M trajectories in torch and captures every
   UNet call; :mod:`.observe` / :mod:`.calibrators` turn the activations seen into ranges
   (:mod:`.ptq`), for the layers :mod:`.layers` selects;
3. optionally :mod:`.qat` fine-tunes the fake-quantized UNet (:mod:`.fake_quant`) by
   distillation on those trajectories;
4. the float graph is exported and verified, then :mod:`.qdq_graph` rewrites it into an
   explicit Q/DQ graph (int8 weights, per-channel; per-tensor activations);
5. :mod:`.report` measures the INT8 graph against fp32 (per-timestep cosine, image PSNR,
   prompt accuracy on the digits model); :mod:`.build` ties it together.

Only :mod:`.recipe`, :mod:`.prompts`, :mod:`.layers` (selection patterns), :mod:`.calibrators`
and :mod:`.preflight` import without torch.
"""

from __future__ import annotations

from .recipe import CALIBRATORS, Int8Recipe

__all__ = ["CALIBRATORS", "Int8Recipe"]
