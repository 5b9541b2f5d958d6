"""``trt-sd export --precision int8`` end to end on a tiny pipeline (calibration, PTQ, QAT,
Q/DQ graph, manifest record, accuracy report, reuse, runtime load) and its bad-input errors.

Kept small: 2 calibration prompts x 3 steps, 2 report images x 4 steps. torch runs on one
thread here: on a shared 2-core machine a tiny UNet call is several times faster that way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
import onnx
import torch
from tiny_pipeline import make_tiny_pipeline

from trt_sd.export import export_model
from trt_sd.export.int8 import preflight, recipe
from trt_sd.runtime.cli import main as cli_main

SMALL = {"calib_size": 2, "calib_steps": 3, "report_images": 2, "report_steps": 4}
SHAPES = {"height": 16, "width": 16, "batch": "1:2", "progress": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("int8") / "tiny")


@pytest.fixture(scope="module")
def exported(tiny: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8-out") / "engines"
    export_model(tiny, out, precision="int8", int8={**SMALL, "calibrator": "entropy"}, **SHAPES)
    return out


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli_main(argv)
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--calib-prompts", "{tmp}/missing.txt"], "missing.txt' does not exist"),
        (["--calib-prompts", "{tmp}/empty.txt"], "holds no prompts"),
        (["--calib-size", "0"], "--calib-size must be an integer >= 1, got 0"),
        (["--calibrator", "entropy", "--percentile", "0"], "percentile must be in (0, 100]"),
    ],
)
def test_cli_refuses_bad_int8_input(tiny, tmp_path, capsys, extra, message):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    argv = ["export", str(tiny), "--out", str(tmp_path / "o"), "--precision", "int8", *extra]
    rc, err = _run_cli(argv, capsys)
    assert rc == 2 and err.count("\n") == 0 and err.startswith("error: ")
    assert message in err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_qat_without_torch_and_oversized_calibration(
    tiny, tmp_path, capsys, monkeypatch
):
    argv = ["export", str(tiny), "--out", str(tmp_path / "o"), "--precision", "int8"]
    monkeypatch.setattr(recipe, "torch_available", lambda: False)
    rc, err = _run_cli([*argv, "--qat"], capsys)
    assert rc == 2 and "--qat needs torch" in err and "pip install 'trt-sd[export]'" in err
    monkeypatch.undo()
    monkeypatch.setattr(preflight, "available_memory", lambda: 1 << 20)
    rc, err = _run_cli([*argv, "--calib-size", "5"], capsys)
    assert rc == 2 and err.count("\n") == 0
    assert "GiB is available; lower --calib-size (now 5)" in err
    rc, err = _run_cli(["export", str(tiny), "--qat"], capsys)
    assert rc == 2 and "need --precision int8" in err


def test_int8_export_record(exported: Path):
    from trt_sd.models import Manifest

    manifest = Manifest.load(exported)
    precisions = {n: c.precision for n, c in manifest.components.items()}
    assert precisions == {
        "text_encoder": "fp32",
        "unet": "int8",
        "vae_decoder": "fp32",
        "vae_encoder": "fp32",
    }
    unet = manifest.components["unet"]
    assert [i["dtype"] for i in unet.inputs] == ["float32", "float32", "float32"]
    q = manifest.quantization
    assert q["component"] == "unet"
    r = q["recipe"]
    assert (r["calibrator"], r["calib_size"], r["calib_steps"], r["qat"]) == (
        "entropy",
        2,
        3,
        False,
    )
    assert r["qdq_flavour"] == "onnxruntime" and "*conv_shortcut" in r["exclude"]
    assert r["calib_prompts"] == "builtin:generic" and len(r["calib_prompts_used"]) == 2
    cal = q["calibration"]
    assert cal["unet_rows"] == 2 * 2 * 3 and cal["timesteps_covered"] == 3
    assert "conv_in" in cal["excluded_layers"] and "conv_out" in cal["excluded_layers"]
    graph = q["graph"]
    assert graph["quantized_ops"]["Conv"] > 10 and graph["quantized_ops"]["MatMul"] > 10
    assert graph["file_bytes_int8"] == unet.extra["bytes"] < graph["file_bytes_fp32"]
    report = q["report"]
    assert len(report["unet_cosine_per_step"]) == 4 and report["images"] == 2
    assert 0.9 < report["unet_cosine_mean"] <= 1.0
    assert np.isfinite(report["image_psnr_db"]["mean"]) and report["prompt_accuracy"] is None
    model = onnx.load(str(exported / unet.file))
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= graph["quantized_ops"]["Conv"] + graph["quantized_ops"]["MatMul"]
    ops = [n.op_type for n in model.graph.node]  # onnxruntime flavour: attention fused, all of it
    assert "MultiHeadAttention" in ops and "Softmax" not in ops


def test_int8_reexport_reuses_the_unet_and_its_report(exported: Path, tiny: Path):
    from trt_sd.models import Manifest

    before = Manifest.load(exported).quantization
    manifest = export_model(
        tiny, exported, precision="int8", int8={**SMALL, "calibrator": "entropy"}, **SHAPES
    )
    assert "unet" in manifest.raw["export"]["reused"]
    assert manifest.quantization == before


def test_runtime_generates_from_the_int8_engines(exported: Path):
    from trt_sd.runtime import Pipeline

    pipe = Pipeline.load(exported, backend="onnxruntime-cpu")
    result = pipe("a photo of a cat", steps=3, seed=1)
    assert result.images[0].shape == (16, 16, 3) and result.unet_calls == 3


def test_qat_export_tensorrt_flavour(tiny: Path, tmp_path: Path):
    options = {**SMALL, "qat": True, "qat_steps": 3, "qat_batch": 4, "qdq_flavour": "tensorrt"}
    manifest = export_model(tiny, tmp_path / "qat", precision="int8", int8=options, **SHAPES)
    q = manifest.quantization
    assert q["recipe"]["qat"] and q["recipe"]["qat_steps"] == 3
    assert q["qat"]["steps"] == 3 and np.isfinite(q["qat"]["eval_mse_qat"])
    assert q["graph"]["flavour"] == "tensorrt" and q["graph"]["output_quantized_convs"] == 0
    model = onnx.load(str(tmp_path / "qat" / "unet.onnx"))
    zero_points = {n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    types = {t.data_type for t in model.graph.initializer if t.name in zero_points}
    assert types == {onnx.TensorProto.INT8}  # TensorRT takes int8 Q/DQ only
    assert not [n for n in model.graph.node if n.domain == "com.microsoft"]  # no ORT-only ops


def test_fake_quant_torch_model_is_the_graph(tiny: Path, tmp_path: Path):
    """The QAT model (torch fake quant) and the rewritten graph compute the same function, so
    what QAT trains is what the graph runs."""
    import onnxruntime as ort

    from trt_sd.export.checkpoint import locate
    from trt_sd.export.int8.fake_quant import attach, detach
    from trt_sd.export.int8.layers import select_layers
    from trt_sd.export.int8.observe import RangeObserver
    from trt_sd.export.int8.qdq_graph import LayerRanges, insert_qdq
    from trt_sd.export.modules import ModuleLoader
    from trt_sd.export.onnx_export import export_onnx, trace_sizes
    from trt_sd.export.verify import random_inputs
    from trt_sd.models import all_components

    ckpt = locate(tiny)
    wrapper = ModuleLoader(ckpt).wrapper("unet")
    component = all_components(ckpt.dims)["unet"]
    rng = np.random.default_rng(0)
    kw = {"vocab_size": 50, "num_train_timesteps": 1000}
    trace = random_inputs(component, trace_sizes("unet", 1, 2), "fp32", rng, **kw)
    path = tmp_path / "unet.onnx"
    export_onnx(wrapper, component, trace, path, opset=17, fp16=False)
    sizes = {"unet_batch": 2, "latent_height": 8, "latent_width": 8, "text_length": 77}
    feeds = random_inputs(component, sizes, "fp32", rng, **kw)
    args = [torch.from_numpy(v) for v in feeds.values()]
    selection = select_layers(wrapper.unet)
    with RangeObserver(wrapper.unet, selection.quantized) as observer, torch.no_grad():
        reference = wrapper(*args).numpy()
    ranges = {  # clip the top 20%: the clipping paths must agree too
        n: LayerRanges(input_amax=0.8 * observer.stats[(n, "input")].amax)
        for n in selection.quantized
    }
    layers = attach(wrapper.unet, ranges)
    with torch.no_grad():
        expected = wrapper(*args).numpy()
    exact = {f"unet.{n}": layer.ranges() for n, layer in layers.items()}
    detach(wrapper.unet, layers)
    model = onnx.load(str(path))
    insert_qdq(model, exact, "tensorrt")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    out = session.run(None, feeds)[0]
    quantization_error = np.abs(expected - reference).max()
    # Exact but for float summation order, which can flip a rounding here and there (one grid
    # step, then propagated): far closer to the fake-quant model than to fp32.
    assert np.abs(out - expected).max() < 0.05 * quantization_error
    cosine = float(np.sum(out * expected) / np.linalg.norm(out) / np.linalg.norm(expected))
    assert cosine > 0.9999
