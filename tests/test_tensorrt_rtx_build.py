"""Real TensorRT-RTX engines, built on this CPU-only machine (TensorRT-RTX builds ahead of time
without a GPU): a tiny pipeline exported through ``--backend tensorrt-rtx`` at fp16 and int8, as
pipeline stages and with DeepCache. Every built network's inputs, outputs, dtypes and
optimisation profile are checked against the component descriptors (what the builder recorded
from the parsed network it built, since a serialized engine cannot be opened without a GPU).

Cost is kept small: 16..24 pixel images, batch 1..2, and one build target (8.6) except in the
fp16 export, which builds for every default target.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runtime_engines import tiny_model

from trt_sd.models import Manifest
from trt_sd.models.descriptors import Component
from trt_sd.models.unet_plans import DeepCachePlan, UNetPartition

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is pinned in the dev extra")

SHAPES = {"height": "16:24", "width": "16:24", "batch": "1:2", "progress": False}
INT8_SMALL = {"calib_size": 2, "calib_steps": 3, "report_images": 2, "report_steps": 4}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A private TRT_SD_HOME: the engine cache and runtime cache live there."""
    path = tmp_path_factory.mktemp("rtx-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRT_SD_HOME", str(path))
        yield path


def _export(out: Path, **kwargs) -> Manifest:
    from trt_sd.export import export_model

    return export_model(tiny_model(), out, backend="tensorrt-rtx", **SHAPES, **kwargs)


def descriptors(manifest: Manifest) -> dict[str, Component]:
    """The descriptor of every component in an engine directory (UNet sections included)."""
    comps = dict(manifest.family.components(manifest.dims))
    if manifest.unet_partition:
        plan = UNetPartition.from_dict(manifest.unet_partition, manifest.dims)
        comps.update({c.name: c for c in plan.components()})
    if manifest.raw.get("unet_deepcache"):
        dc = DeepCachePlan.from_dict(manifest.raw["unet_deepcache"], manifest.dims)
        comps.update({c.name: c for c in (dc.full(), dc.shallow())})
    return comps


def check_engines(out: Path, manifest: Manifest, targets: list[str]) -> None:
    """Each component is a real TensorRT-RTX plan whose network matches its descriptor."""
    comps = descriptors(manifest)
    raw = json.loads((out / "manifest.json").read_text())["components"]
    for name, entry in manifest.components.items():
        spec, extra = comps[name], entry.extra
        assert entry.backend == "tensorrt-rtx" and entry.file.endswith(".plan"), name
        plan = out / entry.file
        assert plan.stat().st_size == extra["engine_bytes"] > 10_000, name
        assert (out / extra["onnx_file"]).is_file()
        assert extra["tensorrt_flavour"] == "tensorrt-rtx"
        assert extra["tensorrt_version"] == trt.__version__
        assert extra["compute_capabilities"] == targets
        io = raw[name]["engine_io"]
        # Inputs: names, dtypes and the profile the descriptor gives for the exported range.
        profile = spec.profile(entry.shape_range)
        got_in = {t["name"]: (t["dtype"], [tuple(s) for s in t["profile"]]) for t in io["inputs"]}
        want_in = {
            t.name: (t.resolved_dtype(entry.precision), list(profile[t.name])) for t in spec.inputs
        }
        assert got_in == want_in, name
        got_out = {t["name"]: t["dtype"] for t in io["outputs"]}
        assert got_out == {t.name: t.resolved_dtype(entry.precision) for t in spec.outputs}, name
        # Dynamic axes stay dynamic (-1) in the network, fixed ones fixed.
        for t in io["inputs"]:
            symbolic = spec.input(t["name"]).shape
            assert [d == -1 for d in t["shape"]] == [isinstance(s, str) for s in symbolic]


@pytest.fixture(scope="module")
def fp16_engines(tmp_path_factory, home) -> Path:
    out = tmp_path_factory.mktemp("rtx") / "fp16"
    _export(out, precision="fp16")
    return out


def test_fp16_engines_for_every_default_target(fp16_engines):
    from trt_sd.export.trt_targets import default_rtx_targets

    out = fp16_engines
    manifest = Manifest.load(out)
    targets = list(default_rtx_targets(trt))
    assert "8.6" in targets and "7.5" not in targets  # see trt_targets.NOT_DEFAULT
    check_engines(out, manifest, targets)
    # The fp16 UNet takes and returns fp16; the VAE stays fp32 (fp16 exports upcast it).
    unet_io = json.loads((out / "manifest.json").read_text())["components"]["unet"]["engine_io"]
    assert {t["name"]: t["dtype"] for t in unet_io["outputs"]} == {"model_output": "float16"}
    assert manifest.components["vae_decoder"].precision == "fp32"
    # Same inputs again: every component is reused, nothing rebuilt.
    again = _export(out, precision="fp16")
    assert sorted(again.raw["export"]["reused"]) == sorted(manifest.components)


