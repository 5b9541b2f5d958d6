"""ControlNet with an INT8 UNet: the Q/DQ UNet takes the residual inputs (calibrated on the
UNet's own trajectories, i.e. zero residuals), the ControlNet stays fp32, and the control
image steers the INT8 pipeline towards what the fp32 ControlNet pipeline makes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from controlnet_engines import controlnet_engines, tiny_controlnets
from runtime_engines import SIZE, _root, tiny_engines, tiny_model

from trt_sd.models.controlnet import MID_RESIDUAL
from trt_sd.runtime import Pipeline

torch = pytest.importorskip("torch")

SMALL = {"calib_size": 2, "calib_steps": 3, "report_images": 2, "report_steps": 4}


def test_int8_unet_with_controlnet() -> None:
    from trt_sd.export import export_model

    out = _root() / "engines-controlnet-int8"
    shutil.copytree(tiny_engines(), out)  # the fp32 text encoder and VAE are reused
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny UNet calls: one thread is faster on a shared machine
    try:
        manifest = export_model(
            tiny_model(), out, precision="int8", int8=SMALL, height="16:24", width="16:24",
            batch="1:4", progress=False, controlnet=tiny_controlnets()[0],
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    unet, controlnet = manifest.components["unet"], manifest.components["controlnet_0"]
    assert unet.precision == "int8" and controlnet.precision == "fp32"
    assert MID_RESIDUAL in [t["name"] for t in unet.inputs]
    assert manifest.quantization is not None

    control = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    args = {"prompt": "a cat", "steps": 6, "seed": 3, "sampler": "euler"}
    int8 = Pipeline.load(out, backend="onnxruntime-cpu")
    fp32 = Pipeline.load(controlnet_engines(), backend="onnxruntime-cpu")
    with_control = np.stack(int8(**args, control_image=control).images).astype(float)
    without = np.stack(int8(**args).images).astype(float)
    reference = np.stack(fp32(**args, control_image=[control, None]).images).astype(float)
    # the control acts: the INT8 image is much nearer the fp32 ControlNet image than the INT8
    # image without control is
    near, far = np.abs(with_control - reference).mean(), np.abs(without - reference).mean()
    assert near < 0.5 * far, (near, far)
