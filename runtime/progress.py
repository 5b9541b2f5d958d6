"""Progress reporting over UNet calls: off, a tqdm bar on stderr, or the caller's callback."""

from __future__ import annotations

import sys
from collections.abc import Callable

ProgressArg = bool | Callable[[int, int], None] | None
Reporter = Callable[[int, int], None]


def progress_reporter(progress: ProgressArg, total: int) -> Reporter | None:
    """A ``(done, total)`` callback, or None when off; ``done == -1`` closes it.

    tqdm is imported only when a bar is asked for, and writes to stderr so stdout stays
    machine-readable (``trt-sd run --json``).
    """
    if progress is None or progress is False:
        return None
    if callable(progress):
        user = progress
        return lambda done, n: None if done < 0 else user(done, n)
    from tqdm import tqdm

    bar = tqdm(total=total, desc="unet", unit="call", file=sys.stderr, leave=False)

    def update(done: int, n: int) -> None:
        if done < 0:
            bar.close()
        else:
            bar.update(done - bar.n)

    return update
