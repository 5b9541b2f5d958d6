"""Bad export inputs: one `error:` line, exit code 2, no traceback; an interrupted export leaves
nothing the runtime would load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trt_sd.export import engine_dir
from trt_sd.models import BackendUnavailableError, Manifest, ManifestError
from trt_sd.runtime.cli import main as cli_main

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_pipeline import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("errors") / "model")


def _fails(capsys, argv, needle):
    rc = cli_main(["export", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, err


def test_missing_and_foreign_folders(tmp_path, capsys):
    _fails(capsys, [str(tmp_path / "nope")], "does not exist")
    _fails(capsys, [str(tmp_path)], "not a diffusers folder")
    _fails(capsys, [str(tmp_path), "--config", str(tmp_path)], "only for single-file")
    part = ["diffusers", "X"]
    index = {"_class_name": "X", "unet": part, "vae": part, "text_encoder": part}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    _fails(capsys, [str(tmp_path)], "unet/ is missing")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": []}))
    _fails(
        capsys,
        [str(tmp_path)],
        "holds a X; trt-sd exports SD 1.x, SD 2.x, SDXL, SDXL refiner pipelines",
    )
    flux = {"_class_name": "FluxPipeline", "transformer": part, "vae": part}
    (tmp_path / "model_index.json").write_text(json.dumps(flux))
    _fails(capsys, [str(tmp_path)], "holds a FluxPipeline (FLUX); trt-sd exports SD 1.x")
    sd3 = {"_class_name": "StableDiffusion3Pipeline", "text_encoder_3": part, "vae": part}
    (tmp_path / "model_index.json").write_text(json.dumps(sd3))
    _fails(capsys, [str(tmp_path)], "(Stable Diffusion 3); trt-sd exports SD 1.x, SD 2.x, SDXL,")


def test_unreadable_and_pickle_checkpoints(tmp_path, capsys, model_dir):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    _fails(capsys, [str(bad), "--config", str(model_dir)], "not a readable .safetensors")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04pickle")
    _fails(capsys, [str(ckpt)], "--allow-pickle")
    _fails(capsys, [str(tmp_path / "weights.txt")], "does not exist")
    (tmp_path / "weights.txt").write_text("x")
    _fails(capsys, [str(tmp_path / "weights.txt")], "unsupported checkpoint type")


def test_single_file_needs_config(tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    keys = ("model.diffusion_model.x", "first_stage_model.x", "cond_stage_model.x")
    save_file({k: np.zeros(2, np.float32) for k in keys}, str(path))
    _fails(capsys, [str(path)], "--config DIR")
    foreign = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": np.zeros(1, np.float32)}, str(foreign))
    _fails(capsys, [str(foreign), "--config", str(tmp_path)], "not a full Stable Diffusion")


def test_pickle_weights_inside_a_folder_are_refused(tmp_path, capsys, model_dir):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    st = folder / "unet" / "diffusion_pytorch_model.safetensors"
    st.rename(st.with_suffix(".bin"))
    _fails(capsys, [str(folder)], "pickle checkpoint")


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--height", "20"], "multiple of 8"),
        (["--width", "64:32"], "greater than MAX"),
        (["--batch", "0:2"], "positive"),
        (["--precision", "int4"], "unknown precision"),
        (["--backend", "cuda"], "unknown backend"),
        (["--opset", "13"], "opset"),
    ],
)
def test_bad_options(model_dir, capsys, flags, needle, tmp_path):
    _fails(capsys, [str(model_dir), "--out", str(tmp_path / "e"), *flags], needle)


def _tensorrt_usable() -> bool:
    from trt_sd.export.tensorrt_build import require_tensorrt

    try:
        require_tensorrt()
    except BackendUnavailableError:
        return False
    return True


@pytest.mark.skipif(_tensorrt_usable(), reason="TensorRT is installed here")
def test_tensorrt_backend_says_how_to_install(model_dir, capsys, tmp_path):
    _fails(capsys, [str(model_dir), "--backend", "tensorrt", "--out", str(tmp_path)], "pip install")


def test_unwritable_or_foreign_output(model_dir, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(capsys, [str(model_dir), "--out", str(blocker / "engines")], "is a file")
    _fails(capsys, [str(model_dir), "--out", str(blocker)], "not a directory")
    _fails(capsys, [str(model_dir), "--out", str(model_dir)], "not empty")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _fails(capsys, [str(model_dir), "--out", str(locked / "e")], "not writable")


def test_cli_arguments_import_without_torch():
    code = (
        "import argparse, sys; from trt_sd.export import cli; "
        "cli.add_arguments(argparse.ArgumentParser()); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_exception_between_stages_leaves_nothing_loadable(model_dir, tmp_path, monkeypatch):
    from trt_sd.export import api, export_model

    real = api.build_component
    calls = []

    def flaky(builder, component, key):
        calls.append(component.name)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real(builder, component, key)

    monkeypatch.setattr(api, "build_component", flaky)
    out = tmp_path / "engines"
    with pytest.raises(RuntimeError, match="injected"):
        export_model(model_dir, out, batch="1:1", progress=False)
    assert calls == ["text_encoder", "unet"]
    with pytest.raises(ManifestError):
        Manifest.load(out)
    assert [p.name for p in tmp_path.iterdir()] == []  # no half-built folder left behind


def test_killed_export_leaves_nothing_loadable(model_dir, tmp_path):
    out = tmp_path / "engines"
    code = (
        "from trt_sd.export import export_model; "
        f"export_model({str(model_dir)!r}, {str(out)!r}, batch='1:1', progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=TESTS)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            builds = [p for p in tmp_path.iterdir() if p.name.startswith(".engines.export-")]
            if builds and (builds[0] / "text_encoder.onnx").exists():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "export finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(ManifestError):
        Manifest.load(out)
    (stale,) = [p for p in tmp_path.iterdir() if p.name.startswith(".engines.export-")]
    assert not (stale / "manifest.json").exists()
    engine_dir.remove_stale_builds(out)  # what the next export does first
    assert not stale.exists()


def test_missing_bundled_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from trt_sd.export import checkpoint

    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL_DIR", tmp_path / "default")
    _fails(capsys, ["--out", str(tmp_path / "e")], "bundled default model is not installed")
