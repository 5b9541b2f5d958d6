"""trt-sd's CPU path against the CPU runtimes people pick, side by side in one process.

    nice python bench/bench_cpu_peers.py unet --engines DIR --model DIR --sizes 256,512 --rounds 5
    nice python bench/bench_cpu_peers.py e2e --engines DIR --model DIR --size 256 --steps 10
    python bench/bench_cpu_peers.py rows --engines DIR --size 32 --rows 2,8,32,100

Contenders, all on the same engine directory (the fp32 graphs ``trt-sd export`` writes for ONNX
Runtime; OpenVINO reads them as they are):

* ``trt-sd default``: ``backend="auto"`` (OpenVINO bf16 on CPUs with native bf16, else ONNX
  Runtime), i.e. what ``trt-sd run`` does;
* ``trt-sd onnxruntime``: ``backend="onnxruntime-cpu"``;
* ``openvino default``: ``openvino.Core().compile_model(graph, "CPU")`` with no settings at all
  (OpenVINO's own threads, precision and hints), what a user of OpenVINO gets;
* ``sd.cpp``: stable-diffusion.cpp through ``stable_diffusion_cpp`` (ggml, the only other
  torch-free runtime) on the diffusers folder ``--model``; skipped when not installed. It
  exposes no UNet call, so its UNet figure is the cost of one more sampling step (two CFG rows),
  ``t(steps=2) - t(steps=1)`` of whole generations. Opt-in (``--sdcpp``): on the shared 2-core
  dev machine it took ~53 s per step at 256² (docs/benchmarks.md), minutes per round;
* ``diffusers`` (``e2e`` only): torch, the reference of the end-to-end goal.

``unet``: per call at 2 rows (one CFG image) for each ``--sizes``, contenders alternating within
each round so a change in machine load hits all alike; reports medians, per-round ratios to the
best peer, GFLOP per call (counted from the graph: Convolution, MatMul, attention) and the share
of this machine's bf16 and fp32 matmul peaks (a 2048² MatMul in OpenVINO, measured in the same
rounds); ``--int8-engines DIR`` adds the INT8 directory of the same model on ``auto``, ONNX
Runtime, trt-sd's ``openvino`` and OpenVINO's defaults, and ``--ab`` trt-sd's backend with
OpenVINO's settings (settings vs wrapper). ``e2e``: whole generations (DPM++ 2M, CFG 7.5, same
prompt) alternating the same way, with each pipeline's per-component seconds and its host time
(sampler, casts, image conversion). ``rows``: trt-sd's ONNX Runtime and OpenVINO backends at
several rows per call (where a batch-aware ``auto`` would flip). Contenders rotate their order
each round.
The 1-minute load average is printed before and after: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Call = Callable[[], Any]
PROMPT = "a photo of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, low quality"
PEAK_N = 2048


def unet_feeds(size: int, factor: int, hidden: int, rows: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    lat = size // factor
    return {
        "sample": rng.standard_normal((rows, 4, lat, lat)).astype(np.float32),
        "timestep": np.full(rows, 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((rows, 77, hidden)).astype(np.float32),
    }


def graph_gflop(path: Path, feeds: dict[str, np.ndarray]) -> float:
    """GFLOP of one call: 2 x multiply-adds of every Convolution, MatMul and attention op of the
    graph reshaped to ``feeds``' shapes (elementwise ops, norms and softmax not counted)."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    model.reshape(
        {
            p.get_any_name(): ov.PartialShape(list(feeds[p.get_any_name()].shape))
            for p in model.inputs
        }
    )
    total = 0.0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "Convolution":
            out, w = op.get_output_shape(0), op.get_input_shape(1)
            total += 2.0 * np.prod(out) * np.prod(list(w)[1:])
        elif kind == "MatMul":
            a, out = list(op.get_input_shape(0)), op.get_output_shape(0)
            k = a[-2] if op.get_attributes().get("transpose_a") else a[-1]
            total += 2.0 * np.prod(out) * k
        elif kind == "ScaledDotProductAttention":
            q, k = list(op.get_input_shape(0)), list(op.get_input_shape(1))
            total += 4.0 * np.prod(q) * k[-2]  # QK^T and PV, each 2*L*S*D per head
    return total / 1e9


