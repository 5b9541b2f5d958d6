"""ControlNet on SD 1.x: export (ControlNets as components, UNet with residual inputs) and the
runtime against diffusers' ``StableDiffusionControlNetPipeline`` / ``...Img2ImgPipeline`` from
the same latents: one and two ControlNets, scales, start / end windows, per-image control
images, img2img, the batching engine mixing requests with and without control, the CLI and
bad input. Tiny random SD 1.x pipeline with two tiny random ControlNets (tests/
controlnet_engines.py); fp32 ONNX Runtime on the CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from controlnet_engines import controlnet_engines, tiny_controlnets
from runtime_engines import SIZE, tiny_engines, tiny_model

from trt_sd.models.controlnet import MID_RESIDUAL, down_residual_name
from trt_sd.models.errors import InputError
from trt_sd.runtime import Pipeline
from trt_sd.runtime.noise import POSTERIOR_STREAM, initial_noise

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
cn_img2img = pytest.importorskip("diffusers.pipelines.controlnet.pipeline_controlnet_img2img")

PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "painting"
STEPS = 6
GUIDANCE = 7.5


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(controlnet_engines(), backend="onnxruntime-cpu")


@pytest.fixture(scope="module")
def controlnets():
    return [diffusers.ControlNetModel.from_pretrained(str(p)) for p in tiny_controlnets()]


def _control(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _latents(seed: int, batch: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, SIZE // 2, SIZE // 2), np.float32)


def _pil(image):
    from PIL import Image

    if isinstance(image, list):
        return [_pil(i) for i in image]
    return Image.fromarray(image)


def _uint8(images) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def _diff(ours, theirs) -> int:
    return int(np.abs(np.stack(ours).astype(int) - np.asarray(theirs).astype(int)).max())


def test_export_records_controlnets(pipe: Pipeline) -> None:
    manifest = pipe.manifest
    section = manifest.raw["controlnet"]
    assert [m["component"] for m in section["models"]] == ["controlnet_0", "controlnet_1"]
    assert [m["source"] for m in section["models"]] == ["controlnet-0", "controlnet-1"]
    unet_inputs = [t["name"] for t in manifest.components["unet"].inputs]
    # the tiny UNet: conv_in, one resnet per block, one downsampler -> 4 skips, then mid
    residuals = [*(down_residual_name(i) for i in range(4)), MID_RESIDUAL]
    assert unet_inputs == ["sample", "timestep", "encoder_hidden_states", *residuals]
    for name in ("controlnet_0", "controlnet_1"):
        entry = manifest.components[name]
        assert [t["name"] for t in entry.inputs][-1] == "controlnet_cond"
        assert [t["name"] for t in entry.outputs] == residuals
        assert entry.verification["max_rel_error"] < 1e-4
    mid = manifest.components["unet"].inputs[-1]
    assert mid["shape"] == ["unet_batch", 64, "latent_height/2", "latent_width/2"]


@pytest.mark.parametrize(
    ("case", "sampler", "scheduler"),
    [
        ("one-window-per-image", "dpm++", "DPMSolverMultistepScheduler"),
        ("two", "euler", "EulerDiscreteScheduler"),
    ],
)
def test_matches_diffusers(pipe, controlnets, case, sampler, scheduler) -> None:
    """Same latents, same control images -> the same pixels as diffusers (measured 0)."""
    batch = 2
    latents = _latents(1, batch)
    c0, c1, c2 = _control(1), _control(2), _control(3)
    if case == "one":
        ours_kw = {"control_image": [c0, None], "controlnet_scale": 0.8}
        theirs_kw = {"controlnet": controlnets[0], "image": _pil(c0), "scale": 0.8}
    elif case == "one-window-per-image":
        ours_kw = {
            "control_image": [[c0, c2], None],
            "controlnet_scale": 1.3,
            "control_start": 0.2,
            "control_end": 0.7,
        }
        theirs_kw = {
            "controlnet": controlnets[0],
            "image": _pil([c0, c2]),
            "scale": 1.3,
            "start": 0.2,
            "end": 0.7,
        }
    else:
        ours_kw = {
            "control_image": [c0, c1],
            "controlnet_scale": [0.5, 1.2],
            "control_start": [0.0, 0.3],
            "control_end": [0.6, 1.0],
        }
        theirs_kw = {
            "controlnet": controlnets,
            "image": _pil([c0, c1]),
            "scale": [0.5, 1.2],
            "start": [0.0, 0.3],
            "end": [0.6, 1.0],
        }
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        str(tiny_model()),
        controlnet=theirs_kw.pop("controlnet"),
        safety_checker=None,
        requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    with torch.no_grad():
        theirs = ref(
            [PROMPT] * batch,
            negative_prompt=[NEGATIVE] * batch,
            image=theirs_kw["image"],
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=torch.from_numpy(latents),
            output_type="np",
            controlnet_conditioning_scale=theirs_kw["scale"],
            control_guidance_start=theirs_kw.get("start", 0.0),
            control_guidance_end=theirs_kw.get("end", 1.0),
        ).images
    result = pipe(
        [PROMPT] * batch,
        [NEGATIVE] * batch,
        sampler=sampler,
        steps=STEPS,
        guidance=GUIDANCE,
        batch=batch,
        latents=latents,
        **ours_kw,
    )
    assert _diff(result.images, _uint8(theirs)) <= 1
    assert "controlnet_0" in result.timings
    assert result.params["controlnet_scale"] == (
        list(ours_kw["controlnet_scale"])
        if isinstance(ours_kw["controlnet_scale"], list)
        else [ours_kw["controlnet_scale"]] * 2
    )
    # the control changed the image (the residuals are not negligible)
    common = {"sampler": sampler, "steps": STEPS, "guidance": GUIDANCE, "batch": batch}
    plain = pipe([PROMPT] * batch, [NEGATIVE] * batch, latents=latents, **common)
    assert _diff(plain.images, _uint8(theirs)) > 4


def test_without_control_image_is_the_plain_model(pipe: Pipeline) -> None:
    """Zero residuals: the same image as the engines exported without ControlNets."""
    plain = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    kwargs = {"sampler": "euler", "steps": 4, "latents": _latents(2, 1)}
    ours = pipe(PROMPT, NEGATIVE, **kwargs)
    assert "controlnet_0" not in ours.timings
    assert _diff(ours.images, np.stack(plain(PROMPT, NEGATIVE, **kwargs).images)) <= 1
    # a zero scale (or a window that never opens) is the same
    zero = pipe(PROMPT, NEGATIVE, control_image=[_control(1), None], controlnet_scale=0.0, **kwargs)
    assert _diff(zero.images, np.stack(ours.images)) == 0


def test_img2img_matches_diffusers(pipe, controlnets, monkeypatch) -> None:
    """``StableDiffusionControlNetImg2ImgPipeline`` handed our noise and posterior draws."""
    seed, strength = 5, 0.6
    init, control = _control(7), _control(8)

    def noise(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(initial_noise([seed], tuple(shape[1:])))

    def posterior(encoder_output, generator=None, sample_mode="sample"):
        dist = encoder_output.latent_dist
        rng = np.random.default_rng([seed, POSTERIOR_STREAM])
        draw = rng.standard_normal(tuple(dist.mean.shape[1:]), dtype=np.float32)
        return dist.mean + dist.std * torch.from_numpy(draw)[None]

    monkeypatch.setattr(cn_img2img, "randn_tensor", noise)
    monkeypatch.setattr(cn_img2img, "retrieve_latents", posterior)
    ref = diffusers.StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        str(tiny_model()),
        controlnet=controlnets,
        safety_checker=None,
        requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    with torch.no_grad():
        theirs = ref(
            PROMPT,
            negative_prompt=NEGATIVE,
            image=_pil(init),
            control_image=[_pil(control), _pil(_control(9))],
            strength=strength,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            controlnet_conditioning_scale=[0.9, 0.4],
            control_guidance_end=[0.8, 1.0],
            output_type="np",
        ).images
    ours = pipe(
        PROMPT,
        NEGATIVE,
        image=init,
        strength=strength,
        sampler="euler",
        steps=STEPS,
        guidance=GUIDANCE,
        seed=seed,
        control_image=[control, _control(9)],
        controlnet_scale=[0.9, 0.4],
        control_end=[0.8, 1.0],
    )
    assert _diff(ours.images, _uint8(theirs)) <= 1


def test_batching_engine_mixes_control(pipe: Pipeline) -> None:
    """Requests with different control images, scales and windows, and one without any,
    share UNet calls; each image equals ``Pipeline.__call__``'s for the same arguments."""
    from trt_sd.runtime.serve.engine import BatchingEngine

    requests = [
        {"prompt": "a cat", "seed": 1, "control_image": [_control(1), None]},
        {
            "prompt": "a dog",
            "seed": 2,
            "control_image": [_control(2), _control(3)],
            "controlnet_scale": [0.4, 1.5],
            "control_start": 0.3,
        },
        {"prompt": "the moon", "seed": 3},
        {"prompt": "a horse", "seed": 4, "guidance": 1.0, "control_image": [None, _control(4)]},
    ]
    common = {"sampler": "euler", "steps": 5}
    calls = []
    original = pipe.engines["unet"].run

    def spy(feeds, keep_on_device=()):
        calls.append(len(feeds["sample"]))
        return original(feeds, keep_on_device=keep_on_device)

    pipe.engines["unet"].run = spy  # type: ignore[method-assign]
    engine = BatchingEngine(pipe)
    try:
        tickets = [engine.submit(**r, **common) for r in requests]
        results = [t.future.result(timeout=120) for t in tickets]
    finally:
        engine.close()
        pipe.engines["unet"].run = original  # type: ignore[method-assign]
    assert max(calls) > 2  # requests shared UNet calls
    for r, got in zip(requests, results, strict=True):
        want = pipe(**r, **common).images[0]
        assert _diff([got.image], want[None]) == 0, r["prompt"]
    assert results[1].params["control_start"] == [0.3, 0.3]
    assert "controlnet_scale" not in results[2].params


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"control_image": "one"}, "1 control images given for 2 ControlNets"),
        ({"control_image": ["a", "b", "c"]}, "3 control images given for 2 ControlNets"),
        ({"control_image": [np.zeros((24, 16, 3), np.uint8), None]}, "control image is 16x24"),
        (
            {"control_image": [[np.zeros((16, 16, 3), np.uint8)] * 3, None], "batch": 2},
            "3 control images for a batch of 2",
        ),
        ({"controlnet_scale": [1.0, 2.0, 3.0]}, "controlnet_scale: 3 values given"),
        ({"control_start": 0.8, "control_end": 0.5}, "0 <= start < end <= 1"),
        ({"controlnet_scale": float("nan")}, "controlnet_scale must be finite"),
        ({"control_image": [np.zeros((16, 16), np.uint8), None]}, "HxWx3"),
    ],
)
def test_bad_input_is_one_line(pipe, kwargs, message) -> None:
    kwargs = {"control_image": [_control(1), _control(2)], "steps": 1, **kwargs}
    with pytest.raises(InputError, match=message) as info:
        pipe(PROMPT, height=SIZE, width=SIZE, **kwargs)
    assert "\n" not in str(info.value)


