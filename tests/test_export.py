"""Export of tiny pipelines: graphs match diffusers, the manifest says what the runtime needs,
fp16 stays finite, and re-exports reuse by content."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_pipeline import make_tiny_pipeline

from trt_sd.export import export_model
from trt_sd.export.api import component_precisions
from trt_sd.export.options import resolve_options
from trt_sd.models import COMPONENT_NAMES, Manifest

SIZE = 16  # tiny pipelines: VAE factor 2, native 16x16 images <-> 8x8 latents


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("export") / "model")


@pytest.fixture(scope="module")
def fp32_engines(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "engines"
    manifest = export_model(
        model_dir, out, height="16:32", width="16:24", batch="1:2", progress=False
    )
    return out, manifest


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _close(a, b, tol=1e-4):
    scale = max(float(np.abs(b).max()), 1e-6)
    assert float(np.abs(a - b).max()) / scale < tol


def test_every_component_matches_diffusers(model_dir, fp32_engines):
    """Independent of the exporter's own check: diffusers' public APIs vs the ONNX graphs,
    at a shape the verification did not use (batch 3, 24x16 pixels)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    out, _ = fp32_engines
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 600, (3, 77)).astype(np.int32)
    text = CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval()
    with torch.no_grad():
        want = text(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    _close(_session(out / "text_encoder.onnx").run(None, {"input_ids": ids})[0], want)

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()
    feeds = {
        "sample": rng.standard_normal((3, 4, 12, 8)).astype(np.float32),
        "timestep": np.array([1.0, 500.0, 999.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((3, 77, 32)).astype(np.float32),
    }
    with torch.no_grad():
        want = unet(*(torch.from_numpy(v) for v in feeds.values())).sample.numpy()
    _close(_session(out / "unet.onnx").run(None, feeds)[0], want)

    vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval()
    latent = rng.standard_normal((3, 4, 12, 8)).astype(np.float32)
    with torch.no_grad():
        want = vae.decode(torch.from_numpy(latent)).sample.numpy()
    _close(_session(out / "vae_decoder.onnx").run(None, {"latent": latent})[0], want)

    images = rng.uniform(-1, 1, (3, 3, 24, 16)).astype(np.float32)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(images)).latent_dist
    got = _session(out / "vae_encoder.onnx").run(None, {"images": images})[0]
    _close(got[:, :4], dist.mean.numpy())
    _close(got[:, 4:], dist.logvar.numpy())


def test_manifest_records_what_the_runtime_needs(model_dir, fp32_engines):
    out, manifest = fp32_engines
    assert Manifest.load(out).to_dict() == manifest.to_dict()
    assert set(manifest.components) == set(COMPONENT_NAMES)
    for name, entry in manifest.components.items():
        assert entry.file == f"{name}.onnx" and entry.backend == "onnxruntime"
        assert entry.precision == "fp32"
        v = entry.verification
        assert v["max_rel_error"] < 1e-4 and len(v["shapes"]) == 2
        assert v["shapes"][0] != v["shapes"][1]
        assert entry.shape_range.height.to_list() == [16, 24, 32]
        assert len(entry.extra["cache_key"]) == 64 and entry.extra["opset"] == 17
    unet = manifest.components["unet"]
    assert [t["name"] for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.inputs[1]["dtype"] == "float32"
    raw = manifest.raw
    assert raw["scheduler"] == json.loads(
        (model_dir / "scheduler" / "scheduler_config.json").read_text()
    )
    assert manifest.prediction_type == "epsilon" and manifest.model["family"] == "sd1"
    assert manifest.vae_scaling_factor == pytest.approx(0.18215)
    assert manifest.dims.vae_scale_factor == 2 and manifest.dims.text_hidden_size == 32
    assert manifest.defaults["height"] == SIZE and manifest.defaults["width"] == SIZE
    assert manifest.unet_partition is None and manifest.quantization is None
    assert {"torch", "onnx", "diffusers"} <= set(raw["tools"])
    tok = manifest.tokenizer
    assert tok["max_length"] == 77 and tok["bos"] == "<|startoftext|>"
    assert (out / tok["vocab"]).is_file() and (out / tok["merges"]).is_file()
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()


def test_onnxruntime_graphs_fuse_attention(fp32_engines):
    """fp32 graphs written for ONNX Runtime run attention as ``com.microsoft.MultiHeadAttention``
    (numerics: the verification above and test_every_component_matches_diffusers); the manifest
    counts the fused layers."""
    import onnx

    out, manifest = fp32_engines
    for name in ("unet", "vae_decoder", "vae_encoder"):  # the VAE's attention has q/k/v biases
        graph = onnx.load(str(out / f"{name}.onnx")).graph
        fused = [n for n in graph.node if n.op_type == "MultiHeadAttention"]
        assert fused and {n.domain for n in fused} == {"com.microsoft"}, name
        assert not [n for n in graph.node if n.op_type == "Softmax"]  # every attention matched
        assert manifest.components[name].extra["fused_attention"] == len(fused)
    assert "fused_attention" not in manifest.components["text_encoder"].extra  # CLIP: unmatched


def test_reexport_reuses_and_changed_weights_invalidate(model_dir, fp32_engines, tmp_path):
    out, first = fp32_engines
    args = {"height": "16:32", "width": "16:24", "batch": "1:2", "progress": False}
    again = export_model(model_dir, out, **args)
    assert again.raw["export"]["reused"] == list(COMPONENT_NAMES)
    for name in COMPONENT_NAMES:
        assert again.components[name].sha256 == first.components[name].sha256

    # A changed UNet weight file re-exports the UNet only (content, not paths, decides).
    changed = tmp_path / "model"
    shutil.copytree(model_dir, changed)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(changed / "unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    unet.save_pretrained(changed / "unet")
    engines = tmp_path / "engines"
    shutil.copytree(out, engines)
    third = export_model(changed, engines, **args)
    assert third.raw["export"]["reused"] == ["text_encoder", "vae_decoder", "vae_encoder"]
    assert third.components["unet"].sha256 != first.components["unet"].sha256


def test_fp16_keeps_vae_fp32_unless_asked():
    opts = resolve_options(precision="fp16")
    assert component_precisions(opts) == {
        "text_encoder": "fp16",
        "unet": "fp16",
        "vae_decoder": "fp32",
        "vae_encoder": "fp32",
    }
    opts = resolve_options(precision="fp16", vae_fp16=True)
    assert set(component_precisions(opts).values()) == {"fp16"}


def test_cli_default_model_fp16_is_finite(tmp_path, monkeypatch, capsys):
    """`trt-sd export` with no model / --out: the bundled model (here a tiny v-prediction one)
    goes to the default engine directory; fp16 graphs keep the timestep fp32 and stay finite."""
    from trt_sd.export import checkpoint
    from trt_sd.models import default_engine_dir
    from trt_sd.runtime.cli import main as cli_main

    model = make_tiny_pipeline(tmp_path / "model", v_prediction=True)
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL_DIR", model)
    monkeypatch.setenv("TRT_SD_HOME", str(tmp_path))
    argv = ["export", "--quiet", "--precision", "fp16", "--vae-fp16", "--batch", "1:2"]
    assert cli_main(argv) == 0
    table = capsys.readouterr().out
    assert "max rel error" in table and "vae_encoder" in table and "next: trt-sd run" in table
    assert default_engine_dir() == tmp_path / "engines" / "default"
    manifest = Manifest.load(default_engine_dir())
    assert manifest.model["name"] == "trt-sd-digits"
    assert manifest.defaults["prompt"] == "a handwritten digit seven"
    assert manifest.prediction_type == "v_prediction" and manifest.model["family"] == "sd2"
    assert {e.precision for e in manifest.components.values()} == {"fp16"}
    unet = manifest.components["unet"]
    assert [t["dtype"] for t in unet.inputs] == ["float16", "float32", "float16"]
    assert unet.extra["fused_attention"] > 0  # fp16 MultiHeadAttention, verified like the rest
    for entry in manifest.components.values():
        assert entry.verification["max_rel_error"] < entry.verification["tolerance"]
    rng = np.random.default_rng(2)
    feeds = {
        "sample": (4 * rng.standard_normal((2, 4, 8, 8))).astype(np.float16),
        "timestep": np.array([0.0, 999.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float16),
    }
    (out,) = _session(default_engine_dir() / "unet.onnx").run(None, feeds)
    assert out.dtype == np.float16 and np.isfinite(out).all()


def test_fusion_that_fails_verification_falls_back_to_the_plain_graph(
    model_dir, tmp_path, monkeypatch
):
    """A fused attention the verification rejects (here: its scale broken on purpose) is
    replaced by the plain graph, which verifies; the export does not fail for an optimisation."""
    import onnx

    from trt_sd.export import ort_attention

    real = ort_attention.fuse_attention_file

    def broken(path, target=None):
        count = real(path, target)
        path = target or path
        if not count:
            return count
        model = onnx.load(str(path))
        for node in model.graph.node:
            for attr in node.attribute:
                if node.op_type == "MultiHeadAttention" and attr.name == "scale":
                    attr.f = 1.0
        onnx.save(model, str(path))
        return count

    monkeypatch.setattr(ort_attention, "fuse_attention_file", broken)
    out = tmp_path / "engines"
    manifest = export_model(model_dir, out, batch="1:1", progress=False)
    for name, entry in manifest.components.items():
        ops = {n.op_type for n in onnx.load(str(out / entry.file)).graph.node}
        assert "MultiHeadAttention" not in ops and "fused_attention" not in entry.extra, name
        assert entry.verification["max_rel_error"] < entry.verification["tolerance"]
    assert not list(out.glob("*.fused")) and not list(out.glob("*.partial"))
