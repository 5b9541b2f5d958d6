"""ControlNet at run time: control images, per-row scales, and the residual feeds of a UNet call.

Engines exported with ``--controlnet`` (:mod:`trt_sd.models.controlnet`) have one engine per
ControlNet and a UNet that takes their residuals. A request brings one control image per
ControlNet (already preprocessed by the user: edges, depth, pose; used as they are, in
``[0, 1]`` as diffusers' control image processor makes them), a conditioning scale and a
``[start, end]`` fraction of the model calls where the ControlNet acts.

The scale and the start / end window are host arithmetic, per row, as diffusers applies them
(``controlnet_conditioning_scale * controlnet_keep[i]``; the residuals of several ControlNets
summed), so requests with different scales, windows, images or none at all share one UNet call
in the batching engine: :meth:`ControlNetRunner.residual_feeds` runs each ControlNet on the
rows that use it at this step and feeds zeros elsewhere (the UNet then is the plain UNet).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trt_sd.models.controlnet import CONTROL_IMAGE, ControlNetPlan, controlnet_plan
from trt_sd.models.descriptors import UNET, Component
from trt_sd.models.errors import InputError
from trt_sd.models.manifest import Manifest
from trt_sd.models.unet_stages import resolve_axis

from .images import open_rgb


def plan_of(manifest: Manifest) -> ControlNetPlan | None:
    """The ControlNet plan of an engine directory exported with ``--controlnet``, else None."""
    base = manifest.family.components(manifest.dims)[UNET]
    return controlnet_plan(manifest.raw, base, manifest.dims)


def controlnet_components(manifest: Manifest) -> dict[str, Component]:
    """Descriptors that replace / extend the family's: the UNet with residual inputs and one
    per ControlNet (empty for engines without ControlNets)."""
    plan = plan_of(manifest)
    return {} if plan is None else plan.components(manifest.dims)


# ---- one request's control ------------------------------------------------------------------
@dataclass(frozen=True)
class LaneControl:
    """A lane's control at one model call: per ControlNet its images and effective scale."""

    images: tuple[np.ndarray | None, ...]  # per ControlNet: (images, C, H, W) in [0, 1]
    scales: tuple[float, ...]  # conditioning scale x keep (0 outside [start, end] or off)


@dataclass(frozen=True)
class RequestControl:
    """One request's control images, scales and windows, one entry per ControlNet."""

    #: per ControlNet: (batch, C, H, W) float32 in [0, 1]; None: that ControlNet is off
    images: tuple[np.ndarray | None, ...]
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]

    def at(self, i: int, total: int) -> LaneControl:
        """Model call ``i`` of ``total``: diffusers' ``controlnet_keep`` times the scale."""
        scales = tuple(
            0.0 if image is None else s * (1.0 - float(i / total < a or (i + 1) / total > b))
            for image, s, a, b in zip(self.images, self.scales, self.starts, self.ends, strict=True)
        )
        return LaneControl(self.images, scales)

    def params(self) -> dict[str, Any]:
        """What a result reports (the images themselves are the caller's)."""
        return {
            "controlnet_scale": list(self.scales),
            "control_start": list(self.starts),
            "control_end": list(self.ends),
        }


def load_control_image(image: Any, width: int, height: int) -> np.ndarray:
    """A control image (path, PIL image or HxWx3 uint8 array) -> (1, 3, H, W) float32 in
    [0, 1], refused unless it is exactly ``width`` x ``height`` (it is used as it is: no
    resizing, no preprocessing)."""
    pil = open_rgb(image, "control image")
    if pil.size != (width, height):
        raise InputError(
            f"control image is {pil.size[0]}x{pil.size[1]}; the image is {width}x{height}: "
            "pass control images of the output size (they are used as they are)"
        )
    x = np.asarray(pil, dtype=np.float32) / 255.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def control_image_size(control_image: Any) -> tuple[int, int] | None:
    """(width, height) of the first control image, to size a request that sets neither."""
    from .images import image_size

    first = control_image
    while isinstance(first, list | tuple) and first:
        first = first[0]
    if first is None or isinstance(first, list | tuple):
        return None
    try:
        return image_size(first)
    except InputError:
        return None  # the size check of load_control_image names the problem


def _per_controlnet(value: Any, n: int, what: str) -> tuple[float, ...]:
    values = list(value) if isinstance(value, list | tuple) else [value] * n
    if len(values) != n:
        raise InputError(f"{what}: {len(values)} values given for {n} ControlNets; pass one or {n}")
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise InputError(f"{what} must be a number, got {v!r}") from None
        if not math.isfinite(f):
            raise InputError(f"{what} must be finite, got {v!r}")
        out.append(f)
    return tuple(out)


def fill_size(control_image: Any, height: int | None, width: int | None) -> tuple[Any, Any]:
    """Height / width a request leaves unset, from its first control image's size."""
    if control_image is not None and (height is None or width is None):
        size = control_image_size(control_image)
        if size is not None:
            width = size[0] if width is None else width
            height = size[1] if height is None else height
    return height, width


def attach_controlnets(pipe: Any) -> ControlNetPlan | None:
    """Give a pipeline's denoise step the runner of its ControlNets (if it has any)."""
    plan = plan_of(pipe.manifest)
    if plan is not None:
        pipe.denoise_step.control = ControlNetRunner(
            plan, pipe.components, lambda name, feeds: pipe.engines[name].run(feeds)
        )
    return plan