def test_control_image_needs_controlnet_engines() -> None:
    plain = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    with pytest.raises(InputError, match="exported with `trt-sd export --controlnet`"):
        plain(PROMPT, steps=1, control_image=_control(1))


def test_export_refusals(tmp_path) -> None:
    """Refused in one line before anything is exported."""
    from trt_sd.export import export_model

    cn = tiny_controlnets()[0]
    for kwargs, message in (
        ({"split_unet": 2}, "cannot be combined with --split-unet"),
        ({"deepcache": 0}, "cannot be combined with --split-unet or --deepcache"),
        ({"controlnet": tmp_path / "missing"}, "does not exist"),
        ({"controlnet": tiny_model() / "unet"}, "is not a ControlNetModel config"),
    ):
        args = {"controlnet": cn, **kwargs}
        with pytest.raises(InputError, match=message):
            export_model(tiny_model(), tmp_path / "out", progress=False, **args)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli(tmp_path, capsys) -> None:
    from PIL import Image

    from trt_sd.runtime.cli import main

    paths = []
    for i, height in ((1, SIZE), (2, SIZE), (3, 24)):
        paths.append(tmp_path / f"c{i}.png")
        Image.fromarray(np.zeros((height, SIZE, 3), np.uint8) + 40 * i).save(paths[-1])
    out = tmp_path / "o.png"
    base = ["run", "--engines", str(controlnet_engines()), "--steps", "2", "--quiet"]
    base += ["--backend", "onnxruntime-cpu", "--out", str(out)]
    images = ["--control-image", str(paths[0]), "--control-image", str(paths[1])]
    code = main([*base, *images, "--control-scale", "0.5", "--control-end", "0.5", "--json"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["params"]["controlnet_scale"] == [0.5, 0.5]
    assert out.is_file()
    for extra, message in (
        (["--control-image", str(paths[0])], "1 control images given for 2 ControlNets"),
        (["--control-image", str(paths[0]), "--control-image", str(paths[2])], "16x24"),
        (["--control-scale", "2"], "--control-scale needs --control-image"),
    ):
        assert main([*base, *extra]) == 2
        stderr = capsys.readouterr().err
        assert stderr.strip().count("\n") == 0 and message in stderr, stderr


def test_single_file_controlnet(tmp_path) -> None:
    """A ``.safetensors`` ControlNet with its ``config.json`` beside it loads the same weights
    as its folder; without the config, or as a pickle, it is refused in one line."""
    import shutil

    from trt_sd.export.controlnet import locate_controlnet

    folder = tiny_controlnets()[0]
    single = tmp_path / "canny.safetensors"
    shutil.copyfile(folder / "diffusion_pytorch_model.safetensors", single)
    with pytest.raises(InputError, match=r"has no config\.json"):
        locate_controlnet(single)
    shutil.copyfile(folder / "config.json", tmp_path / "config.json")
    loaded = locate_controlnet(single).load().state_dict()
    reference = diffusers.ControlNetModel.from_pretrained(str(folder)).state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    (tmp_path / "canny.bin").write_bytes(b"")
    with pytest.raises(InputError, match=r"pass a diffusers ControlNet folder or a \.safetensors"):
        locate_controlnet(tmp_path / "canny.bin")
