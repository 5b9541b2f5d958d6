"""INT8 benchmarks: ONNX Runtime CPU speed on the SD 1.5 UNet, and quality on the default model.

``speed``: the Stable Diffusion 1.5 UNet architecture with random weights (860M parameters,
built from its config as bench/bench_export.py does; no hub), exported fp32 and rewritten to
INT8 Q/DQ in both flavours by trt-sd's own code (ranges from the percentile calibrator on
random latents at timesteps across the schedule: random weights have no real trajectories).
One process times, interleaved round by round so background load hits all alike: a 2048^2
fp32 matmul (the machine's fp32 peak, ONNX Runtime and NumPy), the fp32 UNet and each INT8
graph, at 2x4x32x32 latents (batch 2 = one CFG image at 256 px). Also prints which kernels
ONNX Runtime picked (optimised-graph op counts) and an op-type time profile.

``quality``: exports the bundled default model (or ``--model``) with several INT8 recipes and
prints each accuracy report (UNet output cosine per timestep, image PSNR, prompt accuracy).

    python bench/bench_int8.py speed --work /tmp/trt-sd-int8 --repeats 7 [--profile]
    python bench/bench_int8.py quality --work /tmp/trt-sd-int8 --images 500
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trt_sd.export.int8.layers import DEFAULT_EXCLUDE

LATENT = (2, 4, 32, 32)
#: GFLOP of one SD 1.5 UNet call at LATENT (Conv 222, Linear 121, attention 17; torch hooks).
UNET_GFLOP = 360.2
FLAVOURS = ("onnxruntime", "tensorrt")


# ---------------------------------------------------------------------------------- speed
def build_graphs(work: Path, calib_rows: int) -> dict[str, Path]:
    """fp32 and INT8 (both flavours) SD 1.5 UNet graphs under ``work`` (cached)."""
    import onnx
    import torch
    from bench_export import SD15_UNET
    from diffusers import UNet2DConditionModel

    from trt_sd.export.int8.layers import select_layers
    from trt_sd.export.int8.ptq import conv_layers
    from trt_sd.export.int8.qdq_graph import LayerRanges, insert_qdq
    from trt_sd.export.modules import UNetWrapper
    from trt_sd.export.onnx_export import export_onnx, trace_sizes
    from trt_sd.export.ort_attention import fuse_attention
    from trt_sd.export.verify import random_inputs
    from trt_sd.models import ModelDims, all_components

    paths = {"fp32": work / "fp32" / "unet.onnx", "fp32+mha": work / "fp32-mha" / "unet.onnx"}
    paths.update({f: work / f"int8-{f}" / "unet.onnx" for f in FLAVOURS})
    if all(p.is_file() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    wrapper = UNetWrapper(unet).eval().requires_grad_(False)
    component = all_components(ModelDims())["unet"]
    if not paths["fp32"].is_file():
        t0 = time.perf_counter()
        feeds = random_inputs(
            component,
            trace_sizes("unet", 3, 8),
            "fp32",
            np.random.default_rng(0),
            vocab_size=49408,
            num_train_timesteps=1000,
        )
        paths["fp32"].parent.mkdir(parents=True, exist_ok=True)
        export_onnx(wrapper, component, feeds, paths["fp32"], opset=17, fp16=False)
        print(f"fp32 export: {time.perf_counter() - t0:.0f} s", flush=True)
    selection = select_layers(unet)
    quantized, excluded = selection.quantized, selection.excluded
    convs = conv_layers(unet, quantized)
    ranges = _calibrate(wrapper, unet, quantized, excluded, convs, work, calib_rows)
    del wrapper, unet
    if not paths["fp32+mha"].is_file():
        model = onnx.load(str(paths["fp32"]))
        fuse_attention(model)
        paths["fp32+mha"].parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(
            model, str(paths["fp32+mha"]), save_as_external_data=True, location="unet.onnx.data"
        )
        del model
    for flavour in FLAVOURS:
        if paths[flavour].is_file():
            continue
        model = onnx.load(str(paths["fp32"]))
        plan = {
            k: r if flavour == "onnxruntime" else LayerRanges(r.input_amax)
            for k, r in ranges.items()
        }
        summary = insert_qdq(model, plan, flavour)
        fused = fuse_attention(model) if flavour == "onnxruntime" else 0
        paths[flavour].parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(model, str(paths[flavour]))
        del model
        size = paths[flavour].stat().st_size
        fp32 = sum(p.stat().st_size for p in paths["fp32"].parent.iterdir())
        print(
            f"int8 {flavour}: {summary.op_counts()}, {fused} fused attentions, "
            f"{size / 2**20:.0f} MiB ({1 - size / fp32:.1%} smaller than fp32's "
            f"{fp32 / 2**20:.0f} MiB)",
            flush=True,
        )
    return paths


def _calibrate(wrapper, unet, quantized, excluded, convs, work: Path, calib_rows: int) -> dict:
    """Percentile ranges from random latents across the schedule (cached in ``work``)."""
    import torch

    from trt_sd.export.int8.observe import INPUT, OUTPUT, RangeObserver
    from trt_sd.export.int8.qdq_graph import LayerRanges

    cache = work / f"ranges-{calib_rows}.json"
    if cache.is_file():
        raw = json.loads(cache.read_text())
        return {k: LayerRanges(v[0], None, v[1]) for k, v in raw.items()}
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with RangeObserver(unet, quantized, convs) as observer, torch.no_grad():
        batches = []
        for t in np.linspace(980, 20, calib_rows // 2):
            sigma = float(np.sqrt(1.0 / _alpha_bar(t) - 1.0))
            x = (rng.standard_normal(LATENT) / np.sqrt(1.0 + sigma**2)).astype(np.float32)
            batches.append((x, np.full(2, t, np.float32), rng.standard_normal((2, 77, 768))))
        for mode in ("amax", "hist"):
            observer.mode = mode
            for x, t, h in batches:
                wrapper(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(h).float())
        ranges = {
            f"unet.{n}": LayerRanges(
                input_amax=observer.amax(n, INPUT, "percentile", 99.99),
                output_amax=observer.amax(n, OUTPUT, "percentile", 99.99) if n in convs else None,
            )
            for n in quantized
        }
    ranges.update({f"unet.{n}": LayerRanges(input_amax=None) for n in excluded})
    print(f"calibration ({calib_rows} rows, 2 passes): {time.perf_counter() - t0:.0f} s")
    cache.write_text(json.dumps({k: [r.input_amax, r.output_amax] for k, r in ranges.items()}))
    return ranges


def _alpha_bar(t: float) -> float:
    """SD's scaled-linear schedule at integer timestep ``t``."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return float(np.cumprod(1.0 - betas)[int(t)])


