"""INT8 building blocks without a model: calibrators, prompts, recipe checks, the Q/DQ rewrite.

The Q/DQ tests build a small float graph by hand (Conv -> MatMul + bias, the two patterns the
UNet is made of), rewrite it, and check both the format TensorRT needs (int8 zero points 0,
per-channel axes) and that ONNX Runtime really picks its int8 kernels for the onnxruntime
flavour (QLinearConv, MatMulIntegerToFloat in the optimised graph).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from trt_sd.export.int8 import preflight, recipe
from trt_sd.export.int8.calibrators import compute_amax, entropy_amax, percentile_amax
from trt_sd.export.int8.prompts import BUNDLED_PROMPTS, parse_prompts, read_prompt_file
from trt_sd.export.int8.qdq_graph import LayerRanges, insert_qdq, module_of, quantize_weight
from trt_sd.models import BackendUnavailableError, InputError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


# ---- calibrators ----------------------------------------------------------------------------
def _hist(values: np.ndarray) -> tuple[np.ndarray, float]:
    amax = float(np.abs(values).max())
    hist, _ = np.histogram(np.abs(values), bins=2048, range=(0.0, amax))
    return hist, amax


def test_percentile_clips_the_tail_only():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(-1, 1, 100_000), [50.0]])
    hist, amax = _hist(values)
    assert compute_amax(amax, hist, "minmax", 99.99) == 50.0
    clipped = percentile_amax(hist, amax, 99.9)
    assert 0.95 <= clipped <= 1.05  # the outlier is clipped, the bulk kept


def test_entropy_ignores_a_lone_outlier_but_keeps_a_uniform_range():
    rng = np.random.default_rng(0)
    gaussian = np.concatenate([rng.standard_normal(200_000), [60.0]])
    hist, amax = _hist(gaussian)
    assert 2.5 < entropy_amax(hist, amax) < 10.0
    uniform = rng.uniform(-1, 1, 200_000)
    hist, amax = _hist(uniform)
    assert entropy_amax(hist, amax) > 0.9 * amax


# ---- prompts and recipe -----------------------------------------------------------------------
def test_prompt_files(tmp_path: Path):
    assert parse_prompts("# c\n\n a cat \nb\n") == ["a cat", "b"]
    with pytest.raises(InputError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(InputError, match="holds no prompts"):
        read_prompt_file(empty)
    with pytest.raises(InputError, match="is a directory"):
        read_prompt_file(tmp_path)


def test_bundled_prompt_set_covers_every_digit():
    prompts = read_prompt_file(BUNDLED_PROMPTS)
    assert len(prompts) >= 64
    first = " ".join(prompts[:10])
    for word in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"):
        assert word in first


def _resolve(**options):
    return recipe.resolve_recipe(
        options, backend="onnxruntime", bundled_model=False, default_guidance=7.5
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"calib_size": 0}, "--calib-size must be an integer >= 1"),
        ({"calib_steps": -2}, "--calib-steps"),
        ({"calibrator": "mse"}, "unknown calibrator"),
        ({"percentile": 120}, "percentile must be in"),
        ({"qdq_flavour": "qnn"}, "unknown Q/DQ flavour"),
        ({"colour": 1}, "unknown INT8 option"),
        ({"qat": True, "qat_steps": 0}, "--qat-steps"),
    ],
)
def test_recipe_rejects_bad_options(options, message):
    with pytest.raises(InputError, match=message):
        _resolve(**options)


def test_recipe_defaults_and_manifest_record():
    r = _resolve(calib_size=3)
    assert r.recipe.qdq_flavour == "onnxruntime"
    assert len(r.prompts) == 3 and r.prompts_source == "builtin:generic"
    trt = recipe.resolve_recipe(None, backend="tensorrt", bundled_model=False, default_guidance=5)
    assert trt.recipe.qdq_flavour == "tensorrt" and trt.recipe.guidance == 5.0
    record = r.to_dict()
    assert record["calibrator"] == "percentile" and "qat_steps" not in record
    assert "conv_in" in record["exclude"] and record["calib_size"] == 3


def test_qat_without_torch_is_refused(monkeypatch):
    monkeypatch.setattr(recipe, "torch_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match=r"--qat needs torch .*trt-sd\[export\]"):
        _resolve(qat=True)


# ---- the Q/DQ rewrite -------------------------------------------------------------------------
C, K, N = 16, 32, 24


def _float_graph() -> tuple[object, dict[str, np.ndarray]]:
    """x[1,C,8,8] -> Conv(K) -> Reshape to tokens -> MatMul(N) + bias, torch-style names."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w_conv = rng.standard_normal((K, C, 3, 3)).astype(np.float32) * 0.1
    w_mm = rng.standard_normal((K, N)).astype(np.float32) * 0.1
    inits = {
        "unet.block.conv.weight": w_conv,
        "unet.block.conv.bias": rng.standard_normal(K).astype(np.float32),
        "onnx::MatMul_1": w_mm,
        "unet.block.proj.bias": rng.standard_normal(N).astype(np.float32),
        "shape": np.array([1, K, 64], np.int64),
    }
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "unet.block.conv.weight", "unet.block.conv.bias"],
            ["c"],
            name="/unet/block/conv/Conv",
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Reshape", ["c", "shape"], ["r"], name="/unet/block/Reshape"),
        helper.make_node("Transpose", ["r"], ["t"], name="/unet/block/Transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "onnx::MatMul_1"], ["m"], name="/unet/block/proj/MatMul"),
        helper.make_node("Add", ["unet.block.proj.bias", "m"], ["y"], name="/unet/block/proj/Add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, inits


PLAN = {
    "unet.block.conv": LayerRanges(input_amax=3.0, output_amax=6.0),
    "unet.block.proj": LayerRanges(input_amax=5.0),
}


def _session(model: object, level: str = "all", dump: Path | None = None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if dump is not None:
        options.optimized_model_filepath = str(dump)
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _nodes(model) -> dict[str, list]:
    by_type: dict[str, list] = {}
    for node in model.graph.node:
        by_type.setdefault(node.op_type, []).append(node)
    return by_type


def _init(model, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _attr(node, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


def test_module_names_follow_the_exporter():
    assert (
        module_of("/unet/down_blocks.0/resnets.0/conv1/Conv")
        == "unet.down_blocks.0.resnets.0.conv1"
    )


def test_tensorrt_flavour_format_and_semantics():
    model, inits = _float_graph()
    x = np.random.default_rng(1).standard_normal((1, C, 8, 8)).astype(np.float32)
    summary = insert_qdq(model, PLAN, "tensorrt")
    assert summary.op_counts() == {"Conv": 1, "MatMul": 1} and not summary.output_quantized
    nodes = _nodes(model)
    assert len(nodes["QuantizeLinear"]) == 2  # one per quantized layer input, none on outputs
    for dq in nodes["DequantizeLinear"]:
        data, _scale, zero = (
            _init(model, n) if n in {t.name for t in model.graph.initializer} else None
            for n in dq.input
        )
        if data is not None:  # a weight: int8, per output channel, zero point 0
            assert data.dtype == np.int8 and np.all(zero == 0) and zero.dtype == np.int8
            axis = _attr(dq, "axis")
            assert (axis, data.shape[axis]) in ((0, K), (1, N))
    for q in nodes["QuantizeLinear"]:
        assert _init(model, q.input[2]).dtype == np.int8 and _init(model, q.input[2]) == 0
    assert not any(t.name == "unet.block.conv.weight" for t in model.graph.initializer)
    # Semantics: the graph computes exactly "quantize input and weight, then float op".
    out = _session(model, "none").run(None, {"x": x})[0]
    import torch

    def fq(v, amax):
        s = amax / 127
        return np.clip(np.rint(v / s), -128, 127) * s

    wq, ws = quantize_weight(inits["unet.block.conv.weight"], 0, None)
    conv = torch.nn.functional.conv2d(
        torch.from_numpy(fq(x, 3.0)),
        torch.from_numpy(wq.astype(np.float32) * ws[:, None, None, None]),
        torch.from_numpy(inits["unet.block.conv.bias"]),
        padding=1,
    ).numpy()
    tokens = conv.reshape(1, K, 64).transpose(0, 2, 1)
    mq, ms = quantize_weight(inits["onnx::MatMul_1"], 1, None)
    expected = fq(tokens, 5.0) @ (mq.astype(np.float32) * ms) + inits["unet.block.proj.bias"]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_onnxruntime_flavour_runs_int8_kernels(tmp_path: Path):
    model, _ = _float_graph()
    summary = insert_qdq(model, PLAN, "onnxruntime")
    assert summary.output_quantized == ["unet.block.conv"]
    nodes = _nodes(model)
    for q in nodes["QuantizeLinear"]:
        zero = _init(model, q.input[2])
        assert zero.dtype == np.uint8 and zero == 128
    add = nodes["Add"][0]
    assert _init(model, add.input[0]).shape == (1, 1, N)
    dump = tmp_path / "optimised.onnx"
    x = np.random.default_rng(1).standard_normal((1, C, 8, 8)).astype(np.float32)
    fused = _session(model, "all", dump).run(None, {"x": x})[0]
    plain = _session(model, "none").run(None, {"x": x})[0]
    np.testing.assert_allclose(fused, plain, rtol=1e-3, atol=1e-3 * np.abs(plain).max())
    ops = Counter(n.op_type for n in onnx.load(str(dump)).graph.node)
    assert ops["QLinearConv"] == 1 and ops["MatMulIntegerToFloat"] == 1, ops
    assert ops["Conv"] == 0 and ops["MatMul"] == 0 and ops["Gemm"] == 0, ops


def test_a_planned_layer_without_a_node_is_an_error():
    model, _ = _float_graph()
    with pytest.raises(ValueError, match="no quantizable node"):
        insert_qdq(model, {**PLAN, "unet.block.missing": LayerRanges(1.0)}, "tensorrt")
    model, _ = _float_graph()
    with pytest.raises(ValueError, match="needs an output range"):
        insert_qdq(model, {"unet.block.conv": LayerRanges(1.0)}, "onnxruntime")


def test_memory_check_says_what_to_lower(monkeypatch):
    from types import SimpleNamespace

    from trt_sd.models import ModelDims, Range, ShapeRange

    ckpt = SimpleNamespace(dims=ModelDims())  # SD 1.5's sizes
    shapes = ShapeRange(Range(1, 1, 1), Range(512, 512, 512), Range(512, 512, 512), 8)
    resolved = _resolve(calib_size=8)
    monkeypatch.setattr(preflight, "unet_weight_bytes", lambda _ckpt: 3_438_000_000)
    monkeypatch.setattr(preflight, "available_memory", lambda: 4 << 30)
    with pytest.raises(InputError, match=r"needs about 9\.\d GiB .*lower --calib-size \(now 8\)"):
        preflight.check_memory(ckpt, resolved, shapes)
    monkeypatch.setattr(preflight, "available_memory", lambda: 64 << 30)
    preflight.check_memory(ckpt, resolved, shapes)  # fits: no error


def test_a_layer_reading_a_quantized_conv_output():
    """Conv -> Conv, both quantized (onnxruntime flavour: the first one's output is quantized
    too): the second layer quantizes the dequantized tensor again, and the graph still runs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        f"unet.c{i}.weight": rng.standard_normal((C, C, 1, 1)).astype(np.float32) for i in (1, 2)
    }
    nodes = [
        helper.make_node("Conv", ["x", "unet.c1.weight"], ["a"], name="/unet/c1/Conv"),
        helper.make_node("Conv", ["a", "unet.c2.weight"], ["y"], name="/unet/c2/Conv"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    plan = {f"unet.c{i}": LayerRanges(input_amax=4.0, output_amax=20.0) for i in (1, 2)}
    summary = insert_qdq(model, plan, "onnxruntime")
    assert summary.output_quantized == ["unet.c1"]  # c2 writes the graph output: stays float
    x = rng.standard_normal((1, C, 4, 4)).astype(np.float32)
    out = _session(model, "all").run(None, {"x": x})[0]
    assert out.shape == (1, C, 4, 4) and np.isfinite(out).all()
