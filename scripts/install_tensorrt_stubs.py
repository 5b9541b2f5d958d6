"""Install the ``tensorrt-stubs`` type stubs where mypy (and only mypy) sees them.

Why not a plain ``pip install``: the published package (10.13.0.35.1) declares the TensorRT
libraries as dependencies (they come only from NVIDIA's index, unreachable here), and it puts a
``tensorrt/`` folder holding only ``__init__.pyi`` into site-packages, which makes
``import tensorrt`` succeed as an empty namespace package and fools backend detection. So the
stubs go into ``.typestubs/`` (``--no-deps --target``), which ``[tool.mypy] mypy_path`` names.

As published mypy cannot read them; three mechanical fixes make it check real API use:
parameters named ``in`` (a keyword) become ``in_``; ``add_scale_nd``'s ``channel_axis`` follows
parameters with defaults, so it gets one; and ``py.typed`` markers are added.

It also links the project's own packages under ``TARGET/trt_sd`` for mypy (see
:func:`link_sources`).

Usage: ``python scripts/install_tensorrt_stubs.py [TARGET]`` (default ``.typestubs``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

VERSION = "10.13.0.35.1"


def patch(target: Path) -> None:
    for pyi in target.glob("tensorrt*/**/*.pyi"):
        text = pyi.read_text("utf-8")
        fixed = re.sub(r"(?<=[(,\s])in(?=\s*:)", "in_", text)
        fixed = fixed.replace("channel_axis: int)", "channel_axis: int = 0)")
        if fixed != text:
            pyi.write_text(fixed, "utf-8")
    for pkg in ("tensorrt", "tensorrt_bindings"):
        (target / pkg / "py.typed").write_text("", "utf-8")


def link_sources(target: Path) -> None:
    """Mirror the ``trt_sd`` namespace (top-level folders mapped by pyproject) as symlinks
    under the mypy path, so mypy resolves ``trt_sd.models`` and friends to the real sources;
    mypy cannot follow setuptools' editable-install finder."""
    repo = Path(__file__).resolve().parent.parent
    ns = target / "trt_sd"
    ns.mkdir(parents=True, exist_ok=True)
    for sub in ("samplers", "runtime", "export", "models"):
        link = ns / sub
        if not link.is_symlink():
            link.symlink_to(repo / sub, target_is_directory=True)


def main() -> int:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".typestubs").resolve()
    if not (target / "tensorrt_bindings" / "tensorrt.pyi").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(target),
                f"tensorrt-stubs=={VERSION}",
            ],
            check=True,
        )
    patch(target)
    link_sources(target)
    print(f"tensorrt stubs ready in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