def session(path: Path, threads: int, optimized: Path | None = None, profile: str | None = None):
    """An ONNX Runtime CPU session with the runtime's options (trt_sd.runtime.backends)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", optimized.name + ".data"
        )
    if profile is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def matmul_session(threads: int):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "mm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2048, 2048]) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2048, 2048])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def kernel_counts(path: Path, work: Path, threads: int) -> dict[str, int]:
    """Op types of ONNX Runtime's optimised graph: which layers run as int8 kernels."""
    import onnx

    dump = work / f"optimized-{path.parent.name}.onnx"
    session(path, threads, optimized=dump)
    counts = Counter(n.op_type for n in onnx.load(str(dump), load_external_data=False).graph.node)
    for p in (dump, dump.with_name(dump.name + ".data")):
        p.unlink(missing_ok=True)
    keys = ("QLinearConv", "MatMulIntegerToFloat", "QGemm", "QLinearMatMul", "Conv", "MatMul")
    return {k: counts[k] for k in keys if counts[k]}


def op_profile(sessions: dict, feeds: dict, work: Path, threads: int, paths: dict) -> None:
    """Time per op type (ms per call) for each graph, from ONNX Runtime's profiler."""
    for name, path in paths.items():
        s = session(path, threads, profile=str(work / f"profile-{name}"))
        for _ in range(3):
            s.run(None, feeds)
        events = json.loads(Path(s.end_profiling()).read_text())
        runs = sum(1 for e in events if e.get("name") == "model_run")
        per_op: Counter = Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per_op[e["args"]["op_name"]] += e["dur"]
        total = sum(per_op.values())
        top = ", ".join(
            f"{op} {d / runs / 1e3:.0f} ms ({d / total:.0%})" for op, d in per_op.most_common(7)
        )
        print(f"  {name}: {total / runs / 1e3:.0f} ms in kernels; {top}")