def resolve_control(
    plan: ControlNetPlan | None,
    control_image: Any,
    controlnet_scale: Any,
    control_start: Any,
    control_end: Any,
    req: Any,
) -> RequestControl | None:
    """A request's control, validated (one-line InputError); None without control images.

    ``control_image``: with one ControlNet an image or a list of ``batch`` images; with
    several a list of one entry per ControlNet (each an image, ``batch`` images, or None to
    leave that ControlNet off)."""
    batch, height, width = req.batch, req.height, req.width
    if control_image is None:
        return None
    if plan is None:
        raise InputError(
            "control_image needs engines exported with `trt-sd export --controlnet`; these "
            "have no ControlNet"
        )
    n = len(plan.models)
    if n == 1 and not (isinstance(control_image, list | tuple) and len(control_image) == 1):
        entries = [control_image]
    elif isinstance(control_image, list | tuple):
        entries = list(control_image)
    else:
        entries = [control_image]
    if len(entries) != n:
        raise InputError(
            f"{len(entries)} control images given for {n} ControlNets "
            f"({', '.join(m.source or m.component for m in plan.models)}); pass one per ControlNet"
        )
    images: list[np.ndarray | None] = []
    for k, entry in enumerate(entries):
        if entry is None and n > 1:
            images.append(None)
            continue
        items = list(entry) if isinstance(entry, list | tuple) else [entry]
        if len(items) not in (1, batch):
            raise InputError(
                f"ControlNet {k}: {len(items)} control images for a batch of {batch}; pass one "
                f"(for every image) or {batch}"
            )
        loaded = np.concatenate([load_control_image(x, width, height) for x in items])
        images.append(np.repeat(loaded, batch, axis=0) if len(items) == 1 else loaded)
    scales = _per_controlnet(controlnet_scale, n, "controlnet_scale")
    starts = _per_controlnet(control_start, n, "control_start")
    ends = _per_controlnet(control_end, n, "control_end")
    for a, b in zip(starts, ends, strict=True):
        if not 0.0 <= a < b <= 1.0:
            raise InputError(
                f"control_start {a:g} and control_end {b:g} must satisfy 0 <= start < end <= 1"
            )
    return RequestControl(tuple(images), scales, starts, ends)


# ---- the residual feeds of one UNet call ----------------------------------------------------
Run = Callable[[str, dict[str, Any]], Mapping[str, Any]]


class ControlNetRunner:
    """Runs the ControlNets of one UNet call and returns the UNet's residual feeds."""

    def __init__(self, plan: ControlNetPlan, components: Mapping[str, Component], run: Run):
        self.plan = plan
        self.residuals = plan.residuals()
        self.names = [m.component for m in plan.models]
        self.inputs = {n: [s.name for s in components[n].inputs] for n in self.names}
        self.run = run

    def residual_feeds(
        self,
        feeds: Mapping[str, Any],
        lanes: Sequence[Any],
        timings: dict[str, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """Sum over ControlNets of residual x per-row scale; zeros for rows without control
        (or outside their window). ``feeds``: the UNet's own feeds of ``lanes``."""
        rows = sum(lane.rows for lane in lanes)
        sample = np.shape(feeds[self.plan.base.inputs[0].name])
        sizes = {"unet_batch": rows, "latent_height": sample[2], "latent_width": sample[3]}
        out: dict[str, np.ndarray] = {}
        for k, name in enumerate(self.names):
            scale = np.concatenate(
                [
                    np.full(lane.rows, lane.control.scales[k] if lane.control else 0.0, np.float32)
                    for lane in lanes
                ]
            )
            active = np.flatnonzero(scale)
            if not len(active):
                continue
            t0 = time.perf_counter()
            results = self.run(name, self._feeds(name, feeds, lanes, k, active, rows))
            if timings is not None:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
            factor = scale[active][:, None, None, None]
            for spec in self.residuals:
                part = np.asarray(results[spec.name], dtype=np.float32) * factor
                if spec.name not in out:
                    out[spec.name] = _zeros(spec.shape, sizes)
                out[spec.name][active] += part
        for spec in self.residuals:  # rows without control: the plain UNet
            if spec.name not in out:
                out[spec.name] = _zeros(spec.shape, sizes)
        return out

    def _feeds(
        self,
        name: str,
        feeds: Mapping[str, Any],
        lanes: Sequence[Any],
        k: int,
        active: np.ndarray,
        rows: int,
    ) -> dict[str, Any]:
        """The ControlNet's feeds on the ``active`` rows: the UNet's inputs and the lanes'
        control images (CFG lanes: the images for both halves, diffusers' order)."""
        images = []
        for lane in lanes:
            if lane.control is None or lane.control.images[k] is None:
                image_shape = next(
                    c.images[k].shape[1:]
                    for c in (other.control for other in lanes)
                    if c is not None and c.images[k] is not None
                )
                images.append(np.zeros((lane.rows, *image_shape), np.float32))
                continue
            img = lane.control.images[k]
            images.append(np.concatenate([img, img]) if lane.cfg else img)
        control = images[0] if len(images) == 1 else np.concatenate(images)
        whole = len(active) == rows
        out: dict[str, Any] = {}
        for input_name in self.inputs[name]:
            if input_name == CONTROL_IMAGE:
                out[input_name] = control if whole else control[active]
            else:
                value = feeds[input_name]
                out[input_name] = value if whole else np.asarray(value)[active]
        return out


def _zeros(shape: tuple[Any, ...], sizes: Mapping[str, int]) -> np.ndarray:
    return np.zeros(
        tuple(resolve_axis(s, sizes) if isinstance(s, str) else s for s in shape), np.float32
    )
