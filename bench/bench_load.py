"""Cold start: ``Pipeline.load`` with and without the optimised-graph cache (``TRT_SD_ORT_CACHE``).

    python bench/bench_load.py --engines /tmp/trt-sd-bench/sd15/engines-256 [--repeats 3]

(``bench/bench_pipeline.py --model sd15`` writes that engine directory.) Each load runs in a
fresh interpreter, as a service replica's start does: ``off`` (no cache: ONNX Runtime
optimises every graph), ``cold`` (an empty cache: optimise and write), then ``off`` and
``warm`` (the cache filled by ``cold``) alternated ``--repeats`` times. The cache lives in a
temporary folder that is deleted afterwards. Also checks that a generation from the cached
graphs gives the same image as one from the engine files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
import numpy as np
t0 = time.perf_counter()
from trt_sd.runtime import Pipeline
pipe = Pipeline.load(sys.argv[1], backend="onnxruntime-cpu")
seconds = time.perf_counter() - t0
image = pipe("a photo", steps=2, seed=1).images[0] if sys.argv[2] == "1" else None
print(json.dumps({"load_s": seconds, "checksum": None if image is None else int(image.sum())}))
"""


def load_once(engines: str, cache: Path | None, generate: bool) -> dict:
    env = dict(os.environ)
    env.pop("TRT_SD_ORT_CACHE", None)
    if cache is not None:
        env["TRT_SD_ORT_CACHE"] = str(cache)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, engines, "1" if generate else "0"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", required=True, help="an ONNX engine directory")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="trt-sd-ort-cache-"))
    try:
        t0 = time.perf_counter()
        cold = load_once(args.engines, cache, generate=True)
        print(f"cold (optimise + write the cache): {cold['load_s']:.2f} s", flush=True)
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        times: dict[str, list[float]] = {"off": [], "warm": []}
        for _ in range(args.repeats):
            for mode in ("off", "warm"):
                row = load_once(args.engines, cache if mode == "warm" else None, generate=False)
                times[mode].append(row["load_s"])
                print(f"{mode}: {row['load_s']:.2f} s", flush=True)
        plain = load_once(args.engines, None, generate=True)
        cached = load_once(args.engines, cache, generate=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    off, warm = statistics.median(times["off"]), statistics.median(times["warm"])
    print(f"\nPipeline.load, median of {args.repeats} fresh processes each")
    print(f"  no cache      {off:6.2f} s")
    gib = size / 2**30
    print(f"  cache, cold   {cold['load_s']:6.2f} s (once per machine; writes {gib:.2f} GiB)")
    print(f"  cache, warm   {warm:6.2f} s ({warm / off:.2f}x)")
    same = plain["checksum"] == cached["checksum"] == cold["checksum"]
    print(f"  same image from cached graphs: {same}")
    print(f"  (bench wall time {time.perf_counter() - t0:.0f} s)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