def matmul_peak(precision: str, threads: int) -> Call:
    """One 2048² fp32 MatMul in OpenVINO with ``precision`` arithmetic (fp32 tensors)."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([PEAK_N, PEAK_N], ov.Type.f32)
    w = ops.constant(np.random.default_rng(1).standard_normal((PEAK_N, PEAK_N), np.float32))
    model = ov.Model([ops.matmul(x, w, False, False)], [x])
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    data = np.random.default_rng(2).standard_normal((PEAK_N, PEAK_N), np.float32)
    return lambda: request.infer([data])


def ov_default(path: Path, feeds: dict[str, np.ndarray]) -> Call:
    import openvino as ov

    request = ov.Core().compile_model(str(path), "CPU").create_infer_request()
    return lambda: request.infer(feeds)


def trt_sd_component(engines: Path, name: str, backend: str, feeds: dict) -> tuple[Call, str]:
    from trt_sd.models.descriptors import all_components
    from trt_sd.models.manifest import Manifest
    from trt_sd.runtime.backends import create_backend

    manifest = Manifest.load(engines)
    comp = all_components(manifest.dims)[name]
    engine = create_backend(backend, engines, comp, manifest.components[name])
    return (lambda: engine.run(feeds)), engine.kind


def sdcpp_folder(model: Path) -> Path:
    """``model`` as stable-diffusion.cpp's diffusers reader wants it: transformers 5 saves
    ``CLIPTextModel`` keys without the ``text_model.`` prefix, which sd.cpp needs to recognise
    the text encoder (and so the SD version). A sibling folder links the UNet and VAE and holds
    a re-keyed copy of the text encoder."""
    from safetensors.numpy import load_file, save_file

    out = model.parent / f"{model.name}-sdcpp"
    te = out / "text_encoder" / "model.safetensors"
    if te.is_file():
        return out
    for sub in ("unet", "vae"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        link = out / sub / "diffusion_pytorch_model.safetensors"
        if not link.exists():
            link.symlink_to(model / sub / "diffusion_pytorch_model.safetensors")
    tensors = load_file(str(model / "text_encoder" / "model.safetensors"))
    keyed = {
        k
        if k.startswith("text_model.") or k.startswith("text_projection")
        else f"text_model.{k}": v
        for k, v in tensors.items()
    }
    te.parent.mkdir(parents=True, exist_ok=True)
    save_file(keyed, str(te))
    return out


def sdcpp(model: Path, threads: int) -> Any:
    """A stable-diffusion.cpp context on the diffusers folder, or None when not installed."""
    try:
        from stable_diffusion_cpp import StableDiffusion
    except ImportError:
        return None
    folder = sdcpp_folder(model)
    return StableDiffusion(model_path=str(folder), n_threads=threads, verbose=False)


def sdcpp_generate(sd: Any, size: int, steps: int) -> Call:
    return lambda: sd.generate_image(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=size,
        height=size,
        cfg_scale=7.5,
        sample_method="dpm++2m",
        sample_steps=steps,
        seed=0,
    )


def alternate(calls: dict[str, Call], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each contender per round (:func:`alternate_results` without the
    results)."""
    return alternate_results(calls, rounds)[0]