def test_sdxl_engines(tmp_path, home):
    """The SDXL family (two text encoders, a UNet with added conditioning) builds through the
    same descriptor-driven path; every network matches its SDXL descriptor."""
    from runtime_engines import tiny_sdxl_model

    from trt_sd.export import export_model

    out = tmp_path / "sdxl"
    manifest = export_model(
        tiny_sdxl_model(), out, backend="tensorrt-rtx", precision="fp16", batch="1:2",
        progress=False, trt_compute_capabilities="8.6",
    )  # fmt: skip
    assert manifest.family.name == "sdxl"
    assert {"text_encoder", "text_encoder_2", "unet"} <= set(manifest.components)
    check_engines(out, manifest, ["8.6"])
    unet_io = json.loads((out / "manifest.json").read_text())["components"]["unet"]["engine_io"]
    assert {"text_embeds", "time_ids"} <= {t["name"] for t in unet_io["inputs"]}


def test_int8_qdq_engines(tmp_path, home):
    out = tmp_path / "int8"
    manifest = _export(out, precision="int8", int8=INT8_SMALL, trt_compute_capabilities="8.6")
    check_engines(out, manifest, ["8.6"])
    unet = manifest.components["unet"]
    assert unet.precision == "int8" and unet.extra["qdq_flavour"] == "tensorrt"
    assert unet.extra["refittable"] is False
    assert manifest.quantization is not None


def test_split_unet_engines(tmp_path, home):
    out = tmp_path / "split"
    manifest = _export(out, precision="fp16", split_unet=2, trt_compute_capabilities="8.6")
    assert {"unet_stage0", "unet_stage1"} <= set(manifest.components)
    check_engines(out, manifest, ["8.6"])


def test_deepcache_engines_and_runtime_cache_location(tmp_path, home):
    out = tmp_path / "deepcache"
    manifest = _export(
        out,
        precision="fp16",
        deepcache=0,
        trt_compute_capabilities="8.6",
        trt_runtime_cache="rtx-cache",
    )
    assert {"unet", "unet_shallow"} <= set(manifest.components)
    check_engines(out, manifest, ["8.6"])
    assert manifest.components["unet"].extra["runtime_cache"] == "rtx-cache"
    from trt_sd.runtime.backends.tensorrt import runtime_cache_path

    entry = manifest.components["unet_shallow"]
    assert runtime_cache_path(out, entry) == out / "rtx-cache" / (entry.file + ".cache")


def test_rtx_engines_refused_cleanly_without_a_supported_gpu(fp16_engines, tmp_path, capsys):
    """The runtime says in one line what is missing (no GPU here) and exits 2; `auto` does not
    pretend ONNX Runtime could run a plan."""
    from trt_sd.runtime.backends import cuda_device_count
    from trt_sd.runtime.cli import main

    if cuda_device_count():
        pytest.skip("a GPU is present")
    out = fp16_engines
    png = str(tmp_path / "x.png")
    for backend in ("auto", "tensorrt-rtx"):
        code = main(["run", "--engines", str(out), "--backend", backend, "--out", png])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert err.count("\n") == 0 and "Traceback" not in err
        assert "TensorRT-RTX engines need an RTX-class NVIDIA GPU" in err
    code = main(["run", "--engines", str(out), "--backend", "onnxruntime-cpu", "--out", png])
    err = capsys.readouterr().err
    assert code == 2 and "is a TensorRT-RTX engine" in err


def test_refittable_rtx_build_needs_a_gpu(tmp_path, home):
    """TensorRT-RTX 1.7 compiles refittable graphs on the GPU; without one the export says so
    up front (one line), before any torch work."""
    from trt_sd.export.trt_targets import has_gpu
    from trt_sd.models import BackendUnavailableError

    if has_gpu():
        pytest.skip("a GPU is present: refittable builds work here")
    with pytest.raises(BackendUnavailableError, match="--refittable TensorRT-RTX engines"):
        _export(tmp_path / "refit", precision="fp16", trt_refittable=True)


@pytest.mark.gpu
def test_rtx_engines_generate_like_onnxruntime_on_a_supported_gpu(fp16_engines):
    """On an RTX-class GPU: the fp16 engines generate what the fp32 ONNX graphs do on the CPU
    (fp16 rounding allowed). Skipped without such a GPU (CI, Hopper)."""
    import numpy as np
    from runtime_engines import tiny_engines

    from trt_sd.export.trt_targets import compute_capability, has_gpu
    from trt_sd.runtime import Pipeline

    if not has_gpu():
        pytest.skip("no GPU here")
    cc = compute_capability()
    targets = Manifest.load(fp16_engines).components["unet"].extra["compute_capabilities"]
    if cc not in targets:
        pytest.skip(f"TensorRT-RTX engines here target {targets}; this GPU is {cc}")
    args = {"prompt": "a cat", "steps": 8, "seed": 3, "height": 16, "width": 16}
    rtx = Pipeline.load(fp16_engines, backend="tensorrt-rtx")(**args).images[0]
    ort = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")(**args).images[0]
    close = np.abs(rtx.astype(int) - ort.astype(int)) <= 4
    assert close.mean() >= 0.95
