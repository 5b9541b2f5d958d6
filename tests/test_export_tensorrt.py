"""The TensorRT branch of the export stage, without TensorRT: the engine builder is replaced by
a stand-in that writes a placeholder plan, so what is checked is the plumbing around it — the
manifest entries the TensorRT runtime backend reads, the ONNX kept beside each engine, build
options validated up front, and reuse by content on re-export. (Real builds: GPU tests.)"""

from __future__ import annotations

import pytest
from tiny_pipeline import make_tiny_pipeline

from trt_sd.export import export_model
from trt_sd.export import tensorrt_build as tb
from trt_sd.models import BackendUnavailableError, InputError, Manifest


@pytest.fixture()
def fake_tensorrt(monkeypatch):
    builds: list[str] = []

    def build_engine(onnx_path, component, shapes, options, cache_dir, device=0):
        cache_dir.mkdir(parents=True, exist_ok=True)
        profile = tb.engine_profile(component, shapes, options.static_shapes)
        key = tb.engine_cache_key(tb.file_sha256(onnx_path), "10.13.0", "9.0", profile, options)
        engine = cache_dir / tb.engine_file_name(component.name, options, "9.0", key)
        engine.write_bytes(b"plan:" + key.encode())
        builds.append(component.name)
        return tb.BuildResult(component.name, engine, key, False, 0.1, 37, "10.13.0", "9.0")

    monkeypatch.setattr(tb, "require_tensorrt", lambda: "10.13.0")
    monkeypatch.setattr(tb, "compute_capability", lambda device=0: "9.0")
    monkeypatch.setattr(tb, "build_engine", build_engine)
    return builds


def test_tensorrt_export_writes_engines_and_keeps_onnx(tmp_path, monkeypatch, fake_tensorrt):
    monkeypatch.setenv("TRT_SD_HOME", str(tmp_path / "home"))
    model = make_tiny_pipeline(tmp_path / "model")
    out = tmp_path / "engines"
    manifest = export_model(
        model,
        out,
        precision="fp16",
        backend="tensorrt",
        height="16",
        width="16",
        batch="1:2",
        progress=False,
        trt_static_shapes=True,
    )
    unet = manifest.components["unet"]
    assert unet.backend == "tensorrt" and unet.file.endswith(".plan")
    assert unet.file.startswith("unet.fp16.sm90.")
    assert unet.extra["onnx_file"] == "unet.onnx" and (out / "unet.onnx").is_file()
    assert unet.extra["tensorrt_version"] == "10.13.0"
    assert unet.extra["compute_capability"] == "9.0"
    assert unet.extra["static_shapes"] is True
    # fp16 exports keep the VAE in fp32, and its engine is built as such.
    assert manifest.components["vae_decoder"].file.startswith("vae_decoder.fp32.")
    assert Manifest.load(out).components["unet"].file == unet.file

    # Same inputs again: nothing is rebuilt, engines and their ONNX are reused.
    fake_tensorrt.clear()
    again = export_model(
        model,
        out,
        precision="fp16",
        backend="tensorrt",
        height="16",
        width="16",
        batch="1:2",
        progress=False,
        trt_static_shapes=True,
    )
    assert fake_tensorrt == []
    assert again.components["unet"].file == unet.file
    # A different build option is a different engine.
    export_model(
        model,
        out,
        precision="fp16",
        backend="tensorrt",
        height="16",
        width="16",
        batch="1:2",
        progress=False,
    )
    assert "unet" in fake_tensorrt


def test_auto_picks_onnxruntime_without_tensorrt(tmp_path):
    from trt_sd.export.options import resolve_backend

    assert resolve_backend("auto") == "onnxruntime"
    with pytest.raises(BackendUnavailableError, match="pip install"):
        resolve_backend("tensorrt")


def test_bad_tensorrt_options_are_refused_up_front():
    from trt_sd.export.options import resolve_options

    with pytest.raises(InputError, match="optimisation level"):
        resolve_options(trt_optimization_level=9)
    with pytest.raises(InputError, match="hardware compatibility"):
        resolve_options(trt_hardware_compatible="turing")
