"""OpenVINO backend: parity with ONNX Runtime, ``auto``'s choice, errors, torch-free runtime.

The parity cases run the engine files ``trt-sd export`` writes for ONNX Runtime (with the
``com.microsoft.MultiHeadAttention`` fusion in the UNet and VAE) through both libraries.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from runtime_engines import tiny_engines

from trt_sd.models.descriptors import Component, Range, all_components
from trt_sd.models.errors import BackendUnavailableError, InputError
from trt_sd.models.manifest import Manifest
from trt_sd.runtime import backends
from trt_sd.runtime.backends import create_backend, hardware, openvino, resolve_backend
from trt_sd.runtime.cli import main

pytest.importorskip("openvino")

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
needs_bf16 = pytest.mark.skipif(not hardware.cpu_bf16(), reason="CPU without native bf16")


def _feeds(name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of the tiny pipeline's component ``name`` at batch 2, 8x8 latents."""
    if name == "text_encoder":
        return {"input_ids": rng.integers(0, 40, (2, 77)).astype(np.int32)}
    if name == "unet":
        return {
            "sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
            "timestep": np.array([981.0, 981.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32),
        }
    if name == "vae_decoder":
        return {"latent": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)}
    return {"images": rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)}


def _pair(kind: str, name: str) -> tuple[dict, dict]:
    engines = tiny_engines()
    entry = Manifest.load(engines).components[name]
    comp = _descriptor(engines, name)
    feeds = _feeds(name, np.random.default_rng(0))
    want = create_backend("onnxruntime-cpu", engines, comp, entry).run(feeds)
    got = create_backend(kind, engines, comp, entry).run(feeds)
    return want, got


def _descriptor(engines: Path, name: str) -> Component:
    return all_components(Manifest.load(engines).dims)[name]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", COMPONENTS)
def test_fp32_matches_onnxruntime(name: str) -> None:
    """fp32 in both libraries: only summation order differs, ~1e-6 relative measured."""
    want, got = _pair("openvino-fp32", name)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape
        assert _rel(got[key], value) < 1e-4, key


@needs_bf16
@pytest.mark.parametrize("name", COMPONENTS)
def test_bf16_close_to_fp32(name: str) -> None:
    """bf16 rounds every matmul / conv input to 8 mantissa bits (relative step 2**-8 = 0.4%);
    through the tiny UNet's ~10 layers that compounds to 0.8-1.7% of the output range
    (measured), so 5% catches a wrong graph, not rounding. It must differ from fp32 too,
    or bf16 was not in effect."""
    want, got = _pair("openvino", name)
    for key, value in want.items():
        err = _rel(got[key], value)
        assert 1e-4 < err < 0.05, (key, err)


def test_pipeline_image_matches_onnxruntime() -> None:
    from trt_sd.runtime import Pipeline

    args = dict(prompt="a cat", steps=4, seed=3, sampler="dpm++")
    ort_img = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")(**args).images[0]
    pipe = Pipeline.load(tiny_engines(), backend="openvino-fp32")
    assert {b.kind for b in pipe.engines.values()} == {"openvino-fp32"}
    ov_img = pipe(**args).images[0]
    diff = np.abs(np.asarray(ov_img, int) - np.asarray(ort_img, int))
    assert diff.max() <= 1


def test_concurrent_calls_share_one_backend() -> None:
    """Infer requests are pooled: two threads at once get their own results."""
    engines = tiny_engines()
    entry = Manifest.load(engines).components["unet"]
    backend = create_backend("openvino-fp32", engines, _descriptor(engines, "unet"), entry)
    feeds = [_feeds("unet", np.random.default_rng(seed)) for seed in (1, 2)]
    alone = [backend.run(f)["model_output"] for f in feeds]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(5):
            results[i] = backend.run(feeds[i])["model_output"]

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        np.testing.assert_array_equal(results[i], alone[i])


