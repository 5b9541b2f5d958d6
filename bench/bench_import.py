"""Import time and installed size of the lean runtime vs the diffusers stack.

    python bench/bench_import.py [--repeats 15] [--json]

Import time: median wall time of a fresh interpreter running each import statement, minus the
median of a bare interpreter (``python -c pass``), so the figure is what the import itself
costs. Installed size: the bytes on disk of every file the installed distributions list
(``importlib.metadata`` RECORDs), over the transitive closure of their requirements (extras not
taken), i.e. what ``pip install`` of that set puts in site-packages.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

IMPORTS = {
    "bare interpreter": "pass",
    "import trt_sd.runtime": "import trt_sd.runtime",
    "from trt_sd.runtime import Pipeline": "from trt_sd.runtime import Pipeline",
    "Pipeline + onnxruntime": "from trt_sd.runtime import Pipeline; import onnxruntime",
    "from diffusers import StableDiffusionPipeline": (
        "from diffusers import StableDiffusionPipeline; StableDiffusionPipeline.__mro__"
    ),
}
STACKS = {
    "runtime base (no engine library)": ["numpy", "tokenizers", "pillow", "tqdm"],
    "runtime (base + cpu extra)": ["numpy", "tokenizers", "pillow", "tqdm", "onnxruntime"],
    "diffusers + torch": ["diffusers", "torch"],
    "diffusers + torch + transformers": ["diffusers", "torch", "transformers"],
}


def time_import(statement: str, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def closure(names: list[str]) -> dict[str, str]:
    """Installed distributions reachable from ``names`` through unconditional requirements."""
    seen: dict[str, str] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        seen[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def installed_bytes(names: dict[str, str]) -> int:
    total = 0
    files = set()
    for name in names:
        for f in distribution(name).files or []:
            path = f.locate()
            if path not in files and path.is_file():
                files.add(path)
                total += path.stat().st_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    times = {label: time_import(stmt, args.repeats) for label, stmt in IMPORTS.items()}
    bare = times["bare interpreter"]
    sizes = {}
    for label, roots in STACKS.items():
        dists = closure(roots)
        sizes[label] = {"bytes": installed_bytes(dists), "distributions": sorted(dists)}
    print(f"import time (median of {args.repeats} fresh interpreters, bare startup subtracted)")
    for label, seconds in times.items():
        if label != "bare interpreter":
            print(f"  {label:<48} {seconds - bare:6.3f} s")
    print(f"  (bare interpreter startup {bare:.3f} s)")
    print("installed size (transitive requirements, files on disk)")
    for label, info in sizes.items():
        print(
            f"  {label:<48} {info['bytes'] / 2**20:8.1f} MiB  ({len(info['distributions'])} dists)"
        )
    if args.json:
        out = {
            "import_s": {k: v - bare for k, v in times.items() if k != "bare interpreter"},
            "bare_interpreter_s": bare,
            "installed": sizes,
        }
        print(json.dumps(out))


if __name__ == "__main__":
    main()
