"""Export time and peak memory for the Stable Diffusion 1.5 architecture (random weights).

Builds a diffusers folder with SD 1.5's UNet (860M parameters), CLIP ViT-L/14 text encoder and
SD VAE configs and random weights (no hub here), then times ``trt_sd.export.export_model`` in a
child process and reads that child's peak resident memory (``ru_maxrss``), so the model
building above does not count. A second export of the same inputs measures the reuse path
(hashing only). ``--compare-exporters`` also exports the UNet alone with both
``torch.onnx.export`` modes and prints node counts and op types (the choice documented in
``trt_sd.export.onnx_export``).

    nice python bench/bench_export.py --work /tmp/trt-sd-bench [--compare-exporters]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from trt_sd.models.scheduler_configs import sd15_scheduler_config

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}
CLIP_VIT_L_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
SD15_SCHEDULER = sd15_scheduler_config()


def build_sd15(folder: Path) -> Path:
    """A diffusers SD 1.5-architecture folder with random weights (skipped if present)."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trt_sd.models.tokenizer_build import write_clip_tokenizer

    torch.manual_seed(0)
    words = ["a", "photo", "of", "an", "astronaut", "riding", "horse"]
    write_clip_tokenizer(folder / "tokenizer", words)
    CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L_TEXT)).save_pretrained(folder / "text_encoder")
    UNet2DConditionModel(**SD15_UNET).save_pretrained(folder / "unet")
    AutoencoderKL(**SD_VAE).save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def run_child(argv: list[str]) -> tuple[float, float]:
    """Run ``python this-file argv`` and return (wall seconds, peak RSS in GiB) of the child."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *argv])
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {argv} failed")
    return seconds, usage.ru_maxrss / 2**20  # Linux reports KiB


def child_export(model: str, out: str, precision: str) -> None:
    from trt_sd.export import export_model

    export_model(model, out, precision=precision, height=512, width=512, batch="1:4")


def child_compare(model: str, work: str) -> None:
    """Export the UNet alone with both exporters; print node counts and the top op types."""
    import numpy as np
    import onnx
    import torch
    from diffusers import UNet2DConditionModel

    from trt_sd.export.modules import UNetWrapper
    from trt_sd.export.onnx_export import export_onnx, trace_sizes
    from trt_sd.export.verify import random_inputs
    from trt_sd.models import ModelDims, all_components

    comp = all_components(ModelDims())["unet"]
    module = UNetWrapper(UNet2DConditionModel.from_pretrained(Path(model) / "unet")).eval()
    feeds = random_inputs(
        comp,
        trace_sizes("unet", 3, 8),
        "fp32",
        np.random.default_rng(0),
        vocab_size=49408,
        num_train_timesteps=1000,
    )
    results = {}
    path = Path(work) / "cmp-torchscript" / "unet.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    export_onnx(module, comp, feeds, path, opset=17, fp16=False)
    results["torchscript + onnxscript.optimizer (opset 17)"] = (time.perf_counter() - t0, path)
    dyn = Path(work) / "cmp-dynamo" / "unet.onnx"
    dyn.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    torch.onnx.export(
        module,
        args,
        str(dyn),
        input_names=comp.input_names,
        output_names=comp.output_names,
        dynamic_axes=comp.dynamic_axes(),
        opset_version=18,
        dynamo=True,
        external_data=True,
    )
    results["dynamo=True (opset 18, its own optimizer)"] = (time.perf_counter() - t0, dyn)
    for label, (seconds, p) in results.items():
        graph = onnx.load(str(p), load_external_data=False).graph
        ops = Counter(n.op_type for n in graph.node)
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(12))
        print(f"| {label} | {seconds:.0f} s | {len(graph.node)} | {top} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/trt-sd-bench-export", help="scratch folder")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--compare-exporters", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        {"export": child_export, "compare": child_compare}[kind](*rest)
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = build_sd15(work / "sd15")
    print(f"model folder ready in {time.perf_counter() - t0:.0f} s: {model}", flush=True)
    out = work / f"engines-{args.precision}"
    seconds, peak = run_child(["--child", "export", str(model), str(out), args.precision])
    again, peak_again = run_child(["--child", "export", str(model), str(out), args.precision])
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"\nfirst export: {seconds:.0f} s wall, peak RSS {peak:.1f} GiB")
    print(f"re-export (all reused): {again:.0f} s wall, peak RSS {peak_again:.1f} GiB\n")
    print("| component | precision | size | total | ORT verify | max rel error |")
    print("|---|---|---|---|---|---|")
    for name, c in manifest["components"].items():
        v = c["verification"]
        print(
            f"| {name} | {c['precision']} | {c['bytes'] / 2**20:.0f} MiB | "
            f"{c['export_seconds']:.0f} s | {v['seconds']:.0f} s | {v['max_rel_error']:.1e} |"
        )
    if args.compare_exporters:
        print("\n| exporter | time | nodes | top op types |\n|---|---|---|---|")
        run_child(["--child", "compare", str(model), str(work)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
