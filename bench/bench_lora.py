"""LoRA switch cost and generation time with vs without a LoRA, SD 1.5 architecture, CPU.

    nice python bench/bench_lora.py --engines DIR --model DIR [--size 256 --steps 4]

``--engines``: an fp32 ONNX engine directory of the SD 1.5-architecture model ``--model``
exported by this trt-sd (it has the LoRA weight maps). Two random kohya-format LoRAs of rank 16
on every attention projection of the UNet (``to_q/k/v/out.0``) and of the text encoder
(``q/k/v/out_proj``), the layers most LoRAs train, are written into ``--workdir``.

Measured in one run, ONNX Runtime CPU (``onnxruntime-cpu``, no optimised-graph cache):

* ``Pipeline.load`` (the base sessions; the peer of a cold switch: both build sessions);
* cold switch: the first call's LoRA work for a set (read the file, bind, patch from the base
  weights, create the patched UNet and text-encoder sessions), ``apply_loras`` alone;
* LRU hit: the same set again (``TRT_SD_LORA_SESSIONS`` keeps the last few sets' sessions);
* s/image without and with a LoRA (same seed, ``--steps`` DPM++ steps, CFG), measured one
  after the other, not alternating: the base sessions are freed before the patched ones are
  built, so at most one UNet session is in memory (the machine is shared);
* diffusers' peer on the same model and files: ``load_lora_weights`` + ``set_adapters`` (its
  per-request switch), and ``fuse_lora`` (what a baked deployment does per LoRA).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "a photo of an astronaut riding a horse on the moon"


def write_lora(engines: Path, target: Path, seed: int, rank: int = 16) -> Path:
    """A kohya-format LoRA (``lora_unet_`` / ``lora_te_`` keys, alpha = rank) with random
    factors sized from the engine's own weight maps."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for component, prefix, suffixes in (
        ("unet", "lora_unet_", ("to_q", "to_k", "to_v", "to_out.0")),
        ("text_encoder", "lora_te_", ("q_proj", "k_proj", "v_proj", "out_proj")),
    ):
        weights = json.loads((engines / f"{component}.lora.json").read_text())["weights"]
        for path, ref in weights.items():
            if not path.endswith(suffixes):
                continue
            out_dim, in_dim = ref["shape"][::-1] if ref["transposed"] else ref["shape"][:2]
            flat = prefix + ("text_model." if component != "unet" else "") + path
            flat = flat.replace(".", "_")
            tensors[f"{flat}.lora_down.weight"] = rng.standard_normal(
                (rank, in_dim), np.float32
            ) / np.sqrt(in_dim)
            tensors[f"{flat}.lora_up.weight"] = (
                rng.standard_normal((out_dim, rank), np.float32) * 0.01
            )
            tensors[f"{flat}.alpha"] = np.array(float(rank), np.float32)
    save_file(tensors, str(target))
    return target


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def ours(args: argparse.Namespace, files: list[Path]) -> dict[str, float]:
    """Sequential, at most one UNet session alive (a 2-core, 24 GB machine shared by others:
    two SD 1.5 fp32 sessions, ~7 GB each with ONNX Runtime's packed weights, were OOM-killed)."""
    from trt_sd.runtime import Pipeline
    from trt_sd.runtime.lora import apply_loras

    os.environ["TRT_SD_ORT_CACHE"] = "0"
    os.environ["TRT_SD_LORA_SESSIONS"] = "1"
    load_s, pipe = timed(lambda: Pipeline.load(args.engines, backend="onnxruntime-cpu"))
    kw = {"prompt": PROMPT, "steps": args.steps, "seed": 1, "height": args.size, "width": args.size}
    pipe(**kw)  # warm-up
    without = [timed(lambda: pipe(**kw))[0] for _ in range(args.rounds)]
    unet, text = pipe.engines["unet"], pipe.engines["text_encoder"]
    unet.session = text.session = None  # patched views build their own sessions
    gc.collect()

    def drop_views() -> None:
        for engine in (unet, text):
            engine.lora_sessions.views.clear()
        gc.collect()

    a = [(files[0], 1.0)]
    cold_s, _ = timed(lambda: apply_loras(pipe, a))
    hit_s, _ = timed(lambda: apply_loras(pipe, a))
    pipe(**kw, loras=a)  # warm-up of the patched sessions
    with_lora = [timed(lambda: pipe(**kw, loras=a))[0] for _ in range(args.rounds)]
    drop_views()
    cold_b_s, _ = timed(lambda: apply_loras(pipe, [(files[1], 1.0)]))
    drop_views()
    pipe = None
    gc.collect()
    return {
        "load_s": load_s,
        "switch_cold_s": cold_s,
        "switch_cold_b_s": cold_b_s,
        "switch_lru_hit_s": hit_s,
        "image_s_without": statistics.median(without),
        "image_s_with": statistics.median(with_lora),
    }


def diffusers_peer(args: argparse.Namespace, files: list[Path]) -> dict[str, float]:
    import diffusers
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        args.model, safety_checker=None, requires_safety_checker=False
    )
    out: dict[str, float] = {}
    out["load_a_s"], _ = timed(
        lambda: pipe.load_lora_weights(
            str(files[0].parent), weight_name=files[0].name, adapter_name="a"
        )
    )
    out["load_b_s"], _ = timed(
        lambda: pipe.load_lora_weights(
            str(files[1].parent), weight_name=files[1].name, adapter_name="b"
        )
    )
    out["set_adapters_s"], _ = timed(lambda: pipe.set_adapters(["a"], [1.0]))
    out["fuse_s"], _ = timed(lambda: pipe.fuse_lora(lora_scale=1.0, adapter_names=["a"]))
    out["unfuse_s"], _ = timed(lambda: pipe.unfuse_lora())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/trt-sd-bench-lora"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = [write_lora(args.engines, args.workdir / f"lora_{i}.safetensors", i) for i in (1, 2)]
    result = {"trt_sd": ours(args, files), "diffusers": diffusers_peer(args, files)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
