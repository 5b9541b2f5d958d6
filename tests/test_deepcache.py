"""DeepCache as an engine feature: the full UNet's extra feature output, the shallow UNet that
reads it, the key-call schedules, and generation with every kind of sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from runtime_engines import tiny_engines
from section_engines import deepcache_engines

from trt_sd.models import InputError, Manifest, ModelDims
from trt_sd.models.descriptors import UNET
from trt_sd.models.unet_plans import DeepCachePlan
from trt_sd.models.unet_stages import UNET_SHALLOW, UNetLayout, hidden_name
from trt_sd.runtime import Pipeline
from trt_sd.runtime.deepcache import DeepCacheConfig, DeepCacheState, parse_deepcache


@pytest.fixture(scope="module")
def plain() -> Pipeline:
    return Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")


@pytest.fixture(scope="module")
def cached() -> Pipeline:
    return Pipeline.load(deepcache_engines(0), backend="onnxruntime-cpu")


def test_uniform_and_nonuniform_key_calls() -> None:
    assert DeepCacheConfig(3).key_calls(20) == [0, 3, 6, 9, 12, 15, 18]
    assert DeepCacheConfig(1).key_calls(5) == [0, 1, 2, 3, 4]
    for calls, interval in ((20, 3), (50, 5), (10, 2), (7, 4), (3, 5)):
        keys = DeepCacheConfig(interval, "nonuniform").key_calls(calls)
        assert keys[0] == 0 and keys == sorted(set(keys)) and keys[-1] < calls
        assert len(keys) == -(-calls // interval), (calls, interval, keys)
    keys = DeepCacheConfig(3, "nonuniform").key_calls(50)
    gaps = np.diff(keys)
    assert gaps.min() < 3 < gaps.max()  # denser near the centre, sparser away from it


def test_deepcache_arguments() -> None:
    assert parse_deepcache(None) is None and parse_deepcache(0) is None
    assert parse_deepcache("0") is None
    assert parse_deepcache(3) == DeepCacheConfig(3)
    assert parse_deepcache("4:nonuniform") == DeepCacheConfig(4, "nonuniform")
    assert parse_deepcache({"interval": 2, "center": 0.5}) == DeepCacheConfig(2, center=0.5)
    for bad, needle in ((-1, ">= 1"), ("x", "N or N:"), ("3:sideways", "schedule"), (2.5, "N")):
        with pytest.raises(InputError, match=needle):
            parse_deepcache(bad)


def test_shallow_network_of_a_skip_branch() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_export import SD15_UNET

    layout = UNetLayout.from_unet_config(dict(SD15_UNET), ModelDims())
    shallow0 = DeepCachePlan(layout, 0)
    names = [layout.layers[i].name for i in shallow0.shallow_layers]
    feature = hidden_name("up_3_1_attn")  # what enters the last up layer
    assert names == ["conv_in", "up_3_2", "up_3_2_attn", "conv_out"]
    assert shallow0.feature == feature
    assert shallow0.full().output_names == [*layout.base.output_names, feature]
    assert shallow0.shallow().input_names == [*layout.base.input_names, feature]
    # branch 3: the whole first down block with its downsampler, and the up layers back
    deeper = DeepCachePlan(layout, 3)
    kept = [layout.layers[i].name for i in deeper.shallow_layers]
    assert kept[:6] == [
        "conv_in",
        "down_0_0",
        "down_0_0_attn",
        "down_0_1",
        "down_0_1_attn",
        "down_0_downsample",
    ]
    assert kept[6:] == [
        f"up_{b}_{j}{a}" for b, j in ((2, 2), (3, 0), (3, 1), (3, 2)) for a in ("", "_attn")
    ] + ["conv_out"]
    with pytest.raises(InputError, match=r"0\.\.11"):
        DeepCachePlan(layout, 12)


def test_export_records_both_unets_and_shallow_reproduces_full() -> None:
    import onnxruntime as ort

    engines = deepcache_engines(0)
    manifest = Manifest.load(engines)
    record = manifest.raw["unet_deepcache"]
    plan = DeepCachePlan.from_dict(record, manifest.dims)
    assert record["full"] == UNET and record["shallow"] == UNET_SHALLOW
    full = manifest.components[UNET]
    shallow = manifest.components[UNET_SHALLOW]
    assert [t["name"] for t in full.outputs] == plan.full().output_names
    assert [t["name"] for t in shallow.inputs] == plan.shallow().input_names
    assert shallow.extra["bytes"] < full.extra["bytes"] / 2
    providers = ["CPUExecutionProvider"]
    full_s = ort.InferenceSession(str(engines / full.file), providers=providers)
    shallow_s = ort.InferenceSession(str(engines / shallow.file), providers=providers)
    whole = ort.InferenceSession(str(tiny_engines() / "unet.onnx"), providers=providers)
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, 12, 8), dtype=np.float32),
        "timestep": np.array([10.0, 900.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }
    out, feature = full_s.run(None, feeds)
    (reference,) = whole.run(None, feeds)
    assert np.abs(out - reference).max() <= 1e-5
    (again,) = shallow_s.run(None, {**feeds, plan.feature: feature})
    assert np.abs(again - out).max() <= 1e-5  # fresh feature: shallow == full


def test_without_cache_the_images_are_the_plain_ones(plain: Pipeline, cached: Pipeline) -> None:
    a = plain("cat", steps=6, seed=2, batch=2)
    for deepcache in (None, 1):
        b = cached("cat", steps=6, seed=2, batch=2, deepcache=deepcache)
        for x, y in zip(a.images, b.images, strict=True):
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    assert "deepcache" not in cached("cat", steps=2, seed=2).params


@pytest.mark.parametrize("sampler", ["dpm++", "heun", "pndm", "dpm2", "euler_a", "unipc"])
def test_every_sampler_with_interval_3(plain: Pipeline, cached: Pipeline, sampler) -> None:
    """Heun / DPM2 evaluate the UNet twice per step and PNDM twice at its first timestep: the
    schedule counts model calls, so those run too and spend 1/3 of the calls on the full UNet."""
    a = plain("cat", sampler=sampler, steps=6, seed=4)
    b = cached("cat", sampler=sampler, steps=6, seed=4, deepcache=3)
    info = b.params["deepcache"]
    assert b.unet_calls == a.unet_calls
    assert info["full_calls"] == -(-a.unet_calls // 3)
    assert info["full_calls"] + info["shallow_calls"] == a.unet_calls
    diff = np.abs(a.images[0].astype(float) - b.images[0].astype(float))
    assert 0 < diff.mean() < 16  # an approximation of the same image, not another image


def test_state_runs_the_full_unet_on_key_calls() -> None:
    calls: list[str] = []
    fed: list[int] = []

    class Engine:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, feeds, keep_on_device=()):
            calls.append(self.name)
            if self.name == "shallow":
                fed.append(int(feeds["f"][0]))
                return {"model_output": np.zeros(2)}
            return {"model_output": np.zeros(2), "f": np.full(2, len(calls) - 1)}

    state = DeepCacheState(DeepCacheConfig(3), 7, "f")
    full, shallow = Engine("full"), Engine("shallow")
    for i in range(7):
        state.run(i, {"x": np.zeros(2)}, full, shallow)
    assert calls == ["full", "shallow", "shallow", "full", "shallow", "shallow", "full"]
    assert fed == [0, 0, 3, 3]  # each shallow call reads the latest key call's feature
    # a call with another batch size cannot use the cached feature
    state.run(1, {"x": np.zeros(3)}, full, shallow)
    assert calls[-1] == "full"


def test_default_interval_from_load_and_bad_requests(plain: Pipeline) -> None:
    pipe = Pipeline.load(deepcache_engines(0), backend="onnxruntime-cpu", deepcache="2")
    result = pipe("dog", steps=4, seed=0)
    assert result.params["deepcache"]["full_calls"] == 2
    assert "deepcache" not in pipe("dog", steps=4, seed=0, deepcache=0).params
    with pytest.raises(InputError, match="export --deepcache"):
        plain("dog", steps=2, deepcache=3)
    with pytest.raises(InputError, match="export --deepcache"):
        Pipeline.load(tiny_engines(), deepcache=3)


def test_cli_reports_unet_time_and_refuses_plain_engines(capsys, tmp_path: Path) -> None:
    from trt_sd.runtime.cli import main

    argv = ["run", "--steps", "6", "--quiet", "--backend", "onnxruntime-cpu", "--json"]
    out_png = str(tmp_path / "a.png")
    code = main(
        [*argv, "--engines", str(deepcache_engines(0)), "--deepcache", "3", "--out", out_png]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["unet_calls"] == 6 and summary["timings_s"]["unet"] > 0
    assert summary["params"]["deepcache"] == {
        "interval": 3,
        "schedule": "uniform",
        "full_calls": 2,
        "shallow_calls": 4,
    }
    code = main([*argv, "--engines", str(tiny_engines()), "--deepcache", "3", "--out", out_png])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "export --deepcache" in err