def speed(args: argparse.Namespace) -> None:
    work = Path(args.work)
    paths = build_graphs(work, args.calib_rows)
    threads = args.threads
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal(LATENT).astype(np.float32),
        "timestep": np.full(LATENT[0], 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((LATENT[0], 77, 768)).astype(np.float32),
    }
    print(f"load average before the run: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    paths = {k: p for k, p in paths.items() if k in args.graphs}
    sessions = {name: session(p, threads) for name, p in paths.items()}
    outputs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}  # warm-up
    ref = outputs["fp32"].ravel().astype(np.float64)
    for name in (f for f in FLAVOURS if f in sessions):
        out = outputs[name].ravel().astype(np.float64)
        cos = out @ ref / np.linalg.norm(out) / np.linalg.norm(ref)
        print(f"int8 {name} output cosine to fp32 (random weights, random input): {cos:.4f}")
    mm = matmul_session(threads)
    a = rng.standard_normal((2048, 2048)).astype(np.float32)
    mm.run(None, {"a": a, "b": a})
    times: dict[str, list[float]] = {k: [] for k in ["matmul-ort", "matmul-numpy", *sessions]}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        mm.run(None, {"a": a, "b": a})
        times["matmul-ort"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _ = a @ a
        times["matmul-numpy"].append(time.perf_counter() - t0)
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[name].append(time.perf_counter() - t0)
    load = os.getloadavg()
    print(f"\nload average during the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"ONNX Runtime intra-op threads: {threads}; {args.repeats} interleaved rounds\n")
    mm_flop = 2 * 2048**3 / 1e9
    peak = max(mm_flop / min(times["matmul-ort"]), mm_flop / min(times["matmul-numpy"]))
    print("| measurement | median | min | GFLOP/s (min) | share of matmul peak |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        flop = mm_flop if name.startswith("matmul") else UNET_GFLOP
        rate = flop / min(values)
        print(
            f"| {name} | {statistics.median(values) * 1e3:.0f} ms | {min(values) * 1e3:.0f} ms "
            f"| {rate:.0f} | {rate / peak:.0%} |"
        )
    print("\n| int8 / fp32 (same round) | median | best |\n|---|---|---|")
    for name in (f for f in FLAVOURS if f in sessions):
        for base in (b for b in ("fp32", "fp32+mha") if b in sessions):
            ratios = [i / f for i, f in zip(times[name], times[base], strict=True)]
            print(
                f"| {name} flavour / {base} | {statistics.median(ratios):.3f} | {min(ratios):.3f} |"
            )
    print("\nONNX Runtime kernels (optimised graph):")
    for name, path in paths.items():
        print(f"  {name}: {kernel_counts(path, work, threads)}")
    if args.profile:
        print("\nop-type profile (3 calls each):")
        op_profile(sessions, feeds, work, threads, paths)


# ---------------------------------------------------------------------------------- quality
RECIPES = {
    "PTQ percentile (default)": {},
    "PTQ entropy": {"calibrator": "entropy"},
    "PTQ minmax": {"calibrator": "minmax"},
    "PTQ, excluded layers' weights float": {"excluded_weights": "float"},
    "PTQ, tensorrt flavour": {"qdq_flavour": "tensorrt"},
    "QAT (300 steps)": {"qat": True},
    "PTQ, nothing excluded": {"exclude": ()},
    "QAT, nothing excluded": {"exclude": (), "qat": True},
    "PTQ, shortcut convs quantized too": {
        "exclude": tuple(p for p in DEFAULT_EXCLUDE if "shortcut" not in p)
    },
    "PTQ, CFG 1": {"guidance": 1.0},
    "QAT, CFG 1": {"guidance": 1.0, "qat": True},
}


def quality(args: argparse.Namespace) -> None:
    import torch

    from trt_sd.export import export_model
    from trt_sd.models import DEFAULT_MODEL_DIR

    torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    prompts = Path(__file__).resolve().parents[1] / "models" / "calibration_prompts.txt"
    chosen = [k for k in RECIPES if not args.only or any(o in k for o in args.only)]
    print(
        "| recipe | size vs fp32 | UNet cosine mean / min | cosine first / last step "
        "| PSNR mean / min | prompt accuracy int8 (fp32) | export time |"
    )
    print("|---|---|---|---|---|---|---|")
    for label in chosen:
        out = Path(args.work) / "quality" / label.replace(" ", "_").replace(",", "")
        t0 = time.perf_counter()
        options = {
            "calib_prompts": str(prompts),
            "report_images": args.images,
            **RECIPES[label],
        }
        manifest = export_model(model, out, precision="int8", int8=options, progress=False)
        seconds = time.perf_counter() - t0
        q = manifest.quantization
        r, g = q["report"], q["graph"]
        steps = r["unet_cosine_per_step"]
        acc = r["prompt_accuracy"]
        accuracy = f"{acc['int8']:.1%} ({acc['fp32']:.1%})" if acc else "-"
        print(
            f"| {label} | -{g['size_reduction']:.1%} | {r['unet_cosine_mean']:.5f} / "
            f"{r['unet_cosine_min']:.4f} | {steps[0]['mean']:.5f} / {steps[-1]['mean']:.5f} | "
            f"{r['image_psnr_db']['mean']:.1f} / {r['image_psnr_db']['min']:.1f} dB | "
            f"{accuracy} | {seconds:.0f} s |",
            flush=True,
        )
        if q.get("qat"):
            t = q["qat"]
            print(
                f"|  (QAT held-out MSE: PTQ {t['eval_mse_ptq']:.3g} -> QAT {t['eval_mse_qat']:.3g})"
                " | | | | | | |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed", help="ONNX Runtime CPU speed of the SD 1.5 UNet, fp32 vs INT8")
    s.add_argument("--work", default="/tmp/trt-sd-int8")
    s.add_argument("--repeats", type=int, default=7)
    s.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    s.add_argument("--calib-rows", type=int, default=16, help="random calibration rows")
    s.add_argument("--profile", action="store_true", help="op-type time profile")
    s.add_argument(
        "--graphs",
        nargs="+",
        default=["fp32", "fp32+mha", *FLAVOURS],
        help="graphs to time (fp32 fp32+mha onnxruntime tensorrt)",
    )
    q = sub.add_parser("quality", help="INT8 recipes on the default model: accuracy reports")
    q.add_argument("--work", default="/tmp/trt-sd-int8")
    q.add_argument("--model", default=None, help="diffusers folder (default: bundled model)")
    q.add_argument("--images", type=int, default=500, help="report images per recipe")
    q.add_argument("--threads", type=int, default=1, help="torch threads")
    q.add_argument("--only", nargs="*", help="run only recipes whose label contains these")
    args = parser.parse_args()
    {"speed": speed, "quality": quality}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
