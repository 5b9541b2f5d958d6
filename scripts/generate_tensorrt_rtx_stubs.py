"""Generate type stubs for TensorRT-RTX from the installed bindings, where mypy sees them.

TensorRT-RTX ships compiled pybind11 bindings and no ``.pyi``; ``pybind11-stubgen`` (``dev``
extra) writes real stubs from them on any machine (no GPU needed, ~1 s, ~11,000 lines). Nothing
is hand-edited: the same three mechanical fixes as ``install_tensorrt_stubs.py`` make mypy read
them (parameters named ``in`` become ``in_``; ``add_scale_nd``'s ``channel_axis`` follows
parameters with defaults, so it gets one; ``py.typed`` markers), the import of the
``tensorrt_rtx_libs`` loader helper (no types) is dropped, and ``tensorrt_rtx/__init__.pyi``
re-exports the bindings as the real ``tensorrt_rtx/__init__.py`` does.

Usage: ``python scripts/generate_tensorrt_rtx_stubs.py [TARGET]`` (default ``.typestubs``).
CI runs it, then mypy twice over ``.ci/mypy-files``: against the TensorRT 10 stubs and, with
``--always-true TRT_RTX_TYPES``, against these.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BINDINGS = "tensorrt_rtx_bindings"


def generate(target: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pybind11_stubgen",
            BINDINGS,
            "-o",
            str(target),
            "--ignore-all-errors",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def patch(target: Path) -> None:
    for pyi in (target / BINDINGS).glob("*.pyi"):
        text = pyi.read_text("utf-8")
        fixed = re.sub(r"(?<=[(,\s])in(?=\s*:)", "in_", text)
        fixed = re.sub(
            r"channel_axis: typing\.SupportsInt\)", "channel_axis: typing.SupportsInt = 0)", fixed
        )
        fixed = fixed.replace("import tensorrt_rtx_libs as tensorrt_rtx_libs\n", "")
        if fixed != text:
            pyi.write_text(fixed, "utf-8")
    (target / BINDINGS / "py.typed").write_text("", "utf-8")
    package = target / "tensorrt_rtx"
    package.mkdir(exist_ok=True)
    (package / "__init__.pyi").write_text(
        f"from {BINDINGS} import *\nfrom {BINDINGS} import __version__ as __version__\n", "utf-8"
    )
    (package / "py.typed").write_text("", "utf-8")


def main() -> int:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".typestubs").resolve()
    target.mkdir(parents=True, exist_ok=True)
    generate(target)
    patch(target)
    lines = sum(len(p.read_text("utf-8").splitlines()) for p in (target / BINDINGS).glob("*.pyi"))
    print(f"tensorrt_rtx stubs ({lines} lines) generated in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
