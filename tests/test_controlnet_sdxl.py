"""ControlNet on SDXL: a tiny random SDXL ControlNet (reads the pooled text embedding and the
micro-conditioning like the UNet) exported beside the base, against diffusers'
``StableDiffusionXLControlNetPipeline`` from the same latents; and ControlNets of another
family refused at export in one line."""

from __future__ import annotations

import numpy as np
import pytest
from controlnet_engines import sdxl_controlnet_engines, tiny_controlnets, tiny_sdxl_controlnet
from runtime_engines import SIZE, tiny_model, tiny_sdxl_model

from trt_sd.models.errors import InputError
from trt_sd.runtime import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def test_sdxl_controlnet_matches_diffusers() -> None:
    from PIL import Image

    pipe = Pipeline.load(sdxl_controlnet_engines(), backend="onnxruntime-cpu")
    unet_inputs = [t["name"] for t in pipe.manifest.components["unet"].inputs]
    control_inputs = [t["name"] for t in pipe.manifest.components["controlnet_0"].inputs]
    assert control_inputs == [*unet_inputs[:5], "controlnet_cond"]  # + text_embeds, time_ids
    control = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    latents = np.random.default_rng(1).standard_normal((1, 4, SIZE // 2, SIZE // 2), np.float32)
    ref = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
        str(tiny_sdxl_model()),
        controlnet=diffusers.ControlNetModel.from_pretrained(str(tiny_sdxl_controlnet())),
    )
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    with torch.no_grad():
        theirs = ref(
            "a photo of a cat",
            negative_prompt="painting",
            image=Image.fromarray(control),
            height=SIZE,
            width=SIZE,
            num_inference_steps=5,
            guidance_scale=5.0,
            latents=torch.from_numpy(latents),
            controlnet_conditioning_scale=0.8,
            control_guidance_end=0.7,
            output_type="np",
        ).images
    ours = pipe(
        "a photo of a cat",
        "painting",
        sampler="euler",
        steps=5,
        guidance=5.0,
        latents=latents,
        control_image=control,
        controlnet_scale=0.8,
        control_end=0.7,
    )
    theirs8 = (theirs * 255).round().astype(np.uint8)
    assert np.abs(np.stack(ours.images).astype(int) - theirs8.astype(int)).max() <= 1
    assert "controlnet_0" in ours.timings


def test_controlnet_of_another_family_is_refused(tmp_path) -> None:
    from trt_sd.export import export_model

    cases = (
        (tiny_sdxl_model(), tiny_controlnets()[0], "does not fit this SDXL model: its "),
        (tiny_model(), tiny_sdxl_controlnet(), "does not fit this SD 1.x model: its "),
    )
    for model, controlnet, message in cases:
        with pytest.raises(InputError, match=message) as info:
            export_model(model, tmp_path / "out", controlnet=controlnet, progress=False)
        assert "cross_attention_dim" in str(info.value) and "\n" not in str(info.value)
