"""ControlNet engines through ``--backend tensorrt-rtx``: real TensorRT-RTX builds on this
CPU-only machine (a tiny SD 1.x pipeline with one tiny ControlNet, fp16, one target). The UNet
network takes the residual inputs and the ControlNet network returns them, each with the
optimisation profile its descriptor gives (the lower-resolution residuals included)."""

from __future__ import annotations

import json

import pytest
from controlnet_engines import tiny_controlnets
from runtime_engines import tiny_model

from trt_sd.models.controlnet import MID_RESIDUAL
from trt_sd.runtime.controlnet import controlnet_components

rtx = pytest.importorskip("test_tensorrt_rtx_build")
home = rtx.home  # the private TRT_SD_HOME fixture (engine cache inside the test's tmp dir)


def test_controlnet_engines(tmp_path, home, monkeypatch):
    from trt_sd.export import export_model

    out = tmp_path / "controlnet"
    manifest = export_model(
        tiny_model(),
        out,
        backend="tensorrt-rtx",
        precision="fp16",
        height="16:24",
        width="16:24",
        batch="1:2",
        progress=False,
        trt_compute_capabilities="8.6",
        controlnet=tiny_controlnets()[0],
    )
    plain = rtx.descriptors
    monkeypatch.setattr(rtx, "descriptors", lambda m: {**plain(m), **controlnet_components(m)})
    rtx.check_engines(out, manifest, ["8.6"])  # every network against its descriptor
    io = json.loads((out / "manifest.json").read_text())["components"]
    unet_in = {t["name"]: t for t in io["unet"]["engine_io"]["inputs"]}
    cn_out = {t["name"]: t for t in io["controlnet_0"]["engine_io"]["outputs"]}
    assert MID_RESIDUAL in unet_in and MID_RESIDUAL in cn_out
    assert cn_out[MID_RESIDUAL]["dtype"] == unet_in[MID_RESIDUAL]["dtype"] == "float16"
    # the mid residual lives at half the latent size: 16..24 px (opt 16) -> 4..6
    assert [s[2:] for s in unet_in[MID_RESIDUAL]["profile"]] == [[4, 4], [4, 4], [6, 6]]
