"""Forward hooks that record |activation| statistics of the layers to be quantized.

Two passes, so histograms have a fixed range without re-binning: while the calibration
trajectories are sampled the hooks keep a running max of |x| per tensor (enough for the
``minmax`` calibrator); the ``percentile`` and ``entropy`` calibrators then replay the captured
UNet inputs once more with 2048-bin histograms of |x| over ``[0, max]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibrators import HISTOGRAM_BINS, compute_amax

INPUT, OUTPUT = "input", "output"


@dataclass
class TensorStats:
    """Running max of |x| and (second pass) a histogram of |x| over ``[0, amax]``."""

    amax: float = 0.0
    hist: torch.Tensor | None = field(default=None, repr=False)

    def update_amax(self, x: torch.Tensor) -> None:
        self.amax = max(self.amax, float(x.detach().abs().max()))

    def update_hist(self, x: torch.Tensor) -> None:
        if self.amax <= 0:
            return
        values = x.detach().abs().float().clamp_(max=self.amax)
        counts = torch.histc(values, bins=HISTOGRAM_BINS, min=0.0, max=self.amax)
        self.hist = counts if self.hist is None else self.hist + counts


class RangeObserver:
    """Hooks on named submodules of ``model`` recording their input (and optionally output)."""

    def __init__(
        self, model: nn.Module, names: Iterable[str], outputs_of: Iterable[str] = ()
    ) -> None:
        modules = dict(model.named_modules())
        self.stats: dict[tuple[str, str], TensorStats] = {}
        self.mode = "amax"
        self._handles = []
        wanted_outputs = set(outputs_of)
        for name in names:
            self.stats[(name, INPUT)] = TensorStats()
            if name in wanted_outputs:
                self.stats[(name, OUTPUT)] = TensorStats()
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def record(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._update(self.stats[(name, INPUT)], args[0])
            out_stats = self.stats.get((name, OUTPUT))
            if out_stats is not None:
                self._update(out_stats, output)

        return record

    def _update(self, stats: TensorStats, x: torch.Tensor) -> None:
        if self.mode == "amax":
            stats.update_amax(x)
        elif self.mode == "hist":
            stats.update_hist(x)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> RangeObserver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def amax(self, name: str, which: str, calibrator: str, percentile: float) -> float:
        """The calibrated range of one tensor (``which`` is ``"input"`` or ``"output"``)."""
        stats = self.stats[(name, which)]
        hist = None if stats.hist is None else stats.hist.double().numpy()
        return compute_amax(stats.amax, hist, calibrator, percentile)
