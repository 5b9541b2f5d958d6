"""DeepCache at run time: the full UNet on key calls, the shallow UNet on the others.

DeepCache (Ma et al. 2023) observes that the deep features of the UNet's up path change little
between neighbouring denoising steps. An engine directory exported with ``trt-sd export
--deepcache [BRANCH]`` has a ``unet`` that also returns the hidden state entering the up layer
of skip branch ``BRANCH`` and a ``unet_shallow`` that computes only the layers down to that
branch and back up, reading the deep feature instead (manifest ``unet_deepcache``).

The schedule is over *model calls*, not timesteps: call 0 is always a key call, and a cached
feature is used by the calls after it until the next key call. Samplers that evaluate the
UNet twice per step or twice at one timestep (Heun, DPM2, PNDM's first step) are served the
same way as single-evaluation ones: a repeated timestep is just another call, never mistaken
for the key call that computed the cache. Interval ``N``:

* ``uniform``: key calls ``0, N, 2N, ...``;
* ``nonuniform``: the same number of key calls, ``ceil(calls / N)``, placed denser around a
  centre (30% into the schedule) and sparser away from it, following the paper's non-uniform
  1:N strategy: ``floor(c + sign(u) |u|^p)`` for ``u`` evenly spaced in
  ``[-c^(1/p), (calls - c)^(1/p)]``, with the power ``p`` lowered from 1.4 until the calls
  are distinct.

Each generation has its own :class:`DeepCacheState` (the cache belongs to one request), so a
pipeline serves concurrent requests with different intervals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trt_sd.models.descriptors import UNET, Component
from trt_sd.models.errors import InputError
from trt_sd.models.manifest import Manifest
from trt_sd.models.unet_plans import DeepCachePlan
from trt_sd.models.unet_stages import UNET_SHALLOW

SCHEDULES = ("uniform", "nonuniform")


@dataclass(frozen=True)
class DeepCacheConfig:
    """Cache interval and where the key calls go."""

    interval: int
    schedule: str = "uniform"
    center: float = 0.3  # nonuniform: where key calls are densest, as a fraction of the calls
    power: float = 1.4  # nonuniform: initial power of the spacing

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int):
            raise InputError(f"deepcache interval must be an integer, got {self.interval!r}")
        if self.interval < 1:
            raise InputError(
                f"deepcache interval must be >= 1 (0 on the CLI / API turns the cache off), "
                f"got {self.interval}"
            )
        if self.schedule not in SCHEDULES:
            raise InputError(
                f"deepcache schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if not 0.0 <= self.center <= 1.0 or not self.power > 1.0:
            raise InputError("deepcache center must be in [0, 1] and power above 1")

    def key_calls(self, calls: int) -> list[int]:
        """Indices of the model calls that run the full UNet (always including 0)."""
        if calls <= 0:
            return []
        if self.interval == 1:
            return list(range(calls))
        if self.schedule == "uniform":
            return list(range(0, calls, self.interval))
        wanted = math.ceil(calls / self.interval)
        c = self.center * calls
        p = self.power
        while p > 1.0:
            u = np.linspace(-(c ** (1 / p)), (calls - c) ** (1 / p), wanted + 1)
            picks = np.floor(c + np.sign(u) * np.abs(u) ** p).astype(int)[1:-1]
            keys = sorted({0, *(int(k) for k in picks if 0 < k < calls)})
            if len(keys) == wanted:
                return keys
            p -= 0.02
        return list(range(0, calls, self.interval))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"interval": self.interval, "schedule": self.schedule}
        if self.schedule == "nonuniform":
            out.update(center=self.center, power=self.power)
        return out


def parse_deepcache(value: Any) -> DeepCacheConfig | None:
    """``None`` / ``0`` (off), an interval ``N``, ``"N"``, ``"N:nonuniform"``, a dict of
    :class:`DeepCacheConfig` fields or a config. Interval 1 means every call is a key call."""
    if value is None or value is False:
        return None
    if isinstance(value, DeepCacheConfig):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - set(DeepCacheConfig.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown deepcache options: {', '.join(sorted(unknown))}")
        return DeepCacheConfig(**value)
    if isinstance(value, str):
        interval, _, schedule = value.partition(":")
        try:
            number = int(interval)
        except ValueError:
            raise InputError(
                f"deepcache must be N or N:uniform|nonuniform (cache interval), got {value!r}"
            ) from None
        return None if number == 0 else DeepCacheConfig(number, schedule or "uniform")
    if isinstance(value, int) and not isinstance(value, bool):
        return None if value == 0 else DeepCacheConfig(value)
    raise InputError(f"deepcache must be an interval N (or None), got {value!r}")


class DeepCacheState:
    """One generation's cache: which calls are key calls, and the feature they left."""

    def __init__(self, config: DeepCacheConfig, calls: int, feature: str) -> None:
        self.config = config
        self.keys = set(config.key_calls(calls))
        self.feature = feature
        self.cached: Any = None
        self.full_calls = 0
        self.shallow_calls = 0
        self._rows = -1

    def run(
        self, i: int, feeds: Mapping[str, Any], full: Any, shallow: Any, keep: bool = False
    ) -> dict[str, Any]:
        """Model call ``i``: the full UNet (caching the feature) on key calls, else the
        shallow one on the cached feature. ``full`` / ``shallow`` are engine backends."""
        rows = len(next(iter(feeds.values())))
        if i in self.keys or self.cached is None or self._rows != rows:
            out = full.run(feeds, keep_on_device=(self.feature,) if keep else ())
            self.cached, self._rows = out[self.feature], rows
            self.full_calls += 1
            return out
        self.shallow_calls += 1
        return shallow.run({**feeds, self.feature: self.cached})

    def summary(self) -> dict[str, Any]:
        return {
            **self.config.to_dict(),
            "full_calls": self.full_calls,
            "shallow_calls": self.shallow_calls,
        }


def deepcache_plan(manifest: Manifest) -> DeepCachePlan | None:
    """The DeepCache plan of an engine directory exported with ``--deepcache``, else None."""
    raw = manifest.raw.get("unet_deepcache")
    if not raw:
        return None
    base = manifest.family.components(manifest.dims)[UNET]
    return DeepCachePlan.from_dict(raw, manifest.dims, base)


def deepcache_components(manifest: Manifest) -> dict[str, Component]:
    """Descriptors that replace / extend :func:`all_components` for a DeepCache export: the
    full UNet (with its feature output) and the shallow UNet."""
    plan = deepcache_plan(manifest)
    return {} if plan is None else {UNET: plan.full(), UNET_SHALLOW: plan.shallow()}


def resolve_deepcache(manifest: Manifest, value: Any) -> DeepCacheConfig | None:
    """``value`` parsed, refused with a one-line InputError on engines without DeepCache."""
    config = parse_deepcache(value)
    if config is not None and deepcache_plan(manifest) is None:
        raise InputError(
            "deepcache needs engines exported with `trt-sd export --deepcache`; these have "
            "no shallow UNet"
        )
    return config