def test_compile_cache_follows_the_cpu_cache_switch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``TRT_SD_ORT_CACHE`` also keeps OpenVINO's compiled models (load 15.6 -> 3.4 s for the
    SD 1.5 UNet); a model loaded back from the cache gives the same outputs."""
    monkeypatch.setenv("TRT_SD_ORT_CACHE", str(tmp_path))
    engines = tiny_engines()
    entry = Manifest.load(engines).components["unet"]
    feeds = _feeds("unet", np.random.default_rng(0))
    first = create_backend("openvino-fp32", engines, _descriptor(engines, "unet"), entry)
    assert any((tmp_path / "openvino").iterdir())
    again = create_backend("openvino-fp32", engines, _descriptor(engines, "unet"), entry)
    np.testing.assert_array_equal(
        again.run(feeds)["model_output"], first.run(feeds)["model_output"]
    )


def _entry(size: int = 2**30, **changes: str):
    """The tiny UNet's manifest entry, recorded as ``size`` bytes (SD-size by default)."""
    entry = Manifest.load(tiny_engines()).components["unet"]
    return dataclasses.replace(entry, extra={**entry.extra, "bytes": size}, **changes)


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No GPU path, whatever this machine has."""
    from trt_sd.runtime.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "cuda_provider_usable", lambda: False)
    monkeypatch.setattr(backends, "_tensorrt_serves", lambda entry: False)
    return monkeypatch


@pytest.mark.parametrize(
    ("bf16", "installed", "precision", "want"),
    [
        (True, True, "fp32", "openvino"),
        (False, True, "fp32", "onnxruntime-cpu"),  # fp32 OpenVINO is no faster than ORT
        (True, False, "fp32", "onnxruntime-cpu"),  # not installed: no error, ORT
        (True, True, "int8", "openvino"),  # SD 1.5 INT8: OpenVINO ~0.8x ORT's int8 kernels
        (False, True, "int8", "onnxruntime-cpu"),  # not measured without bf16: ORT stays
        (True, True, "fp16", "onnxruntime-cpu"),
    ],
)
def test_auto_choice(cpu_only, bf16: bool, installed: bool, precision: str, want: str) -> None:
    cpu_only.setattr(backends, "cpu_bf16", lambda: bf16)
    cpu_only.setattr(openvino, "openvino_installed", lambda: installed)
    assert resolve_backend("auto", _entry(precision=precision)) == want


def test_auto_keeps_small_engines_on_onnxruntime(cpu_only) -> None:
    """Below OPENVINO_AUTO_MIN_BYTES a call is overhead, where ONNX Runtime is faster."""
    cpu_only.setattr(backends, "cpu_bf16", lambda: True)
    cpu_only.setattr(openvino, "openvino_installed", lambda: True)
    assert resolve_backend("auto", _entry(size=12 * 2**20)) == "onnxruntime-cpu"
    assert resolve_backend("openvino", _entry(size=12 * 2**20)) == "openvino"


def test_auto_ignores_the_batch_range(cpu_only) -> None:
    """``auto`` decides per engine, not per call or per batch range: a small engine built for
    50-image calls stays on ONNX Runtime (2-row calls, the common case, are 1.5x slower in
    OpenVINO; 16-100-row calls only ~12% faster; docs/benchmarks.md "## CPU peers, session
    2"), and an SD-size engine built for batch 1 goes to OpenVINO. Switching library by rows
    would make an image depend on what it was batched with (bf16 vs fp32 arithmetic)."""
    cpu_only.setattr(backends, "cpu_bf16", lambda: True)
    cpu_only.setattr(openvino, "openvino_installed", lambda: True)
    entry = _entry(size=12 * 2**20)
    big_batch = dataclasses.replace(entry.shape_range, batch=Range(1, 25, 50))
    assert resolve_backend("auto", dataclasses.replace(entry, shape_range=big_batch)) == (
        "onnxruntime-cpu"
    )
    one = dataclasses.replace(entry.shape_range, batch=Range(1, 1, 1))
    sd = dataclasses.replace(_entry(), shape_range=one)
    assert resolve_backend("auto", sd) == "openvino"


def test_auto_never_hands_tensorrt_engines_to_openvino(cpu_only) -> None:
    cpu_only.setattr(backends, "cpu_bf16", lambda: True)
    with pytest.raises(InputError, match="OpenVINO cannot run it"):
        resolve_backend("openvino", _entry(backend="tensorrt", file="unet.plan"))


def test_bf16_refused_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openvino, "cpu_bf16", lambda: False)
    assert openvino.inference_precision("openvino") == "f32"
    with pytest.raises(BackendUnavailableError, match="no native bf16"):
        resolve_backend("openvino-bf16", _entry())


def test_cpu_bf16_reads_the_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx512f avx512_bf16\n")
    assert hardware.cpu_bf16.__wrapped__(str(info)) is True
    info.write_text("processor : 0\nflags : fpu sse avx512f avx512_vnni\n")
    assert hardware.cpu_bf16.__wrapped__(str(info)) is False
    assert hardware.cpu_bf16.__wrapped__(str(tmp_path / "missing")) is False


def test_missing_openvino_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(BackendUnavailableError) as info:
        resolve_backend("openvino", _entry())
    assert "pip install 'trt-sd[openvino]'" in str(info.value)
    argv = ["run", "--engines", str(tiny_engines()), "--steps", "2", "--quiet"]
    code = main([*argv, "--backend", "openvino", "--out", "/dev/null"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "trt-sd[openvino]" in err, err


GENERATE = """
import json, sys
import trt_sd.runtime
after_import = "openvino" in sys.modules
from trt_sd.runtime import Pipeline
pipe = Pipeline.load(sys.argv[1], backend="openvino")
assert {b.kind for b in pipe.engines.values()} == {"openvino"}
result = pipe("a cat", steps=2, seed=0, sampler="euler_a")
assert result.images[0].shape == (16, 16, 3)
print(json.dumps({"after_import": after_import, "modules": sorted(sys.modules)}))
"""


def test_openvino_generation_imports_no_torch_stack() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", GENERATE, str(tiny_engines())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    loaded = {m.split(".")[0] for m in report["modules"]}
    assert not loaded & {"torch", "diffusers", "transformers", "cupy"}
    assert "openvino" in loaded and "onnxruntime" not in loaded
    assert report["after_import"] is False
