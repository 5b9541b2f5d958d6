"""Image quality of the CPU backends on the bundled digits model: bf16 (OpenVINO) and INT8.

    python bench/bench_cpu_quality.py [--images-per-digit 50] [--out docs/quality.md]

Why: ``backend="auto"`` runs fp32 engines in OpenVINO with bf16 arithmetic on CPUs that have
it, so the images users get there are bf16 images. This measures what that costs against the
fp32 reference (ONNX Runtime, fp32 engines) with the harness of the INT8 section: the same
prompts ("a handwritten digit {word}", ``--images-per-digit`` per digit), DPM++ 2M, 20 steps,
CFG 7.5 (the model's default), the same seeded starting noise for every row; prompt accuracy
by the held-out judge (``DigitJudge``), PSNR of each image against the fp32 reference image
(pixels in [0, 1]; mean and worst image), and seconds per row (under load: not a speed
figure). Rows: fp32 engines on ONNX Runtime, OpenVINO fp32 and OpenVINO bf16; INT8 engines
(the default recipe) on ONNX Runtime and on OpenVINO (``openvino``: bf16 for the float parts
OpenVINO does not run in int8). Engines of the bundled model are exported into ``--work`` once
(reused when unchanged).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SECTION = "## bf16 on the CPU"
SEED = 20_000
BATCH = 50
ROWS = (
    ("fp32", "onnxruntime-cpu"),
    ("fp32", "openvino-fp32"),
    ("fp32", "openvino"),
    ("int8", "onnxruntime-cpu"),
    ("int8", "openvino"),
)


def export(work: Path, precision: str) -> Path:
    from trt_sd.export import export_model

    out = work / f"default-{precision}"
    export_model(None, out, precision=precision, batch=f"1:{BATCH}", progress=False)
    return out


def generate(engines: Path, backend: str, per_digit: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(uint8 images (N, H, W, 3), digit labels, seconds) for ``per_digit`` images per digit."""
    from trt_sd.models import digits
    from trt_sd.runtime import Pipeline
    from trt_sd.runtime.noise import initial_noise

    pipe = Pipeline.load(engines, backend=backend)
    dims = pipe.manifest.dims
    size = digits.IMAGE_SIZE // dims.vae_scale_factor
    labels = np.arange(10 * per_digit) % 10
    images: list[np.ndarray] = []
    start = time.perf_counter()
    for first in range(0, len(labels), BATCH):
        seeds = list(range(SEED + first, SEED + min(first + BATCH, len(labels))))
        noise = initial_noise(seeds, (dims.latent_channels, size, size))
        prompts = [digits.prompt_for_digit(int(d)) for d in labels[first : first + len(seeds)]]
        result = pipe(
            prompts, sampler="dpm++", steps=20, guidance=7.5, latents=noise, batch=len(seeds)
        )
        images.extend(np.asarray(im) for im in result.images)
    return np.stack(images), labels, time.perf_counter() - start


def psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """PSNR in dB per image of uint8 images; identical images -> inf."""
    diff = (images.astype(np.float64) - reference.astype(np.float64)) / 255.0
    mse = np.mean(diff.reshape(len(diff), -1) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    from trt_sd.models import DEFAULT_MODEL_DIR, digits

    work = Path(args.work)
    engines = {p: export(work, p) for p in ("fp32", "int8")}
    judge = digits.DigitJudge(DEFAULT_MODEL_DIR)
    rows, reference = [], None
    for precision, backend in ROWS:
        images, labels, seconds = generate(engines[precision], backend, args.images_per_digit)
        if reference is None:
            reference = images
        p = psnr(images, reference)
        finite = p[np.isfinite(p)]
        row = {
            "engines": precision,
            "backend": backend,
            "accuracy": judge.accuracy(images, labels),
            "identical": int(np.sum(~np.isfinite(p))),
            "psnr_mean": float(finite.mean()) if len(finite) else float("inf"),
            "psnr_min": float(p.min()),
            "max_diff": int(np.abs(images.astype(int) - reference.astype(int)).max()),
            "seconds": seconds,
            "images": len(images),
        }
        rows.append(row)
        print(row, flush=True)
    return rows


def section(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    load = os.getloadavg()[0]
    lines = [
        "What bf16 arithmetic (OpenVINO, `--backend openvino`, the `auto` choice on CPUs with",
        "AVX512-BF16 or AMX) and INT8 on OpenVINO do to the bundled digits model's images,",
        f"against the fp32 reference (ONNX Runtime on fp32 engines). {rows[0]['images']} images",
        '(every digit alike, prompt "a handwritten digit {word}"), DPM++ 2M, 20 steps, CFG 7.5,',
        "the same seeded starting noise per image in every row; prompt accuracy by the held-out",
        'judge of "## Default model" (`DigitJudge`); PSNR of each image against the reference',
        "image of the same prompt and noise (pixels in [0, 1]; mean over the images that differ,",
        "and the worst image).",
        "",
        "```bash",
        f"python bench/bench_cpu_quality.py --images-per-digit {args.images_per_digit}",
        "```",
        "",
        "| engines | backend | prompt accuracy | identical to reference | PSNR mean / worst "
        "| max pixel diff | seconds (load ~" + f"{load:.1f}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['engines']} | `{r['backend']}` | {r['accuracy']:.1%} | "
            f"{r['identical']}/{r['images']} | {r['psnr_mean']:.1f} / {r['psnr_min']:.1f} dB | "
            f"{r['max_diff']} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-digit", type=int, default=50)
    parser.add_argument("--work", default="/tmp/trt-sd-cpu-quality")
    parser.add_argument("--out", help="markdown file whose bf16 section to replace/append")
    args = parser.parse_args()
    rows = measure(args)
    body = section(rows, args)
    print(body)
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quality import replace_section

        path = Path(args.out)
        path.write_text(replace_section(path.read_text(), SECTION, body))


if __name__ == "__main__":
    main()
