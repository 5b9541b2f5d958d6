"""SDXL end to end on the CPU: trt-sd's runtime vs diffusers, same latents; export time and peak
memory. The issue's goal: trt-sd end to end <= 0.5x diffusers' time.

    nice python bench/bench_sdxl.py make   --workdir /tmp/sdxl-bench [--scale full|reduced]
    nice python bench/bench_sdxl.py export --workdir /tmp/sdxl-bench --size 512
    nice python bench/bench_sdxl.py e2e    --workdir /tmp/sdxl-bench --size 512 --steps 4 \
        --backend auto,onnxruntime-cpu

``make`` writes a diffusers SDXL base folder with random weights from the architecture of
``stabilityai/stable-diffusion-xl-base-1.0`` (UNet 2.57 B parameters: blocks 320/640/1280,
transformer depths 1/2/10, context 2048, text-time conditioning; CLIP ViT-L and OpenCLIP bigG
text encoders; SDXL's VAE). ``--unet-depth N`` keeps all of that but N transformer blocks
at the lowest level instead of 10 (N=2: a 0.90 B UNet, SD 1.5's size; the figures are then
of that smaller UNet and say so). ``--scale reduced`` shrinks every width and depth so the
script itself can be tried in a minute; its figures say nothing about SDXL. One component is built,
saved and freed at a time (the fp32 UNet alone is 10.3 GB). ``--weights fp16`` saves
half-size files (what SDXL checkpoints ship); both exporters load them as fp32.

``export`` runs ``trt_sd.export.export_model`` (fp32 ONNX, ``--size``, batch 1) in a child
under ``/usr/bin/time -v`` and reports its wall time and peak resident memory.

``e2e`` runs each side in its own child process (the machine cannot hold both fp32 pipelines at
once): diffusers' ``StableDiffusionXLPipeline`` on the folder, then trt-sd's ``Pipeline`` on the
engines once per backend in ``--backend`` (comma-separated, default ``auto``), the same
prompt, negative prompt, initial latents, Euler sampler (SDXL's scheduler config), steps and
CFG scale; ``--warmup`` untimed calls (default 1) then ``--rounds`` timed calls each; the
figure is the median. Each trt-sd image is compared with diffusers' too (same work: fp32
ONNX Runtime matches diffusers to a few 1/255; OpenVINO's bf16 does not). The 1-minute load
average is printed before and after: the machine may be shared. Memory per side: peak RSS
(``/usr/bin/time``, which counts mapped weight-file pages too) and peak anonymous memory
(:class:`AnonPeak`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = "a photo of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, low quality"
GUIDANCE = 5.0

SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu"}  # fmt: skip
CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
             "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"}  # fmt: skip
SDXL_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
#: ``--scale reduced``: same structure, small widths and depths (tries the script only)
REDUCED: dict[str, dict[str, Any]] = {
    "unet": {
        "block_out_channels": (32, 64, 128),
        "attention_head_dim": (2, 4, 8),
        "transformer_layers_per_block": (1, 1, 2),
        "cross_attention_dim": 96,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 64 + 48,
        "norm_num_groups": 16,
    },
    "clip_l": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "projection_dim": 32},
    "clip_g": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 2, "projection_dim": 64},
    "vae": {"block_out_channels": (16, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 16},
}  # fmt: skip
SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
}


def load_average() -> float:
    return os.getloadavg()[0]


def make(folder: Path, scale: str, weights: str, unet_depth: int) -> None:
    """Write the random-weight SDXL base folder, one component at a time, each built directly
    in the saved dtype (an fp16 UNet never exists in fp32 here)."""
    import gc

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trt_sd.models.tokenizer_build import write_clip_tokenizer

    small = scale == "reduced"
    dtype = torch.float16 if weights == "fp16" else torch.float32
    torch.manual_seed(0)
    words = ["a", "photo", "of", "an", "astronaut", "riding", "horse", "on", "the", "moon"]
    words += ["blurry", "low", "quality"]
    write_clip_tokenizer(folder / "tokenizer", words)
    write_clip_tokenizer(folder / "tokenizer_2", words)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # bigG pads with "!"
        path = folder / "tokenizer_2" / name
        data = json.loads(path.read_text("utf-8"))
        data["pad_token"] = "!"
        path.write_text(json.dumps(data), "utf-8")
    common = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406,
              "eos_token_id": 49407, "pad_token_id": 49407}  # fmt: skip

    depth = {}  # --unet-depth: transformer blocks at the lowest level (SDXL: 10)
    if unet_depth:
        depth["transformer_layers_per_block"] = (1, 2, unet_depth) if not small else (1, 1, 2)

    def cfg(full: dict[str, Any], key: str) -> dict[str, Any]:
        return {**full, **(REDUCED[key] if small else {})}

    parts: list[tuple[str, Any]] = [
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**common, **cfg(CLIP_L, "clip_l")))),
        ("text_encoder_2", lambda: CLIPTextModelWithProjection(
            CLIPTextConfig(**common, **cfg(CLIP_BIGG, "clip_g")))),
        ("unet", lambda: UNet2DConditionModel(**{**cfg(SDXL_UNET, "unet"), **depth})),
        ("vae", lambda: AutoencoderKL(**cfg(SDXL_VAE, "vae"))),
    ]  # fmt: skip
    for sub, build in parts:
        if (folder / sub / "config.json").is_file():
            continue
        t0 = time.perf_counter()
        torch.set_default_dtype(dtype)
        try:
            with torch.no_grad():
                module = build().eval()
        finally:
            torch.set_default_dtype(torch.float32)
        params = sum(p.numel() for p in module.parameters())
        module.save_pretrained(folder / sub)
        print(f"{sub}: {params / 1e6:.0f} M parameters, {time.perf_counter() - t0:.0f} s")
        del module
        gc.collect()
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))


def timed_child(argv: list[str]) -> dict[str, Any]:
    """Run ``python this-file argv`` under ``/usr/bin/time -v``: exit code, wall seconds, peak
    resident GiB and the tail of its output."""
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    status = re.search(r"Exit status: (\d+)", proc.stderr)
    return {
        "exit": int(status.group(1)) if status else proc.returncode,
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(int(rss.group(1)) / 2**20, 2) if rss else None,
        "tail": (proc.stdout + proc.stderr.split("\tCommand being timed")[0])[-1500:],
        "stdout": proc.stdout,
    }


def child_export(model: str, out: str, size: int, precision: str) -> None:
    from trt_sd.export import export_model

    export_model(model, out, precision=precision, height=size, width=size, batch="1")


def _latents(size: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8), np.float32)


class AnonPeak:
    """Peak anonymous resident memory of this process, polled from ``/proc/self/status``:
    ``/usr/bin/time``'s peak RSS also counts file pages mapped from the weight files, which
    the kernel can drop under pressure, so it overstates what a run really needs."""

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval,), daemon=True)
        self._thread.start()

    def _poll(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_kib = max(self.peak_kib, int(line.split()[1]))

    def gib(self) -> float:
        self._stop.set()
        return round(self.peak_kib / 2**20, 2)


def child_run(side: str, path: str, size: int, steps: int, rounds: int, backend: str,
              image_out: str, warmup: int) -> None:  # fmt: skip
    """One side's ``warmup`` + ``rounds`` timed generations; JSON on stdout, image to .npy."""
    anon = AnonPeak()
    latents = _latents(size)
    t0 = time.perf_counter()
    used = "torch fp32"
    if side == "diffusers":
        import torch
        from diffusers import StableDiffusionXLPipeline

        from trt_sd.runtime.backends import physical_cores

        torch.set_num_threads(physical_cores())
        pipe = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)

        def call() -> np.ndarray:
            with torch.inference_mode():
                out = pipe(PROMPT, negative_prompt=NEGATIVE, height=size, width=size,
                           num_inference_steps=steps, guidance_scale=GUIDANCE,
                           latents=torch.from_numpy(latents), output_type="np")  # fmt: skip
            return (out.images[0] * 255).round().astype(np.uint8)
    else:
        from trt_sd.runtime import Pipeline

        tpipe = Pipeline.load(path, backend=backend)
        used = tpipe.backend

        def call() -> np.ndarray:
            return tpipe(PROMPT, NEGATIVE, sampler="euler", steps=steps, guidance=GUIDANCE,
                         height=size, width=size, latents=latents).images[0]  # fmt: skip

    load = time.perf_counter() - t0
    for _ in range(warmup):
        call()
    times, image = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        image = call()
        times.append(time.perf_counter() - t)
    np.save(image_out, image)
    timed = [round(x, 2) for x in times]
    print(json.dumps({"backend": used, "load": round(load, 1), "times": timed,
                      "peak_anon_gib": anon.gib()}))  # fmt: skip


