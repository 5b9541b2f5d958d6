"""The Python API of the lean runtime on a tiny exported pipeline (ONNX Runtime CPU)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from runtime_engines import SIZE, tiny_engines

from trt_sd.models.errors import InputError, NumericalError
from trt_sd.runtime import GenerationResult, Pipeline

STEPS = 4


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")


def test_txt2img_result(pipe: Pipeline) -> None:
    result = pipe("a photo of a cat", sampler="dpm++", steps=STEPS, seed=3, batch=2)
    assert isinstance(result, GenerationResult)
    assert len(result.images) == 2
    for image in result.images:
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert set(result.timings) == {"text_encoder", "unet", "vae_decoder", "total"}
    assert result.timings["total"] >= result.timings["unet"] > 0
    assert result.unet_calls == STEPS
    assert result.params["seeds"] == [3, 4]
    assert result.params["sampler"] == "dpm++" and result.params["steps"] == STEPS
    assert result.params["backend"] == "onnxruntime-cpu"


def test_defaults_come_from_the_manifest(pipe: Pipeline) -> None:
    defaults = pipe.manifest.defaults
    result = pipe(seed=0, steps=1)
    assert result.params["prompt"] == defaults["prompt"]
    assert result.params["height"] == defaults["height"]
    assert result.params["guidance"] == defaults["guidance"]


def test_sizes_follow_latents_and_the_built_range(pipe: Pipeline) -> None:
    latents = np.zeros((1, 4, 12, 8), np.float32)  # 24x16 pixels with the tiny VAE (factor 2)
    assert pipe("cat", steps=1, latents=latents).images[0].shape == (24, 16, 3)
    # the tiny model's native size (16) is inside the built range 16..24; a default outside
    # it falls back to the size the UNet engine is optimised for
    from trt_sd.runtime.request import default_size

    assert default_size(pipe.manifest, "height") == pipe.manifest.defaults["height"]
    raw = pipe.manifest.to_dict()
    raw["defaults"] = {**raw["defaults"], "height": 512}
    from trt_sd.models.manifest import Manifest

    opt = pipe.manifest.components["unet"].shape_range.height.opt
    assert default_size(Manifest.from_dict(raw), "height") == opt


def test_same_seed_same_images_other_seed_other_images(pipe: Pipeline) -> None:
    a = pipe("cat", steps=STEPS, seed=11).images[0]
    b = pipe("cat", steps=STEPS, seed=11).images[0]
    c = pipe("cat", steps=STEPS, seed=12).images[0]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_seed_draws_documented_noise(pipe: Pipeline) -> None:
    """Initial noise of image i is default_rng(seed + i).standard_normal((C, h, w), float32)."""
    shape = (4, SIZE // 2, SIZE // 2)
    noise = np.stack(
        [np.random.default_rng(s).standard_normal(shape, dtype=np.float32) for s in (5, 6)]
    )
    from_seed = pipe("cat", steps=STEPS, seed=5, batch=2).images
    from_latents = pipe("cat", steps=STEPS, seed=99, batch=2, latents=noise).images
    for a, b in zip(from_seed, from_latents, strict=True):
        assert np.array_equal(a, b)


def test_batch_entry_matches_single_run(pipe: Pipeline) -> None:
    """Image i of a batch is reproducible alone with seed + i (also for stochastic samplers)."""
    for sampler in ("dpm++", "euler_a"):
        batch = pipe("dog", sampler=sampler, steps=STEPS, seed=20, batch=3).images
        alone = pipe("dog", sampler=sampler, steps=STEPS, seed=22).images[0]
        assert np.abs(batch[2].astype(int) - alone.astype(int)).max() <= 1, sampler


def test_guidance_one_skips_cfg_and_negative_prompt(pipe: Pipeline) -> None:
    calls: list[int] = []
    unet = pipe.engines["unet"]
    original = unet.run

    def counting_run(feeds, keep_on_device=()):
        calls.append(len(feeds["sample"]))
        return original(feeds, keep_on_device)

    unet.run = counting_run  # type: ignore[method-assign]
    try:
        a = pipe("cat", negative_prompt="dog", guidance=1.0, steps=2, seed=1, batch=2).images
        b = pipe("cat", negative_prompt="moon", guidance=1.0, steps=2, seed=1, batch=2).images
        pipe("cat", guidance=7.5, steps=2, seed=1, batch=2)
    finally:
        del unet.run
    assert calls == [2, 2, 2, 2, 4, 4]  # CFG doubles the rows of one call, not the calls
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_negative_prompt_matters_with_cfg(pipe: Pipeline) -> None:
    a = pipe("cat", negative_prompt="", steps=STEPS, seed=1, guidance=7.5).images[0]
    b = pipe("cat", negative_prompt="seven", steps=STEPS, seed=1, guidance=7.5).images[0]
    assert not np.array_equal(a, b)


def test_every_sampler_runs(pipe: Pipeline) -> None:
    from trt_sd.samplers import SAMPLERS

    names = list(SAMPLERS)
    assert len(names) >= 10
    for name in names:
        result = pipe("cat", sampler=name, steps=3, seed=0)
        assert result.images[0].shape == (SIZE, SIZE, 3), name
        assert result.unet_calls >= 1, name


def test_karras_and_eta_change_the_result(pipe: Pipeline) -> None:
    base = pipe("cat", sampler="dpm++", steps=STEPS, seed=2).images[0]
    karras = pipe("cat", sampler="dpm++", steps=STEPS, seed=2, karras=True)
    assert karras.params["karras"] is True
    assert not np.array_equal(base, karras.images[0])
    ddim = pipe("cat", sampler="ddim", steps=STEPS, seed=2).images[0]
    ddim_eta = pipe("cat", sampler="ddim", steps=STEPS, seed=2, eta=1.0).images[0]
    assert not np.array_equal(ddim, ddim_eta)


def test_concurrent_calls_match_sequential(pipe: Pipeline) -> None:
    seeds = [31, 32, 33, 34]
    sequential = {s: pipe("cat", sampler="euler_a", steps=STEPS, seed=s).images[0] for s in seeds}
    threaded: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            threaded[seed] = pipe("cat", sampler="euler_a", steps=STEPS, seed=seed).images[0]
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in seeds:
        assert np.array_equal(sequential[s], threaded[s]), s


def test_img2img(pipe: Pipeline) -> None:
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    a = pipe("cat", image=image, strength=0.5, sampler="euler", steps=8, seed=4)
    b = pipe("cat", image=image, strength=0.5, sampler="euler", steps=8, seed=4)
    assert a.unet_calls == 4  # int(steps * strength) for a one-call-per-step sampler
    assert "vae_encoder" in a.timings
    assert a.params["strength"] == 0.5
    assert np.array_equal(a.images[0], b.images[0])
    # with little noise the init image decides the result; at full strength it barely matters
    other = np.full_like(image, 40)

    def run(init: np.ndarray, strength: float) -> np.ndarray:
        out = pipe("cat", image=init, strength=strength, sampler="euler", steps=10, seed=4)
        return out.images[0].astype(int)

    weak_gap = np.abs(run(image, 0.2) - run(other, 0.2)).mean()
    strong_gap = np.abs(run(image, 1.0) - run(other, 1.0)).mean()
    assert weak_gap > 2 * strong_gap


def test_img2img_resizes_and_takes_size_from_image(pipe: Pipeline, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (24, 16), (200, 10, 10)).save(tmp_path / "init.png")
    result = pipe("cat", image=tmp_path / "init.png", steps=2, seed=0)
    assert result.images[0].shape == (16, 24, 3)
    resized = pipe("cat", image=tmp_path / "init.png", height=16, width=16, steps=2, seed=0)
    assert resized.images[0].shape == (16, 16, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 20}, "multiple of 8"),
        ({"width": 12}, "multiple of 8"),
        ({"height": 32}, "outside the range"),
        ({"width": 8}, "outside the range"),
        ({"batch": 5}, "outside the range"),
        ({"batch": 0}, "at least 1"),
        ({"steps": 0}, "at least 1"),
        ({"steps": 2.5}, "integer"),
        ({"sampler": "no-such-sampler"}, "no-such-sampler"),
        ({"guidance": float("nan")}, "finite"),
        ({"strength": 0.5}, "img2img"),
        ({"seed": -1}, "seed"),
        ({"latents": np.zeros((1, 4, 4, 4), np.float32), "height": 16, "width": 16}, "shape"),
        ({"latents": np.zeros((1, 4, 4, 4), np.float32)}, "outside the range"),
        ({"latents": np.full((1, 4, 8, 8), np.nan, np.float32)}, "NaN"),
        ({"prompt": ["a", "b"]}, "batch"),
        ({"devices": None, "eta": -1.0}, "eta"),
    ],
)
def test_bad_arguments_raise_input_error(pipe: Pipeline, kwargs: dict, message: str) -> None:
    kwargs.pop("devices", None)
    kwargs.setdefault("prompt", "cat")
    with pytest.raises(InputError, match=message):
        pipe(steps=kwargs.pop("steps", 2), **kwargs)


def test_img2img_bad_strength(pipe: Pipeline) -> None:
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    for strength in (0.0, 1.5):
        with pytest.raises(InputError, match="strength"):
            pipe("cat", image=image, strength=strength, steps=4)
    with pytest.raises(InputError, match="no denoising step"):
        pipe("cat", image=image, strength=0.1, steps=2, sampler="euler")
    with pytest.raises(InputError, match="uint8"):
        pipe("cat", image=np.zeros((SIZE, SIZE), np.float32), steps=2)


def test_empty_prompt_is_allowed_and_overlong_prompt_warns(
    pipe: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    assert pipe("", steps=1, seed=0).images
    with caplog.at_level(logging.WARNING, logger="trt_sd.runtime"):
        pipe(" ".join(["cat"] * 100), steps=1, seed=0)  # two chunks: within the 3 exported
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="trt_sd.runtime"):
        pipe(" ".join(["cat"] * 300), steps=1, seed=0)
    assert "longer than this engine takes" in caplog.text and "dropped" in caplog.text


class _NaNBackend:
    def __init__(self, inner) -> None:
        self.inner, self.kind = inner, inner.kind

    def run(self, feeds, keep_on_device=()):
        out = self.inner.run(feeds, keep_on_device)
        return {k: np.full_like(self.inner.to_host(v), np.nan) for k, v in out.items()}

    def to_host(self, value):
        return np.asarray(value)

    def __getattr__(self, name: str):  # I/O specs etc. of the wrapped engine
        return getattr(self.inner, name)


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
def test_nan_output_names_the_component(component: str) -> None:
    pipe = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    pipe.engines[component] = _NaNBackend(pipe.engines[component])  # type: ignore[assignment]
    with pytest.raises(NumericalError, match=component) as info:
        pipe("cat", steps=2, seed=0)
    if component == "vae_decoder":
        assert "fp32" in str(info.value)


def test_devices_are_validated() -> None:
    with pytest.raises(InputError, match="one GPU id"):
        Pipeline.load(tiny_engines(), devices=[0, 1])
    with pytest.raises(InputError, match="GPU backend"):
        Pipeline.load(tiny_engines(), backend="onnxruntime-cpu", devices=0)