def alternate_results(
    calls: dict[str, Call], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """One warm-up call each, then ``rounds`` rounds timing each contender once in turn; the
    order rotates by one contender per round, so no contender always runs right after the
    same neighbour (a torch or ONNX Runtime pool still spinning, a cold cache). Returns the
    times and what each call returned (``GenerationResult.timings`` for the e2e breakdown)."""
    for call in calls.values():
        call()
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, list[Any]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t = time.perf_counter()
            out = calls[name]()
            times[name].append(time.perf_counter() - t)
            results[name].append(out)
    return times, results


def summarize(times: dict[str, list[float]], ours: str, peers: list[str]) -> dict[str, Any]:
    """Medians, and per round the ratio of ``ours`` to the fastest peer of that round."""
    med = {name: statistics.median(v) for name, v in times.items()}
    rounds = len(next(iter(times.values())))
    ratios = [times[ours][r] / min(times[p][r] for p in peers) for r in range(rounds)]
    best = min(peers, key=lambda p: med[p])
    return {
        "median_s": med,
        "best_peer": best,
        "ratio_to_best_peer_median": statistics.median(ratios),
        "ratio_to_best_peer_rounds": ratios,
        "all_s": times,
    }


def unet_contenders(args: argparse.Namespace, size: int) -> tuple[dict[str, Call], str, Path]:
    """The UNet calls to alternate at ``size``: ours first, then the peers and references."""
    from trt_sd.models.manifest import Manifest
    from trt_sd.runtime.backends.openvino import OpenVinoBackend

    engines = Path(args.engines)
    manifest = Manifest.load(engines)
    unet_path = engines / manifest.components["unet"].file
    feeds = unet_feeds(size, manifest.dims.vae_scale_factor, manifest.dims.text_hidden_size)
    default, kind = trt_sd_component(engines, "unet", "auto", feeds)
    ours = f"trt-sd default ({kind})"
    calls: dict[str, Call] = {ours: default}
    if not args.no_ort:
        calls["trt-sd onnxruntime"] = trt_sd_component(engines, "unet", "onnxruntime-cpu", feeds)[0]
    calls["openvino default"] = ov_default(unet_path, feeds)
    if args.ab:  # our wrapper with OpenVINO's settings: separates settings from the wrapper
        from trt_sd.models.descriptors import all_components

        entry = manifest.components["unet"]
        comp = all_components(manifest.dims)["unet"]
        plain = OpenVinoBackend(unet_path, comp, entry, config={})
        calls["trt-sd openvino, OpenVINO's settings"] = lambda: plain.run(feeds)
    if args.int8_engines:
        int8 = Path(args.int8_engines)
        int8_path = int8 / Manifest.load(int8).components["unet"].file
        run8, kind8 = trt_sd_component(int8, "unet", "auto", feeds)
        calls[f"trt-sd default, int8 engines ({kind8})"] = run8
        if kind8 != "onnxruntime-cpu":
            calls["trt-sd onnxruntime, int8"] = trt_sd_component(
                int8, "unet", "onnxruntime-cpu", feeds
            )[0]
        if not kind8.startswith("openvino"):
            calls["trt-sd openvino, int8"] = trt_sd_component(int8, "unet", "openvino", feeds)[0]
        calls["openvino default, int8 graph"] = ov_default(int8_path, feeds)
    return calls, ours, unet_path


def run_unet(args: argparse.Namespace) -> dict[str, Any]:
    engines, threads = Path(args.engines), args.threads
    from trt_sd.models.manifest import Manifest

    dims = Manifest.load(engines).dims
    sd = sdcpp(Path(args.model), threads) if args.model and args.sdcpp else None
    report: dict[str, Any] = {}
    for size in args.sizes:
        feeds = unet_feeds(size, dims.vae_scale_factor, dims.text_hidden_size)
        calls, ours, unet_path = unet_contenders(args, size)
        if sd is not None:
            one, two = sdcpp_generate(sd, size, 1), sdcpp_generate(sd, size, 2)
            calls["sd.cpp (1 step)"], calls["sd.cpp (2 steps)"] = one, two
        if not args.no_peak:
            calls["matmul peak bf16"] = matmul_peak("bf16", threads)
            calls["matmul peak fp32"] = matmul_peak("f32", threads)
        load = os.getloadavg()[0]
        times = alternate(calls, args.rounds)
        del calls  # frees the compiled models before the next size
        if sd is not None:
            two_t, one_t = times.pop("sd.cpp (2 steps)"), times.pop("sd.cpp (1 step)")
            times["sd.cpp (per step)"] = [a - b for a, b in zip(two_t, one_t, strict=True)]
        peak = {
            p: 2 * PEAK_N**3 / 1e9 / min(times.pop(f"matmul peak {p}"))
            for p in ("bf16", "fp32")
            if f"matmul peak {p}" in times
        }
        peers = [n for n in times if n != ours and n.startswith(("openvino default", "sd.cpp"))]
        entry = summarize(times, ours, peers)
        gflop = graph_gflop(unet_path, feeds)
        base = times["openvino default"]
        entry.update(
            gflop_per_call=gflop,
            matmul_peak_gflops=peak,
            share_of_peak={
                name: {p: gflop / statistics.median(t) / peak[p] for p in peak}
                for name, t in times.items()
            },
            ratio_to_openvino_default={
                name: statistics.median(a / b for a, b in zip(t, base, strict=True))
                for name, t in times.items()
            },
            load_before_after=(load, os.getloadavg()[0]),
        )
        report[str(size)] = entry
        print_unet(size, entry)
    return report


def print_unet(size: int, e: dict[str, Any]) -> None:
    peak = e["matmul_peak_gflops"]
    print(
        f"\nUNet call, 2 rows, {size}x{size}: {e['gflop_per_call']:.0f} GFLOP; matmul peak "
        + " / ".join(f"{p} {v:.0f}" for p, v in peak.items())
        + f" GFLOP/s; load {e['load_before_after'][0]:.2f} -> {e['load_before_after'][1]:.2f}"
    )
    for name, t in e["median_s"].items():
        share = "  ".join(f"{v:6.1%} of {p} peak" for p, v in e["share_of_peak"][name].items())
        ratio = e["ratio_to_openvino_default"][name]
        print(f"  {name:<42}{t:8.3f} s  x{ratio:.3f} of openvino default  {share}")
    print(
        f"  ratio default / best peer ({e['best_peer']}): median of rounds "
        f"{e['ratio_to_best_peer_median']:.3f}"
    )


def run_rows(args: argparse.Namespace) -> dict[str, Any]:
    """UNet per call in trt-sd's ONNX Runtime and OpenVINO backends at each of ``--rows``
    (rows = 2 x images per call with CFG): where ``auto``'s choice should flip."""
    from trt_sd.models.manifest import Manifest

    engines = Path(args.engines)
    dims = Manifest.load(engines).dims
    report: dict[str, Any] = {}
    for rows in args.rows:
        feeds = unet_feeds(args.size, dims.vae_scale_factor, dims.text_hidden_size, rows)
        calls = {
            kind: trt_sd_component(engines, "unet", kind, feeds)[0]
            for kind in ("onnxruntime-cpu", "openvino")
        }
        load = os.getloadavg()[0]
        times = alternate(calls, args.rounds)
        ratio = statistics.median(
            a / b for a, b in zip(times["openvino"], times["onnxruntime-cpu"], strict=True)
        )
        med = {k: statistics.median(v) for k, v in times.items()}
        report[str(rows)] = dict(median_s=med, openvino_over_ort=ratio, load=load, all_s=times)
        print(
            f"  rows {rows:4d}: onnxruntime-cpu {med['onnxruntime-cpu'] * 1e3:8.1f} ms  openvino "
            f"{med['openvino'] * 1e3:8.1f} ms  openvino / ORT {ratio:.3f}  (load {load:.2f})",
            flush=True,
        )
    return report


def run_e2e(args: argparse.Namespace) -> dict[str, Any]:
    from trt_sd.runtime import Pipeline

    engines, size, steps = Path(args.engines), args.size, args.steps
    from trt_sd.models.manifest import Manifest

    dims = Manifest.load(engines).dims
    lat = size // dims.vae_scale_factor
    latents = np.random.default_rng(0).standard_normal((1, 4, lat, lat)).astype(np.float32)
    kwargs = dict(sampler="dpm++", steps=steps, guidance=7.5, latents=latents)
    calls: dict[str, Call] = {}
    pipes = {"trt-sd default": Pipeline.load(engines, backend="auto")}
    if not args.no_ort:
        pipes["trt-sd onnxruntime"] = Pipeline.load(engines, backend="onnxruntime-cpu")
    pipes["openvino default"] = _ov_default_pipeline(engines)
    for label, pipe in pipes.items():
        calls[label] = lambda p=pipe: p(PROMPT, NEGATIVE, **kwargs)
    kinds = sorted({e.kind for e in pipes["trt-sd default"].engines.values()})
    sd = sdcpp(Path(args.model), args.threads) if args.model and args.sdcpp else None
    if sd is not None:
        calls["sd.cpp"] = sdcpp_generate(sd, size, steps)
    if args.model and not args.no_diffusers:
        calls["diffusers"] = _diffusers(Path(args.model), latents, args)
    load = os.getloadavg()[0]
    times, results = alternate_results(calls, args.rounds)
    peers = [n for n in times if not n.startswith("trt-sd") and n != "diffusers"]
    entry = summarize(times, "trt-sd default", peers or ["trt-sd onnxruntime"])
    entry["components_median_s"] = breakdown(results, times)
    if "diffusers" in times:
        entry["ratio_to_diffusers_median"] = statistics.median(
            a / b for a, b in zip(times["trt-sd default"], times["diffusers"], strict=True)
        )
    entry.update(default_kinds=kinds, load_before_after=(load, os.getloadavg()[0]))
    print(
        f"\nend to end {size}x{size}, DPM++ 2M {steps} steps, CFG 7.5 (default = {kinds}); "
        f"load {load:.2f} -> {entry['load_before_after'][1]:.2f}"
    )
    for name, t in entry["median_s"].items():
        parts = entry["components_median_s"].get(name, {})
        print(f"  {name:<24}{t:8.2f} s  " + "  ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    print(
        f"  default / best peer ({entry['best_peer']}): {entry['ratio_to_best_peer_median']:.3f}"
        + (
            f"; default / diffusers {entry['ratio_to_diffusers_median']:.3f}"
            if "diffusers" in times
            else ""
        )
    )
    return entry


def breakdown(results: dict[str, list[Any]], times: dict[str, list[float]]) -> dict[str, Any]:
    """Median seconds per component of each trt-sd pipeline contender (its
    ``GenerationResult.timings``), plus ``host``: the generation's own time outside the engine
    calls (sampler, casts, CFG, image conversion), and ``call``: the bench's time around the
    pipeline call beyond the generation's ``total`` (argument checks before its clock starts)."""
    out: dict[str, Any] = {}
    for name, rows in results.items():
        timings = [getattr(r, "timings", None) for r in rows]
        if not timings or any(t is None for t in timings):
            continue
        keys = [k for k in timings[0] if k != "total"]
        parts = {k: statistics.median(t.get(k, 0.0) for t in timings) for k in keys}
        parts["host"] = statistics.median(
            t["total"] - sum(t.get(k, 0.0) for k in keys) for t in timings
        )
        parts["call"] = statistics.median(
            s - t["total"] for s, t in zip(times[name], timings, strict=True)
        )
        out[name] = parts
    return out


def _ov_default_pipeline(engines: Path) -> Any:
    """trt-sd's pipeline with every engine swapped for OpenVINO compiled with no settings."""
    from trt_sd.runtime import Pipeline
    from trt_sd.runtime.backends.openvino import OpenVinoBackend

    pipe = Pipeline.load(engines, backend="onnxruntime-cpu")  # swapped below, one at a time
    for name, engine in list(pipe.engines.items()):
        path = engines / engine.entry.file
        pipe.engines[name] = OpenVinoBackend(path, engine.component, engine.entry, config={})
        pipe.engines[name].kind = "openvino-default"
        del engine
    return pipe


def _diffusers(model: Path, latents: np.ndarray, args: argparse.Namespace) -> Call:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_pipeline import diffusers_runner

    ns = argparse.Namespace(threads=args.threads, steps=args.steps, guidance=7.5)
    return diffusers_runner(model, latents, ns)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("unet", "e2e", "rows"))
    parser.add_argument("--engines", required=True, help="fp32 engine directory (ONNX Runtime)")
    parser.add_argument("--model", help="its diffusers folder (sd.cpp, diffusers)")
    parser.add_argument("--sizes", default="256,512", help="unet: comma-separated image sizes")
    parser.add_argument("--size", type=int, default=256, help="e2e, rows: image size")
    parser.add_argument("--rows", default="2,8,32,100", help="rows: UNet rows per call")
    parser.add_argument("--steps", type=int, default=10, help="e2e: sampling steps")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: physical cores")
    parser.add_argument("--sdcpp", action="store_true", help="include stable-diffusion.cpp")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--no-ort", action="store_true", help="leave trt-sd onnxruntime out")
    parser.add_argument("--no-peak", action="store_true", help="unet: no matmul peak calls")
    parser.add_argument(
        "--ab", action="store_true", help="unet: add trt-sd's backend with OpenVINO's settings"
    )
    parser.add_argument(
        "--int8-engines", help="unet: an INT8 engine directory of the same model (4 more calls)"
    )
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    from trt_sd.runtime.backends import physical_cores

    args.threads = args.threads or physical_cores()
    os.environ["TRT_SD_NUM_THREADS"] = str(args.threads)
    args.sizes = [int(s) for s in str(args.sizes).split(",")]
    args.rows = [int(r) for r in str(args.rows).split(",")]
    report = {"unet": run_unet, "e2e": run_e2e, "rows": run_rows}[args.what](args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