def e2e(args: argparse.Namespace) -> None:
    """diffusers once, then trt-sd once per backend in ``--backend`` (comma-separated), each
    in its own child; every trt-sd figure is a ratio against the diffusers run before it."""
    work = Path(args.workdir)
    model, engines = work / "model", work / f"engines-{args.size}"
    print(f"load average before: {load_average():.1f}")
    sides = [("diffusers", model, "-")] + [
        (f"trt-sd:{b}", engines, b) for b in args.backend.split(",")
    ]
    results = {}
    for side, path, backend in sides:
        image = work / f"image-{side.replace(':', '-')}.npy"
        argv = ["child-run", side.split(":")[0], str(path), str(args.size), str(args.steps),
                str(args.rounds), backend, str(image), str(args.warmup)]  # fmt: skip
        r = timed_child(argv)
        if r["exit"] != 0:
            raise SystemExit(f"{side} failed (exit {r['exit']}):\n{r['tail']}")
        line = [s for s in r["stdout"].splitlines() if s.startswith("{")][-1]
        results[side] = {**json.loads(line), "peak_rss_gib": r["peak_rss_gib"]}
        results[side]["median"] = statistics.median(results[side]["times"])
        results[side]["load_average"] = round(load_average(), 1)
        if side != "diffusers":
            a = np.load(image).astype(int)
            b = np.load(work / "image-diffusers.npy").astype(int)
            diff = np.abs(a - b)
            results[side]["over_diffusers"] = round(
                results[side]["median"] / results["diffusers"]["median"], 3
            )
            results[side]["image_max_diff"] = int(diff.max())
            results[side]["image_mean_diff"] = round(float(diff.mean()), 4)
        print(side, results[side], flush=True)
    print(f"load average after: {load_average():.1f}")
    print(json.dumps({"size": args.size, "steps": args.steps, **results}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make")
    p.add_argument("--workdir", required=True)
    p.add_argument("--scale", choices=("full", "reduced"), default="full")
    p.add_argument("--weights", choices=("fp32", "fp16"), default="fp32")
    p.add_argument(
        "--unet-depth",
        type=int,
        default=0,
        help="transformer blocks at the UNet's lowest level (default: SDXL's 10)",
    )
    p = sub.add_parser("export")
    p.add_argument("--workdir", required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--precision", default="fp32")
    p = sub.add_parser("e2e")
    p.add_argument("--workdir", required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--backend", default="auto", help="trt-sd backends, comma-separated")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (0: time the first)")
    p = sub.add_parser("child-export")
    p.add_argument("args", nargs=4)
    p = sub.add_parser("child-run")
    p.add_argument("args", nargs=8)
    args = parser.parse_args()
    if args.cmd == "make":
        t0 = time.perf_counter()
        make(Path(args.workdir) / "model", args.scale, args.weights, args.unet_depth)
        print(f"make: {time.perf_counter() - t0:.0f} s")
    elif args.cmd == "export":
        work = Path(args.workdir)
        print(f"load average before: {load_average():.1f}")
        out = work / f"engines-{args.size}"
        r = timed_child(["child-export", str(work / "model"), str(out), str(args.size),
                         args.precision])  # fmt: skip
        print(f"load average after: {load_average():.1f}")
        print(json.dumps({k: v for k, v in r.items() if k != "stdout"}))
        return 0 if r["exit"] == 0 else 1
    elif args.cmd == "child-export":
        model, out, size, precision = args.args
        child_export(model, out, int(size), precision)
    elif args.cmd == "child-run":
        side, path, size, steps, rounds, backend, image, warmup = args.args
        child_run(side, path, int(size), int(steps), int(rounds), backend, image, int(warmup))
    else:
        e2e(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
