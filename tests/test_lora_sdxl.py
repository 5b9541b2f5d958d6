"""Run-time LoRA on SDXL (both text encoders and the UNet) against diffusers'
``load_lora_weights`` + ``set_adapters``, diffusers / PEFT and kohya (``lora_te1_`` /
``lora_te2_``) files, tiny SDXL pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from lora_files import KOHYA_SDXL, make_peft_lora, to_kohya
from runtime_engines import SIZE, tiny_sdxl_engines, tiny_sdxl_model

from trt_sd.runtime import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

PROMPT = "a photo of an astronaut riding a horse on the moon"
STEPS = 4
GUIDANCE = 5.0


def _reference():
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def peft_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-lora")
    return make_peft_lora(_reference(), folder, seed=3, alpha=4.0, sdxl=True)


@pytest.mark.parametrize("fmt", ["peft", "kohya", "kohya_sgm"])
def test_sdxl_lora_matches_diffusers(tmp_path, peft_file, fmt: str) -> None:
    path = peft_file
    if fmt.startswith("kohya"):
        sgm = 1 if fmt == "kohya_sgm" else 0  # sd-scripts' SDXL names; tiny: 1 resnet per block
        path = to_kohya(path, tmp_path / "k.safetensors", alpha=4.0, prefixes=KOHYA_SDXL, sgm=sgm)
    latents = np.random.default_rng(0).standard_normal((1, 4, SIZE // 2, SIZE // 2), np.float32)
    pipe = Pipeline.load(tiny_sdxl_engines(), backend="onnxruntime-cpu")
    kw = {"sampler": "euler", "steps": STEPS, "guidance": GUIDANCE, "latents": latents}
    ours = pipe(PROMPT, **kw, loras=[(path, 0.6)]).images[0]
    base = pipe(PROMPT, **kw).images[0]
    reference = _reference()
    reference.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    reference.set_adapters(["x"], adapter_weights=[0.6])
    with torch.no_grad():
        out = reference(
            PROMPT,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=torch.from_numpy(latents),
            output_type="np",
        )
    theirs = (out.images[0] * 255).round().astype(np.uint8)
    diff = int(np.abs(ours.astype(int) - theirs.astype(int)).max())
    assert int(np.abs(ours.astype(int) - base.astype(int)).max()) > 8
    assert diff <= 2, f"max diff {diff} against diffusers"
