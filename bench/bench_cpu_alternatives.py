"""The alternatives to an OpenVINO bf16 backend, measured: ONNX Runtime options and bf16 graphs.

    nice python bench/bench_cpu_alternatives.py --engines DIR [--size 256 --rounds 3]

Why: before adding an engine library, check whether ONNX Runtime (the existing CPU path) can
be made as fast. On the SD 1.5 UNet of ``--engines`` (2 rows, ``--size`` pixels), alternating
in each round: ONNX Runtime with trt-sd's session options; the same plus the options that could
matter on the CPU (``session.intra_op.allow_spinning=0``, ``session.set_denormal_as_zero``,
``mlas.enable_gemm_fastmath_arm64_bfloat16``: the one bf16 switch ONNX Runtime has, documented
for ARM64); OpenVINO fp32 and bf16 with trt-sd's settings, with dynamic shapes (what the
backend compiles) and reshaped to the call's static shapes. Then whether ONNX Runtime's CPU
provider runs bf16 or fp16 graphs at all, on one 2048² MatMul (a bf16 graph is refused: no
kernel; fp16 runs, timed against fp32).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_peers import alternate, unet_feeds

N = 2048


def ort_session(path: Path, extra: dict[str, str]) -> Any:
    import onnxruntime as ort

    from trt_sd.runtime.backends.onnxruntime import session_options

    so = session_options(ort)
    for key, value in extra.items():
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def ov_compiled(path: Path, precision: str, feeds: dict[str, np.ndarray] | None) -> Any:
    import openvino as ov

    from trt_sd.runtime.backends.onnxruntime import intra_op_threads

    core = ov.Core()
    model = core.read_model(str(path))
    if feeds is not None:
        model.reshape({p.get_any_name(): list(feeds[p.get_any_name()].shape) for p in model.inputs})
    config = {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": intra_op_threads(),
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
    }
    return core.compile_model(model, "CPU", config).create_infer_request()


def matmul_graph(dtype: int) -> bytes:
    from onnx import helper

    x = helper.make_tensor_value_info("x", dtype, [N, N])
    w = helper.make_tensor_value_info("w", dtype, [N, N])
    y = helper.make_tensor_value_info("y", dtype, [N, N])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [x, w], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def onnxruntime_low_precision(rounds: int) -> None:
    import onnxruntime as ort
    from onnx import TensorProto

    from trt_sd.runtime.backends.onnxruntime import session_options

    rng = np.random.default_rng(0)
    calls = {}
    for name, dtype, np_dtype in (
        ("fp32", TensorProto.FLOAT, np.float32),
        ("fp16", TensorProto.FLOAT16, np.float16),
        ("bf16", TensorProto.BFLOAT16, None),
    ):
        try:
            sess = ort.InferenceSession(matmul_graph(dtype), session_options(ort))
        except Exception as e:
            print(f"  ONNX Runtime {name} MatMul graph: refused: {str(e).splitlines()[0][:160]}")
            continue
        feeds = {k: rng.standard_normal((N, N)).astype(np_dtype) for k in ("x", "w")}
        calls[f"ONNX Runtime {name} 2048² MatMul"] = lambda s=sess, f=feeds: s.run(None, f)
    times = alternate(calls, rounds)
    for name, t in times.items():
        print(f"  {name:<34}{min(t) * 1e3:8.1f} ms  {2 * N**3 / 1e9 / min(t):6.0f} GFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from trt_sd.models.manifest import Manifest

    manifest = Manifest.load(Path(args.engines))
    path = Path(args.engines) / manifest.components["unet"].file
    feeds = unet_feeds(args.size, manifest.dims.vae_scale_factor, manifest.dims.text_hidden_size)
    sessions = {
        "ORT, trt-sd options": ort_session(path, {}),
        "ORT, no spinning, denormals as zero, arm64 bf16 fastmath": ort_session(
            path,
            {
                "session.intra_op.allow_spinning": "0",
                "session.set_denormal_as_zero": "1",
                "mlas.enable_gemm_fastmath_arm64_bfloat16": "1",
            },
        ),
    }
    calls = {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
    for precision in ("f32", "bf16"):
        for shapes, fixed in (("dynamic", None), ("static", feeds)):
            request = ov_compiled(path, precision, fixed)
            calls[f"OpenVINO {precision}, {shapes} shapes"] = lambda r=request: r.infer(feeds)
    load = os.getloadavg()[0]
    times = alternate(calls, args.rounds)
    print(f"UNet, 2 rows, {args.size}x{args.size}; load {load:.2f} -> {os.getloadavg()[0]:.2f}")
    base = times["ORT, trt-sd options"]
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t, base, strict=True))
        print(f"  {name:<58}{statistics.median(t):7.3f} s  x{ratio:.3f} of ORT")
    onnxruntime_low_precision(args.rounds)


if __name__ == "__main__":
    main()
