"""UNet partitioning: the layer layout, balanced cuts, exported stages that chain to the whole
UNet, and the manifest record of the tensors flowing between them."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from runtime_engines import tiny_engines, tiny_model
from section_engines import split_engines

from trt_sd.models import InputError, Manifest, ManifestError, ModelDims, Range, ShapeRange
from trt_sd.models.descriptors import UNET, all_components
from trt_sd.models.unet_plans import FROM_INPUT, UNetPartition, check_split_count
from trt_sd.models.unet_stages import (
    TIME_EMBEDDING,
    UNetLayout,
    balanced_cuts,
    hidden_name,
    skip_name,
    stage_name,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_export import SD15_UNET

UNET_IO = all_components(ModelDims())[UNET]


def sd15_layout() -> UNetLayout:
    return UNetLayout.from_unet_config(dict(SD15_UNET), ModelDims())


def test_sd15_layout_layers_and_skips() -> None:
    layout = sd15_layout()
    names = [layer.name for layer in layout.layers]
    assert names[0] == "conv_in" and names[-1] == "conv_out" and "mid" in names
    assert len(layout) == 41 and layout.num_skips == 12  # 1 + 3 * (2 + 1) + 2 skips
    # resnets and transformers are separate layers; the transformer makes the skip
    assert names[1:3] == ["down_0_0", "down_0_0_attn"]
    assert layout.layers[2].produces_skip == 1 and layout.layers[1].produces_skip is None
    assert names.count("down_0_downsample") == 1 and "down_3_downsample" not in names
    consumed = [layer.consumes_skip for layer in layout.layers if layer.consumes_skip is not None]
    assert consumed == list(range(11, -1, -1))  # the up path takes the last skip first
    # first layer of each later up block upsamples the previous block's output first
    assert [layer.name for layer in layout.layers if layer.upsample_first] == [
        "up_1_0",
        "up_2_0",
        "up_3_0",
    ]
    sample, timestep, context = UNET_IO.input_names
    assert layout.reads(0) == [sample, timestep]
    assert layout.writes(0) == [hidden_name("conv_in"), skip_name(0), TIME_EMBEDDING]
    assert layout.reads(len(layout) - 1) == [hidden_name("up_3_2_attn")]
    assert layout.reads(names.index("up_3_2_attn")) == [hidden_name("up_3_2"), context]
    assert layout.writes(len(layout) - 1) == UNET_IO.output_names


def test_lower_resolution_axes_round_up() -> None:
    layout = sd15_layout()
    spec = layout.spec(hidden_name("down_1_downsample"))  # level 2, 640 channels
    assert spec.shape == ("unet_batch", 640, "latent_height/4", "latent_width/4")
    shapes = ShapeRange(Range(1, 2, 4), Range(256, 512, 520), Range(512, 512, 512))
    assert spec.profile(shapes) == (
        (1, 640, 8, 16),
        (4, 640, 16, 16),
        (8, 640, 17, 16),  # 520 px = 65 latents -> ceil(65 / 4) = 17, as stride-2 convs give
    )


def test_partition_stages_and_tensor_flows() -> None:
    layout = sd15_layout()
    plan = UNetPartition(layout, (5, 17))
    comps = plan.components()
    assert [c.name for c in comps] == [stage_name(k) for k in range(3)]
    assert comps[0].input_names == UNET_IO.input_names
    assert comps[-1].output_names == UNET_IO.output_names
    context = UNET_IO.input_names[2]
    assert comps[1].input_names[:3] == [context, TIME_EMBEDDING, hidden_name("down_0_1_attn")]
    flows = {f["name"]: f for f in plan.tensors()}
    assert flows[context] == {"name": context, "from": FROM_INPUT, "to": [c.name for c in comps]}
    assert flows[skip_name(0)] == {
        "name": skip_name(0),
        "from": "unet_stage0",
        "to": ["unet_stage2"],
    }
    assert flows[TIME_EMBEDDING]["to"] == ["unet_stage1", "unet_stage2"]
    # every stage input is a UNet input or made by exactly one earlier stage
    made = set(UNET_IO.input_names)
    for comp in comps:
        assert set(comp.input_names) <= made
        made |= set(comp.output_names)
    record = json.loads(json.dumps(plan.to_dict()))
    assert UNetPartition.from_dict(record, ModelDims()).cuts == (5, 17)
    record["stages"][1]["inputs"].reverse()
    with pytest.raises(ManifestError, match="re-export"):
        UNetPartition.from_dict(record, ModelDims())


def test_balanced_cuts_minimise_the_largest_stage() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        costs = list(rng.uniform(0, 5, int(rng.integers(4, 9))))
        stages = int(rng.integers(2, 4))
        cuts = balanced_cuts(costs, stages)

        options = itertools.combinations(range(1, len(costs)), stages - 1)
        best = min(_worst_stage(costs, c) for c in options)
        assert len(cuts) == stages - 1 and _worst_stage(costs, cuts) == pytest.approx(best)


def _worst_stage(costs: list[float], cuts) -> float:
    bounds = [0, *cuts, len(costs)]
    return max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))


@pytest.mark.parametrize("count", [0, 1, 42, "2", True, 2.0])
def test_split_counts_the_unet_cannot_take(count) -> None:
    with pytest.raises(InputError, match="from 2 to 41"):
        check_split_count(sd15_layout(), count)


def test_torch_sections_chain_to_the_unet_exactly() -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from trt_sd.export.unet_sections import UNetSection, layer_costs, torch_feeds

    unet = UNet2DConditionModel.from_pretrained(tiny_model() / "unet").eval()
    dims = ModelDims(text_hidden_size=32)
    layout = UNetLayout.from_unet_config(unet.config, dims)
    rng = np.random.default_rng(1)
    feeds = torch_feeds(
        {
            "sample": rng.standard_normal((3, 4, 5, 9)),  # odd sizes: the resizing upsamplers
            "timestep": np.array([1.0, 400.0, 999.0]),
            "encoder_hidden_states": rng.standard_normal((3, 77, 32)),
        }
    )
    with torch.no_grad():
        reference = unet(*feeds.values(), return_dict=False)[0]
        costs = layer_costs(unet, layout, feeds)
        assert len(costs) == len(layout) and min(costs) >= 0 and sum(costs) > 0
        for stages in (2, 3, len(layout)):
            plan = UNetPartition.balanced(layout, stages, costs)
            env = dict(feeds)
            for k, comp in enumerate(plan.components()):
                section = UNetSection(
                    unet, layout, plan.stage_layers(k), comp.input_names, comp.output_names
                )
                out = section(*(env[n] for n in comp.input_names))
                outs = out if isinstance(out, tuple) else (out,)
                env.update(zip(comp.output_names, outs, strict=True))
            assert torch.equal(env[UNET_IO.output_names[0]], reference), stages


def _stage_chain(engines: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    manifest = Manifest.load(engines)
    env = dict(feeds)
    for stage in manifest.unet_partition["stages"]:
        entry = manifest.components[stage["component"]]
        session = ort.InferenceSession(
            str(engines / entry.file), providers=["CPUExecutionProvider"]
        )
        outs = session.run(stage["outputs"], {n: env[n] for n in stage["inputs"]})
        env.update(zip(stage["outputs"], outs, strict=True))
    return env[UNET_IO.output_names[0]]


def test_exported_stages_chain_to_the_whole_unet_graph() -> None:
    """ONNX Runtime CPU: stage graphs chained == the unsplit UNet graph (<= 1e-5)."""
    import onnxruntime as ort

    engines = split_engines(2)
    manifest = Manifest.load(engines)
    assert UNET not in manifest.components
    stages = manifest.unet_partition["stages"]
    assert [s["component"] for s in stages] == ["unet_stage0", "unet_stage1"]
    assert all(
        manifest.components[s["component"]].verification["max_rel_error"] < 1e-5 for s in stages
    )
    whole = ort.InferenceSession(
        str(tiny_engines() / "unet.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(2)
    for rows, h, w in ((1, 8, 8), (3, 12, 8), (8, 12, 12)):
        feeds = {
            "sample": rng.standard_normal((rows, 4, h, w), dtype=np.float32),
            "timestep": rng.uniform(0, 999, rows).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((rows, 77, 32), dtype=np.float32),
        }
        (reference,) = whole.run(None, feeds)
        chained = _stage_chain(engines, feeds)
        assert np.abs(chained - reference).max() <= 1e-5 * max(1.0, np.abs(reference).max())


def test_partition_record_in_the_manifest() -> None:
    manifest = Manifest.load(split_engines(2))
    record = manifest.unet_partition
    assert record["kind"] == "pipeline" and len(record["cuts"]) == 1
    plan = UNetPartition.from_dict(record, manifest.dims)
    for stage, comp in zip(record["stages"], plan.components(), strict=True):
        entry = manifest.components[comp.name]
        assert [t["name"] for t in entry.inputs] == comp.input_names == stage["inputs"]
        assert [t["name"] for t in entry.outputs] == comp.output_names == stage["outputs"]
        assert stage["gflop"] > 0
    # ONNX Runtime stage graphs get the fused attention whole graphs get (verified the same way)
    assert (
        sum(manifest.components[c.name].extra.get("fused_attention", 0) for c in plan.components())
        > 0
    )
    flows = {f["name"]: f for f in record["tensors"]}
    assert flows[TIME_EMBEDDING] == {
        "name": TIME_EMBEDDING,
        "from": "unet_stage0",
        "to": ["unet_stage1"],
    }


def test_reexport_reuses_stages_without_loading_torch(monkeypatch) -> None:
    from trt_sd.export.build_context import BuildContext

    engines = split_engines(2)
    before = Manifest.load(engines).raw
    monkeypatch.setattr(BuildContext, "loader", lambda self: pytest.fail("loaded torch"))
    from section_engines import export_sections

    export_sections(engines.name, split_unet=2)
    after = Manifest.load(engines).raw
    assert after["unet_partition"] == before["unet_partition"]
    assert set(after["export"]["reused"]) >= {"unet_stage0", "unet_stage1"}


def _fails(capsys, argv: list[str], needle: str) -> None:
    from trt_sd.runtime.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and needle in err, err


def test_bad_split_requests_are_one_line_errors(capsys, tmp_path) -> None:
    model = str(tiny_model())
    out = ["--out", str(tmp_path / "e"), "--quiet"]
    _fails(capsys, ["export", model, "--split-unet", "1", *out], "from 2 to 13")
    _fails(capsys, ["export", model, "--split-unet", "14", *out], "this UNet has 13 layers")
    _fails(
        capsys, ["export", model, "--split-unet", "2", "--deepcache", *out], "cannot be combined"
    )
    _fails(capsys, ["export", model, "--split-unet", "2", "--precision", "int8", *out], "not int8")
    assert not (tmp_path / "e").exists()
