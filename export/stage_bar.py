"""Per-component progress bars whose steps are the export stages (shared by whole-component,
UNet-section and INT8 builds)."""

from __future__ import annotations

import sys


class StageBar:
    """A tqdm bar per component whose steps are the export stages."""

    STAGES: tuple[str, ...] = ("load", "torch", "export", "verify", "hash")

    def __init__(self, name: str, enabled: bool, engine: bool = False) -> None:
        self.name = name
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=len(self.STAGES) + int(engine),
                desc=f"{name:<12} {'':<6}",
                file=sys.stderr,
                bar_format="{desc} {bar:20} {n}/{total} [{elapsed}]",
            )
        self._started = False

    def stage(self, label: str) -> None:
        if self.bar is not None:
            if self._started:
                self.bar.update(1)
            self._started = True
            self.bar.set_description_str(f"{self.name:<12} {label:<6}")

    def close(self, message: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_description_str(f"{self.name:<12} {'done':<6}")
            self.bar.close()
            self.bar.write(message, file=sys.stderr)
