"""TensorRT-RTX ahead-of-time build time and engine size per component, SD 1.5 architecture at
512x512, on this CPU-only machine (TensorRT-RTX builds without a GPU).

Builds the SD 1.5-architecture folder with random weights (``bench_export.build_sd15``), runs
``trt-sd export --backend tensorrt-rtx --precision fp16`` at 512x512 in a child process (the
engine cache in a private ``TRT_SD_HOME``, so nothing comes from an earlier run), and prints one
row per component from the manifest: ONNX size, engine size, engine build seconds, whole
component export seconds (torch load + ONNX export + verification + build). Then it rebuilds
each component's engine from the ONNX already in the engine directory for a single target
(``--single 8.6``) to show what the target list costs.

    nice python bench/bench_tensorrt_build.py --work /tmp/trt-sd-bench [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_export import build_sd15


def child_export(model: str, out: str) -> None:
    from trt_sd.export import export_model

    export_model(
        model, out, precision="fp16", backend="tensorrt-rtx", height=512, width=512, batch="1:4"
    )


def single_target_builds(out: Path, target: str, home: Path) -> dict[str, tuple[float, int]]:
    """Rebuild every engine of ``out`` from its ONNX for one target: (seconds, bytes)."""
    from trt_sd.export.tensorrt_build import BuildOptions, build_engine
    from trt_sd.models import Manifest, all_components

    manifest = Manifest.load(out)
    comps = all_components(manifest.dims)
    results = {}
    for name, entry in manifest.components.items():
        options = BuildOptions(
            precision=entry.precision, flavour="tensorrt-rtx", compute_capabilities=(target,)
        )
        onnx = out / str(entry.extra["onnx_file"])
        r = build_engine(onnx, comps[name], entry.shape_range, options, home / f"single-{target}")
        results[name] = (r.seconds, r.size_bytes)
    return results


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default="/tmp/trt-sd-bench")
    parser.add_argument("--single", default="8.6", help="target of the single-target rebuild")
    parser.add_argument("--reuse", action="store_true", help="keep an existing engine directory")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_export(*args.child)
        return 0
    work = Path(args.work)
    home = work / "rtx-home"
    model = build_sd15(work / "sd15")
    out = work / "engines-rtx-fp16"
    env = {**os.environ, "TRT_SD_HOME": str(home)}
    seconds = None
    if not (args.reuse and (out / "manifest.json").is_file()):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--child", str(model), str(out)], check=True, env=env
        )
        seconds = time.perf_counter() - t0
    raw = json.loads((out / "manifest.json").read_text())
    os.environ["TRT_SD_HOME"] = str(home)
    single = single_target_builds(out, args.single, home)
    first = next(iter(raw["components"].values()))
    targets = ", ".join(first["compute_capabilities"])
    print(f"TensorRT-RTX {first['tensorrt_version']}, fp16 export at 512x512, batch 1:4")
    if seconds is not None:
        print(f"whole export: {seconds:.0f} s")
    print(
        f"\n| component | precision | ONNX | engine ({targets}) | build | engine ({args.single}) "
        "| build | component export |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, e in raw["components"].items():
        s_sec, s_bytes = single[name]
        print(
            f"| {name} | {e['precision']} | {_mib(e['bytes'])} | {_mib(e['engine_bytes'])} | "
            f"{e['build_seconds']:.1f} s | {_mib(s_bytes)} | {s_sec:.1f} s | "
            f"{e['export_seconds']:.0f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
