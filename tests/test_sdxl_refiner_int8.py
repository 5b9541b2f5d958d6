"""INT8 on the SDXL refiner: calibration conditions its UNet the way the refiner family does
(bigG alone, pooled embedding, five micro-conditioning ids with the aesthetic score, the
negative aesthetic score on negative rows, empty prompts not zeroed), and the INT8 refiner's
img2img result stays close to the fp32 refiner's.

Tolerance, tiny random refiner at 16x16, img2img strength 0.3 (the refiner's use) with 10
Euler steps, same image and seed: PSNR >= 30 dB and mean absolute pixel difference <= 4 / 255
against the fp32 ONNX engines (measured: 34.6 dB, 3.5 / 255; random tiny weights magnify
quantization error, the SDXL base's test measures ~40 dB).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from int8_family import conditioning_pairs, export_tiny_int8, psnr_and_mean_diff
from runtime_engines import SIZE, tiny_refiner_engines, tiny_refiner_model

from trt_sd.runtime import Pipeline

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def int8_refiner(tmp_path_factory) -> Path:
    return export_tiny_int8(tiny_refiner_model(), tmp_path_factory.mktemp("refiner") / "int8")


def test_calibration_conditioning_is_the_refiner_runtime_conditioning() -> None:
    cases = [(["a photo of a cat", "a horse"], False), ([""], True)]
    pairs = conditioning_pairs(tiny_refiner_model(), tiny_refiner_engines(), cases)
    for (ours, theirs), (_, negative) in zip(pairs, cases, strict=True):
        assert list(ours) == ["encoder_hidden_states", "text_embeds", "time_ids"]
        for name, value in ours.items():
            np.testing.assert_allclose(value, theirs[name], rtol=1e-4, atol=1e-5)
        assert ours["time_ids"].shape[1] == 5  # size, crop, aesthetic score
        assert ours["time_ids"][0, 4] == (2.5 if negative else 6.0)  # diffusers' defaults
        assert ours["encoder_hidden_states"].any()  # empty prompts are not zeroed


def test_int8_refiner_record(int8_refiner: Path) -> None:
    from trt_sd.models import Manifest

    manifest = Manifest.load(int8_refiner)
    assert manifest.family.name == "sdxl-refiner"
    assert manifest.components["unet"].precision == "int8"
    q = manifest.quantization
    assert q["calibration"]["unet_rows"] == 2 * 2 * 3  # CFG rows x prompts x steps
    assert q["graph"]["quantized_ops"]["MatMul"] > 5
    assert 0.99 < q["report"]["unet_cosine_mean"] <= 1.0


def test_int8_refiner_img2img_is_close_to_fp32(int8_refiner: Path) -> None:
    ours = Pipeline.load(int8_refiner, backend="onnxruntime-cpu")
    fp32 = Pipeline.load(tiny_refiner_engines(), backend="onnxruntime-cpu")
    image = (np.random.default_rng(3).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    kw = {"image": image, "strength": 0.3, "sampler": "euler", "steps": 10, "guidance": 5.0,
          "seed": 7, "batch": 2}  # fmt: skip
    b = fp32("a photo of a cat", "dog", **kw).images
    psnr, mean = psnr_and_mean_diff(ours("a photo of a cat", "dog", **kw).images, b)
    assert psnr >= 30.0 and mean <= 4.0, (psnr, mean)
    assert np.stack(b).std() > 10  # a real image, not a flat one that any graph would match
