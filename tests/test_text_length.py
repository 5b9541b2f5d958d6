"""The UNet's text length as a dynamic axis (``text_length``) and the emphasis option around it:
descriptors, TensorRT profiles, export options, the ONNX graph and manifest, infotext, CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from runtime_engines import tiny_engines

from trt_sd.export import tensorrt_build as tb
from trt_sd.export.options import resolve_options
from trt_sd.models import InputError, ModelDims, Range, ShapeRange, all_components
from trt_sd.models.descriptors import CONTEXT
from trt_sd.models.manifest import Manifest
from trt_sd.models.unet_stages import UNetLayout
from trt_sd.runtime.infotext import format_infotext, parse_infotext, read_infotext

SHAPES = ShapeRange(
    Range(1, 1, 4), Range(512, 512, 512), Range(512, 512, 512), text_length=Range(77, 77, 231)
)
UNET = all_components(ModelDims())["unet"]


def test_unet_context_is_dynamic_and_profiled_77_to_231() -> None:
    assert UNET.input(CONTEXT).shape == ("unet_batch", "text_length", 768)
    assert UNET.dynamic_axes()[CONTEXT] == {0: "unet_batch", 1: "text_length"}
    profile = tb.engine_profile(UNET, SHAPES)
    assert profile[CONTEXT] == ((1, 77, 768), (2, 77, 768), (8, 231, 768))
    assert tb.engine_profile(UNET, SHAPES, static_shapes=True)[CONTEXT][2] == (2, 77, 768)
    # the text encoder stays at 77 tokens whatever the range
    text = all_components(ModelDims())["text_encoder"]
    assert text.profile(SHAPES)["input_ids"][2] == (8, 77)


def test_unet_sections_read_the_same_context_axis() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_export import SD15_UNET

    layout = UNetLayout.from_unet_config(dict(SD15_UNET), ModelDims())
    half = len(layout.layers) // 2
    section = layout.section("s0", range(half), layout.writes(half - 1), "first half")
    assert section.input(CONTEXT).shape == ("unet_batch", "text_length", 768)
    assert section.profile(SHAPES)[CONTEXT][2] == (8, 231, 768)


def test_shape_range_round_trip_and_old_manifests() -> None:
    d = SHAPES.to_dict()
    assert d["text_length"] == [77, 77, 231]
    assert ShapeRange.from_dict(d) == SHAPES
    del d["text_length"]
    old = ShapeRange.from_dict(d)
    assert old.axis("text_length") == Range(77, 77, 77)
    assert old.prompt_chunks(77) == 1 and SHAPES.prompt_chunks(77) == 3


@pytest.mark.parametrize("value", [0, 65, True, "3"])
def test_bad_prompt_chunks_are_refused(value) -> None:
    with pytest.raises(InputError, match="prompt chunks"):
        resolve_options(prompt_chunks=value)


def test_export_records_the_range_and_the_graph_takes_it() -> None:
    onnx = pytest.importorskip("onnx")
    folder = tiny_engines()
    manifest = Manifest.load(Path(folder))
    unet = manifest.components["unet"]
    assert unet.shape_range.text_length == Range(77, 77, 231)
    graph = onnx.load(str(folder / unet.file), load_external_data=False).graph
    context = next(i for i in graph.input if i.name == CONTEXT)
    assert context.type.tensor_type.shape.dim[1].dim_param == "text_length"


def test_emphasis_in_infotext_only_when_not_default() -> None:
    params = {"prompt": "a (cat)", "negative_prompt": "", "sampler": "euler", "steps": 3,
              "guidance": 7.0, "seeds": [1], "width": 16, "height": 16}  # fmt: skip
    assert "Emphasis" not in format_infotext(params)
    text = format_infotext({**params, "emphasis": "no_norm"})
    assert "Emphasis: No norm" in text
    assert parse_infotext(text)["emphasis"] == "no_norm"
    assert "emphasis" not in parse_infotext(format_infotext(params))
    assert parse_infotext(text.replace("No norm", "None"))["emphasis"] == "none"
    with pytest.raises(InputError, match="Emphasis"):
        parse_infotext(text.replace("No norm", "Loud"))


def test_cli_emphasis_is_stored_and_reused(capsys, tmp_path: Path) -> None:
    from trt_sd.runtime.cli import main

    out = tmp_path / "a.png"
    argv = ["run", "--engines", str(tiny_engines()), "--prompt", "a (cat:1.5)", "--seed", "2"]
    argv += ["--steps", "2", "--backend", "onnxruntime-cpu", "--quiet", "--json"]
    assert main([*argv, "--emphasis", "none", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["params"]["emphasis"] == "none"
    assert "Emphasis: None" in read_infotext(out)
    again = tmp_path / "b.png"
    code = main(["run", "--from-png", str(out), "--engines", str(tiny_engines()), "--quiet",
                 "--backend", "onnxruntime-cpu", "--out", str(again)])  # fmt: skip
    assert code == 0
    assert "Emphasis: None" in read_infotext(again)
    assert main([*argv, "--emphasis", "loud"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_text_length_range_follows_prompt_chunks_and_static_shapes() -> None:
    from types import SimpleNamespace

    from trt_sd.export.api import text_length_range

    ckpt = SimpleNamespace(dims=ModelDims())
    assert text_length_range(resolve_options(), ckpt) == Range(77, 77, 231)
    assert text_length_range(resolve_options(prompt_chunks=1), ckpt) == Range(77, 77, 77)
    static = resolve_options(prompt_chunks=4, trt_static_shapes=True)
    assert text_length_range(static, ckpt) == Range(77, 77, 77)  # pinned at the optimum


def test_export_cli_has_prompt_chunks() -> None:
    import argparse

    from trt_sd.export.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--prompt-chunks", "5"]).prompt_chunks == 5
    assert parser.parse_args([]).prompt_chunks == 3


def test_bad_emphasis_is_one_input_error_before_any_engine_runs() -> None:
    from trt_sd.runtime import Pipeline
    from trt_sd.runtime.serve.engine import BatchingEngine

    pipe = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    with pytest.raises(InputError, match="emphasis must be one of original, no_norm"):
        pipe("a cat", emphasis="loud", steps=1)
    engine = BatchingEngine(pipe)
    try:
        with pytest.raises(InputError, match="emphasis must be one of"):
            engine.submit(prompt="a cat", emphasis=None)
    finally:
        engine.close()


def test_generate_body_takes_emphasis() -> None:
    from trt_sd.runtime.serve.replica import parse_generate_body

    assert parse_generate_body(b'{"prompt": "a (cat)", "emphasis": "none"}')["emphasis"] == "none"
    with pytest.raises(InputError, match="emphasis must be a string"):
        parse_generate_body(b'{"emphasis": 3}')
