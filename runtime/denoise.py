"""The denoise step, once: UNet feeds, NaN checks, guidance and the sampler step.

``Pipeline`` (one request, many rows), its independent chains (:mod:`.chains`) and the
batching engine (many requests at different steps in one UNet call) all run this code, so a
request's image is the same arithmetic whichever path serves it.

A UNet call is a list of *lanes*: one request's latents at its step, its timestep, whether it
uses classifier-free guidance (then its latents fill two rows, ``[uncond, cond]``) and its
per-row conditioning (the family's UNet feeds, :mod:`trt_sd.models.families`). The feeds are
the lanes' rows concatenated in order; the output splits back the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trt_sd.models.controlnet import is_residual
from trt_sd.models.descriptors import SAMPLE, TIMESTEP, UNET, Component
from trt_sd.models.errors import InputError, NumericalError
from trt_sd.models.manifest import Manifest

Conditioning = Mapping[str, Any]  # UNet input name -> rows (first axis)


def unet_overflow_hint(manifest: Manifest, sample: np.ndarray | None = None) -> str:
    """What to change when the UNet returns NaN / inf: fp16 engines overflow on some inputs;
    an fp32 engine only does on latents that already grew absurd (guidance far too high) -
    given ordinary inputs (``sample``, what the UNet was fed) it is the engine that is at
    fault, and blaming the guidance would send the user the wrong way."""
    precisions = {e.precision for n, e in manifest.components.items() if n.startswith(UNET)}
    if precisions == {"fp32"}:  # the UNet, its stages or its DeepCache pair
        if sample is not None and _ordinary(sample):
            return (
                "; its inputs were finite and of ordinary size, so the engine itself is at "
                "fault (a corrupt or mis-built engine file): re-export it"
            )
        return "; the engine is fp32, so its inputs grew too large: lower the guidance"
    return "; try an fp32 export"


#: scaled model inputs are ~unit variance; only a run that is diverging exceeds this
ORDINARY_INPUT = 50.0


def _ordinary(sample: np.ndarray) -> bool:
    x = np.asarray(sample, dtype=np.float64)
    return bool(np.isfinite(x).all() and (x.size == 0 or np.abs(x).max() <= ORDINARY_INPUT))


def check_latents(x: np.ndarray, step: int, total: int, req: Any) -> None:
    """The sampler's latents after a step with finite UNet outputs: NaN / inf there means the
    guidance or the sampler blew up, not the engine (the message says which to change)."""
    if not np.isfinite(x).all():
        raise NumericalError(
            f"the latents became NaN or inf at step {step + 1} of {total} "
            f"({req.sampler}, guidance {req.guidance:g}) although the UNet's outputs were "
            "finite: lower the guidance or try another sampler"
        )


def take_rows(cond: Conditioning, lo: int, hi: int, batch: int, cfg: bool) -> dict[str, Any]:
    """The conditioning of images ``lo:hi`` of a ``batch``-image request: with CFG its rows
    are ``[uncond..., cond...]``, so each image has one row in each half."""
    out = {}
    for name, value in cond.items():
        rows = np.asarray(value)
        out[name] = (
            np.concatenate([rows[lo:hi], rows[batch + lo : batch + hi]]) if cfg else rows[lo:hi]
        )
    return out


def split_rows(cond: Conditioning, counts: Sequence[int]) -> list[dict[str, Any]]:
    """Consecutive row groups of ``counts`` rows each (one per request of a batch)."""
    parts, offset = [], 0
    for n in counts:
        parts.append({k: np.asarray(v)[offset : offset + n] for k, v in cond.items()})
        offset += n
    return parts


@dataclass
class Lane:
    """One request's share of a UNet call."""

    x_in: np.ndarray  # scaled model input, (images, C, h, w)
    timestep: float
    cfg: bool
    conditioning: Conditioning  # rows = images * (2 if cfg else 1)
    #: ControlNet images and scales at this call (:mod:`.controlnet`); None: no control
    control: Any = None

    @property
    def rows(self) -> int:
        return len(self.x_in) * (2 if self.cfg else 1)


class DenoiseStep:
    """Feeds, output checks and the guided sampler step for one UNet descriptor."""

    def __init__(self, unet: Component, manifest: Manifest | None = None) -> None:
        self.unet = unet
        self.output_name = unet.output_names[0]
        self.conditioning = [
            n for n in unet.input_names if n not in (SAMPLE, TIMESTEP) and not is_residual(n)
        ]
        self.manifest = manifest  # for the overflow hint (which precision, which fix)
        #: the ControlNets that feed the UNet's residual inputs (:mod:`.controlnet`)
        self.control: Any = None

    def feeds(
        self, lanes: Sequence[Lane], timings: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """The UNet feeds of ``lanes`` (rows in lane order). A single lane's conditioning is
        passed as it is, so a device buffer from the text encoder stays on the device. With
        ControlNets, their residuals (zeros for lanes without control) join the feeds."""
        samples = [np.concatenate([a.x_in, a.x_in]) if a.cfg else a.x_in for a in lanes]
        feeds: dict[str, Any] = {
            SAMPLE: samples[0] if len(samples) == 1 else np.concatenate(samples),
            TIMESTEP: np.concatenate(
                [np.full(a.rows, a.timestep, dtype=np.float32) for a in lanes]
            ),
        }
        for name in self.conditioning:
            try:
                parts = [a.conditioning[name] for a in lanes]
            except KeyError:
                raise InputError(f"unet: the text step gave no {name!r}") from None
            feeds[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if self.control is not None:
            feeds.update(self.control.residual_feeds(feeds, lanes, timings))
        return feeds

    def output(
        self, outputs: Mapping[str, Any], step: int, total: int, sample: np.ndarray | None = None
    ) -> np.ndarray:
        """The model output as float32, refused (naming the step) when not finite; ``sample``
        (the lane's model input) tells an overflowing run from a broken engine."""
        out = np.asarray(outputs[self.output_name], dtype=np.float32)
        if not np.isfinite(out).all():
            hint = unet_overflow_hint(self.manifest, sample) if self.manifest else ""
            raise NumericalError(f"{UNET} produced NaN or inf at step {step + 1} of {total}{hint}")
        return out

    def advance(self, req: Any, stepper: Any, i: int, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Guidance (``[uncond, cond]`` halves) then the sampler step ``i``; checks the
        latents. ``out`` holds this lane's rows only."""
        from trt_sd.samplers import cfg

        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # named below
            if req.cfg:
                uncond, cond = np.split(out, 2)
                out = cfg(cond, uncond, req.guidance, req.guidance_rescale)
            x = stepper.step(out, i, x)
        check_latents(x, i, stepper.num_model_calls, req)
        return x
