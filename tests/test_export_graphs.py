"""Graph-level properties of the exporter: any multiple-of-8 size works, fp16 keeps norms fp32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from diffusers import UNet2DConditionModel

from trt_sd.export.modules import UNetWrapper
from trt_sd.export.onnx_export import export_onnx, trace_sizes
from trt_sd.export.verify import axis_sizes, random_inputs, torch_reference, verify
from trt_sd.models import ModelDims, all_components

DIMS = ModelDims(text_hidden_size=16, vae_scale_factor=8)


def _three_level_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return UNetWrapper(unet).eval()


def test_unet_graph_serves_latents_that_are_not_multiples_of_its_downsampling(tmp_path):
    """Two downsamplers: a 6x10 latent (e.g. 48x80 px) halves to 3x5 then 2x3; the graph must
    upsample to the skip tensors' sizes, as diffusers does, not blindly by 2."""
    module = _three_level_unet()
    comp = all_components(DIMS)["unet"]
    rng = np.random.default_rng(0)
    args = {"vocab_size": 10, "num_train_timesteps": 1000}
    trace = random_inputs(comp, trace_sizes("unet", 2, 8), "fp32", rng, **args)
    path = tmp_path / "unet.onnx"
    export_onnx(module, comp, trace, path, opset=17, fp16=False)
    feeds = [
        random_inputs(comp, axis_sizes(rows, h, w, 8), "fp32", rng, **args)
        for rows, h, w in ((1, 48, 80), (3, 64, 64), (2, 72, 40))
    ]
    record = verify("unet", str(path), [(f, torch_reference(module, f)) for f in feeds], "fp32")
    assert record["max_rel_error"] < 1e-4
    assert record["shapes"][0]["sample"] == [1, 4, 6, 10]


def test_fp16_graph_has_fp16_weights_and_fp32_norms(tmp_path):
    module = _three_level_unet()
    comp = all_components(DIMS)["unet"]
    rng = np.random.default_rng(0)
    args = {"vocab_size": 10, "num_train_timesteps": 1000}
    trace = random_inputs(comp, trace_sizes("unet", 2, 8), "fp16", rng, **args)
    path = tmp_path / "unet.onnx"
    export_onnx(module, comp, trace, path, opset=17, fp16=True)
    graph = onnx.load(str(path)).graph
    conv_weights = {n.input[1] for n in graph.node if n.op_type == "Conv"}
    types = {i.name: i.data_type for i in graph.initializer}
    assert {types[w] for w in conv_weights if w in types} == {onnx.TensorProto.FLOAT16}
    norms = [n for n in graph.node if n.op_type in ("InstanceNormalization", "LayerNormalization")]
    assert norms
    # every norm's data input comes straight from a Cast to float32
    producers = {o: n for n in graph.node for o in n.output}
    for norm in norms:
        cast = producers[norm.input[0]]
        while cast.op_type == "Reshape":  # group norm = Reshape -> InstanceNorm -> Reshape
            cast = producers[cast.input[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT
    feeds = random_inputs(comp, axis_sizes(2, 64, 64, 8), "fp16", rng, **args)
    record = verify("unet", str(path), [(feeds, torch_reference(module, feeds))], "fp16")
    assert record["max_rel_error"] < 3e-2


class _Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.factor


def _scale_graph(path, factor: float, dtype: int) -> str:
    """A one-node ONNX graph ``images = latent * factor`` in ``dtype``."""
    from onnx import TensorProto, helper, numpy_helper

    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    const = numpy_helper.from_array(np.array(factor, np_dtype), "factor")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["latent", "factor"], ["images"])],
        "scale",
        [helper.make_tensor_value_info("latent", dtype, None)],
        [helper.make_tensor_value_info("images", dtype, None)],
        [const],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, str(path))
    return str(path)


def test_verification_names_the_component_on_overflow_and_mismatch(tmp_path):
    from trt_sd.export.verify import VerificationError
    from trt_sd.models import NumericalError

    def case(feeds, factor):
        return [(feeds, torch_reference(_Scale(factor), feeds))]

    big = {"latent": np.full((1, 4), 10.0, np.float16)}
    overflow = _scale_graph(tmp_path / "a.onnx", 1e4, onnx.TensorProto.FLOAT16)  # 1e5 > fp16 max
    with pytest.raises(NumericalError, match=r"vae_decoder: .*NaN or inf"):
        verify("vae_decoder", overflow, case(big, 1e4), "fp16")
    wrong = _scale_graph(tmp_path / "b.onnx", 1.1, onnx.TensorProto.FLOAT)
    ones = {"latent": np.ones((1, 4), np.float32)}
    with pytest.raises(VerificationError, match=r"vae_decoder: .*above the tolerance"):
        verify("vae_decoder", wrong, case(ones, 1.0), "fp32")
    assert verify("vae_decoder", wrong, case(ones, 1.1), "fp32")["max_rel_error"] < 1e-6
