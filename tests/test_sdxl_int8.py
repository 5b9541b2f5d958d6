"""INT8 on SDXL: calibration conditions the UNet the way the family does (both encoders'
penultimate states, bigG's pooled embedding, micro-conditioning ids, zeroed empty negative
prompt), and the INT8 engines make the fp32 engines' image within a stated tolerance.

Tolerance, tiny random SDXL at 16x16, 8 Euler steps, same latents: PSNR >= 30 dB and mean
absolute pixel difference <= 4 / 255 against the fp32 ONNX engines (measured: ~40 dB, ~1.7).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from int8_family import conditioning_pairs, export_tiny_int8, psnr_and_mean_diff
from runtime_engines import SIZE, tiny_sdxl_engines, tiny_sdxl_model

from trt_sd.runtime import Pipeline

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def int8_engines(tmp_path_factory) -> Path:
    return export_tiny_int8(tiny_sdxl_model(), tmp_path_factory.mktemp("sdxl-int8") / "engines")


def test_calibration_conditioning_is_the_runtime_conditioning() -> None:
    """What calibration feeds the UNet equals what the SDXL runtime feeds it (all three
    inputs, the zeroed empty negative row included)."""
    cases = [(["a photo of a cat", "a painting of a horse on the moon"], False), ([""], True)]
    pairs = list(conditioning_pairs(tiny_sdxl_model(), tiny_sdxl_engines(), cases))
    for ours, theirs in pairs:
        assert list(ours) == ["encoder_hidden_states", "text_embeds", "time_ids"]
        for name, value in ours.items():
            np.testing.assert_allclose(value, theirs[name], rtol=1e-4, atol=1e-5)
    assert not pairs[1][0]["encoder_hidden_states"].any()  # forced zeros


def test_int8_sdxl_export_record(int8_engines: Path) -> None:
    from trt_sd.models import Manifest

    manifest = Manifest.load(int8_engines)
    assert manifest.components["unet"].precision == "int8"
    assert {c.precision for n, c in manifest.components.items() if n != "unet"} == {"fp32"}
    q = manifest.quantization
    assert q["calibration"]["unet_rows"] == 2 * 2 * 3  # CFG rows x prompts x steps
    assert "add_embedding.linear_1" in q["calibration"]["excluded_layers"]
    assert q["graph"]["quantized_ops"]["MatMul"] > 10
    assert 0.99 < q["report"]["unet_cosine_mean"] <= 1.0


def test_int8_sdxl_image_is_close_to_fp32(int8_engines: Path) -> None:
    ours = Pipeline.load(int8_engines, backend="onnxruntime-cpu")
    fp32 = Pipeline.load(tiny_sdxl_engines(), backend="onnxruntime-cpu")
    latents = np.random.default_rng(2).standard_normal((2, 4, SIZE // 2, SIZE // 2), np.float32)
    kw = {"sampler": "euler", "steps": 8, "guidance": 5.0, "batch": 2, "latents": latents}
    b = fp32("a photo of a cat", "dog", **kw).images
    psnr, mean = psnr_and_mean_diff(ours("a photo of a cat", "dog", **kw).images, b)
    assert psnr >= 30.0 and mean <= 4.0, (psnr, mean)
    assert np.stack(b).std() > 10  # a real image, not a flat one that any graph would match
