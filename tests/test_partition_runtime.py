"""The multi-device runtime: stages on (simulated) devices, pipelined micro-batches, the same
images as the unsplit UNet, and one-line errors for impossible device lists."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from runtime_engines import tiny_engines
from section_engines import split_engines

from trt_sd.models import InputError, Manifest
from trt_sd.models.unet_plans import UNetPartition
from trt_sd.runtime import Pipeline
from trt_sd.runtime.multidevice import Device, StagedUNet, parse_devices, stage_devices

STEPS = 4


@pytest.fixture(scope="module")
def plain() -> Pipeline:
    return Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")


@pytest.fixture(scope="module")
def split() -> Pipeline:
    return Pipeline.load(split_engines(2), backend="onnxruntime-cpu", devices="cpu,cpu")


def test_device_specs() -> None:
    assert parse_devices("cuda:0, cuda:1") == [Device("cuda", 0), Device("cuda", 1)]
    assert parse_devices([0, "1"]) == [Device("cuda", 0), Device("cuda", 1)]
    assert parse_devices("cpu,cpu:1") == [Device("cpu"), Device("cpu", 1)]
    assert parse_devices(None) is None
    with pytest.raises(InputError, match="cuda:N, N, cpu, cpu:N"):
        parse_devices("gpu0")
    assert stage_devices(4, 2) == [0, 0, 1, 1] and stage_devices(3, 3) == [0, 1, 2]


@pytest.mark.parametrize("sampler", ["dpm++", "euler_a"])
def test_split_pipeline_makes_the_same_images(plain: Pipeline, split: Pipeline, sampler) -> None:
    """Batch items run as concurrent chains (one per device), CFG halves as micro-batches."""
    for batch in (1, 3):
        a = plain("cat", sampler=sampler, steps=STEPS, seed=5, batch=batch)
        b = split("cat", sampler=sampler, steps=STEPS, seed=5, batch=batch)
        assert b.unet_calls == a.unet_calls == STEPS
        for x, y in zip(a.images, b.images, strict=True):
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    assert "x2 stages on cpu,cpu" in split.backend
    assert set(b.timings) == {"text_encoder", "unet", "vae_decoder", "total"}


def test_stages_on_one_device_run_in_order(plain: Pipeline) -> None:
    inline = Pipeline.load(split_engines(2), backend="onnxruntime-cpu")
    one = Pipeline.load(split_engines(2), backend="onnxruntime-cpu", devices="cpu")
    a = plain("dog", steps=STEPS, seed=1, batch=2).images
    for pipe in (inline, one):
        b = pipe("dog", steps=STEPS, seed=1, batch=2).images
        assert all(np.abs(x.astype(int) - y).max() <= 1 for x, y in zip(a, b, strict=True))


def test_concurrent_requests_share_the_stage_workers(plain: Pipeline, split: Pipeline) -> None:
    expected = {seed: plain("moon", steps=STEPS, seed=seed).images[0] for seed in range(4)}
    got: dict[int, np.ndarray] = {}

    def request(seed: int) -> None:
        got[seed] = split("moon", steps=STEPS, seed=seed).images[0]

    threads = [threading.Thread(target=request, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, image in expected.items():
        assert np.abs(got[seed].astype(int) - image).max() <= 1


class _SlowStage:
    """A fake stage engine: sleeps (releasing the GIL, like a GPU or a one-thread ORT session)
    and records when it ran, so overlap between devices is measurable without CPU noise."""

    def __init__(self, real, seconds: float, log: list) -> None:
        self.real, self.seconds, self.log = real, seconds, log
        self.component, self.kind, self.inputs, self.outputs = (
            real.component,
            "fake",
            real.inputs,
            real.outputs,
        )

    def run(self, feeds, keep_on_device=()):
        start = time.perf_counter()
        time.sleep(self.seconds)
        out = self.real.run(feeds)
        self.log.append((self.component.name, start, time.perf_counter()))
        return out


def test_micro_batches_overlap_across_devices() -> None:
    engines = split_engines(2)
    manifest = Manifest.load(engines)
    real = StagedUNet.load(engines, manifest, "onnxruntime-cpu", None)
    log: list = []
    stages = [_SlowStage(s, 0.1, log) for s in real.stages]
    plan = UNetPartition.from_dict(manifest.unet_partition, manifest.dims)
    two = StagedUNet(plan, stages, [Device("cpu"), Device("cpu")])
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((4, 4, 8, 8), dtype=np.float32),
        "timestep": np.full(4, 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((4, 77, 32), dtype=np.float32),
    }
    reference = real.run(feeds)["model_output"]
    t0 = time.perf_counter()
    out = two.run(feeds, micro_batches=4)["model_output"]
    wall = time.perf_counter() - t0
    assert np.array_equal(out, reference)
    # 4 micro-batches x 2 stages of 0.1 s: 0.8 s one after another, 0.5 s pipelined
    assert wall < 0.7, wall
    stage0 = [(a, b) for name, a, b in log if name == "unet_stage0"]
    stage1 = [(a, b) for name, a, b in log if name == "unet_stage1"]
    assert any(a1 < b0 and a0 < b1 for a0, b0 in stage0 for a1, b1 in stage1)  # overlapped
    two.close()


def test_a_failing_stage_raises_in_the_caller() -> None:
    engines = split_engines(2)
    manifest = Manifest.load(engines)
    real = StagedUNet.load(engines, manifest, "onnxruntime-cpu", None)

    class Broken:
        def __init__(self, stage):
            self.component, self.kind = stage.component, "broken"
            self.inputs, self.outputs = stage.inputs, stage.outputs

        def run(self, feeds, keep_on_device=()):
            raise RuntimeError("stage exploded")

    plan = UNetPartition.from_dict(manifest.unet_partition, manifest.dims)
    unet = StagedUNet(plan, [real.stages[0], Broken(real.stages[1])], [Device("cpu")] * 2)
    feeds = {
        "sample": np.zeros((2, 4, 8, 8), np.float32),
        "timestep": np.zeros(2, np.float32),
        "encoder_hidden_states": np.zeros((2, 77, 32), np.float32),
    }
    with pytest.raises(RuntimeError, match="stage exploded"):
        unet.run(feeds)
    unet.close()


def test_impossible_device_lists() -> None:
    with pytest.raises(InputError, match="list at most 2"):
        Pipeline.load(split_engines(2), devices="cpu,cpu,cpu")
    with pytest.raises(InputError, match="does not exist"):
        Pipeline.load(split_engines(2), devices="cuda:7")
    with pytest.raises(InputError, match="does not exist"):
        Pipeline.load(split_engines(2), devices="cpu:4096")
    with pytest.raises(InputError, match="--split-unet"):
        Pipeline.load(tiny_engines(), devices="cpu,cpu")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    from trt_sd.runtime.cli import main

    code = main(["run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_devices_json_and_errors(capsys, tmp_path: Path) -> None:
    engines = str(split_engines(2))
    common = ["--engines", engines, "--steps", "3", "--quiet", "--backend", "onnxruntime-cpu"]
    code, out, err = _run(
        capsys,
        *common,
        "--devices",
        "cpu,cpu",
        "--batch",
        "2",
        "--json",
        "--out",
        str(tmp_path / "a.png"),
    )
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["unet_calls"] == 3 and summary["timings_s"]["unet"] > 0
    assert "stages on cpu,cpu" in summary["params"]["backend"]
    for argv, needle in (
        (["--devices", "cpu,cpu,cpu"], "list at most 2"),
        (["--devices", "cuda:3"], "does not exist"),
        (["--devices", "cpu,cpu", "--device", "0"], "not both"),
    ):
        code, _, err = _run(capsys, *common, *argv)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert needle in err, err
