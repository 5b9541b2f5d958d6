"""SDXL base end to end: export a tiny random SDXL pipeline, then the runtime, the batching
engine and the CLI against diffusers' ``StableDiffusionXLPipeline`` from the same latents.

One deliberate difference: with ``batch > 1`` *and* negative micro-conditioning that differs
from the positive one, diffusers pairs its time ids ``[neg, pos]`` repeated per image while its
embeddings are ``[neg..., pos...]`` (so image 2's negative row gets the positive time ids).
We give every row its own request's ids; the negative-size case is compared at batch 1, where
both agree.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from runtime_engines import SIZE, tiny_engines, tiny_sdxl_engines, tiny_sdxl_model

from trt_sd.models.errors import InputError, ManifestError
from trt_sd.runtime import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT = "a photo of an astronaut riding a horse on the moon"
STEPS = 6
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(tiny_sdxl_engines(), backend="onnxruntime-cpu")


@pytest.fixture(scope="module")
def reference():
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(seed: int, batch: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, SIZE // 2, SIZE // 2), np.float32)


def _theirs(reference, latents, negative, scheduler="EulerDiscreteScheduler", **kwargs):
    reference.scheduler = getattr(diffusers, scheduler).from_config(reference.scheduler.config)
    with torch.no_grad():
        out = reference(
            [PROMPT] * len(latents),
            negative_prompt=negative,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=torch.from_numpy(latents),
            output_type="np",
            **kwargs,
        )
    return (out.images * 255).round().astype(np.uint8)


def _max_diff(ours, theirs) -> int:
    return int(np.abs(np.stack(ours).astype(int) - theirs.astype(int)).max())


def test_export_writes_both_text_encoders_and_the_family(pipe: Pipeline) -> None:
    manifest = pipe.manifest
    assert manifest.model["family"] == "sdxl" and manifest.family.name == "sdxl"
    assert set(manifest.components) == {
        "text_encoder",
        "text_encoder_2",
        "unet",
        "vae_decoder",
        "vae_encoder",
    }
    assert manifest.raw["family_config"] == {"force_zeros_for_empty_prompt": True}
    assert manifest.raw["tokenizer_2"]["pad"] == "!"  # bigG's pad token, not CLIP-L's
    unet = manifest.components["unet"]
    assert [t["name"] for t in unet.inputs] == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
    ]
    assert unet.inputs[2]["shape"] == ["unet_batch", "text_length", 32 + 48]  # CLIP-L + bigG
    te2 = manifest.components["text_encoder_2"]
    assert [t["name"] for t in te2.outputs] == ["text_embeddings", "text_embeds"]
    for entry in manifest.components.values():
        assert entry.precision == "fp32"
        assert entry.verification["max_rel_error"] < 1e-5


@pytest.mark.parametrize(
    ("negative", "diffusers_negative", "sampler", "scheduler"),
    [
        ("", None, "euler", "EulerDiscreteScheduler"),  # force_zeros_for_empty_prompt
        ("painting", "painting", "euler", "EulerDiscreteScheduler"),
        ("painting", "painting", "dpm++", "DPMSolverMultistepScheduler"),
    ],
)
def test_matches_diffusers(pipe, reference, negative, diffusers_negative, sampler, scheduler):
    latents = _latents(0, 2)
    ours = pipe(
        PROMPT, negative, sampler=sampler, steps=STEPS, guidance=GUIDANCE, batch=2, latents=latents
    ).images
    theirs_negative = None if diffusers_negative is None else [diffusers_negative] * 2
    theirs = _theirs(reference, latents, theirs_negative, scheduler)
    assert _max_diff(ours, theirs) <= 1


def test_zeroed_negative_is_not_the_empty_text(pipe, reference) -> None:
    """The criterion has teeth: encoding "" instead of zeros changes the image."""
    latents = _latents(1, 1)
    ours = pipe(PROMPT, "", sampler="euler", steps=STEPS, guidance=GUIDANCE, latents=latents)
    assert _max_diff(ours.images, _theirs(reference, latents, None)) <= 1
    assert _max_diff(ours.images, _theirs(reference, latents, "")) > 2


def test_micro_conditioning_matches_diffusers(pipe, reference) -> None:
    latents = _latents(2, 2)
    sizes = {"original_size": (32, 24), "crops_coords_top_left": (4, 2), "target_size": (16, 16)}
    common = {"sampler": "euler", "steps": STEPS, "guidance": GUIDANCE, "batch": 2}
    ours = pipe(PROMPT, "", latents=latents, **common, **sizes)
    assert _max_diff(ours.images, _theirs(reference, latents, None, **sizes)) <= 1
    assert ours.params["original_size"] == [32, 24]
    plain = pipe(PROMPT, "", latents=latents, **common)
    assert _max_diff(ours.images, np.stack(plain.images)) > 2  # the sizes reach the UNet
    one = latents[:1]
    negative = {"negative_original_size": (8, 8), "negative_target_size": (24, 16)}
    ours = pipe(
        PROMPT, "dog", sampler="euler", steps=STEPS, guidance=GUIDANCE, latents=one, **negative
    )
    assert _max_diff(ours.images, _theirs(reference, one, "dog", **negative)) <= 1


def test_family_options_are_checked(pipe) -> None:
    with pytest.raises(InputError, match="original_size must be two integers"):
        pipe(PROMPT, steps=1, original_size=(1, 2, 3))
    with pytest.raises(InputError, match="SDXL models take no option aesthetic_score"):
        pipe(PROMPT, steps=1, aesthetic_score=6.0)
    sd = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    with pytest.raises(
        InputError, match=r"SD 1.x models take no option original_size \(family options: none\)"
    ):
        sd(PROMPT, steps=1, original_size=(16, 16))


def test_batching_engine_serves_sdxl(pipe) -> None:
    from trt_sd.runtime.serve.engine import BatchingEngine

    engine = BatchingEngine(pipe, max_batch=2)
    try:
        requests = [
            {"prompt": PROMPT, "sampler": "euler", "steps": 3, "seed": 1},
            {
                "prompt": "a cat",
                "negative_prompt": "dog",
                "sampler": "dpm++",
                "steps": 4,
                "seed": 2,
            },
            {"prompt": "the moon", "steps": 3, "seed": 3, "original_size": (24, 24)},
        ]
        tickets = [engine.submit(**r) for r in requests]
        results = [t.future.result(timeout=300) for t in tickets]
    finally:
        engine.close()
    for r, got in zip(requests, results, strict=True):
        alone = pipe(**r)
        assert int(np.abs(got.image.astype(int) - alone.images[0].astype(int)).max()) <= 1
    assert results[2].params["original_size"] == [24, 24]


def test_cli_runs_an_sdxl_engine_dir(tmp_path, capsys) -> None:
    from trt_sd.runtime.cli import main

    out = tmp_path / "x.png"
    argv = ["run", "--engines", str(tiny_sdxl_engines()), "--prompt", "a cat", "--steps", "2"]
    code = main([*argv, "--out", str(out), "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert set(summary["timings_s"]) >= {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
    assert out.is_file()


def test_unknown_family_in_a_manifest_is_refused(tmp_path) -> None:
    engines = tmp_path / "engines"
    shutil.copytree(tiny_sdxl_engines(), engines)
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["model"]["family"] = "flux"
    (engines / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ManifestError,
        match=r"family 'flux' is not one this trt-sd serves \(SD 1.x, SD 2.x, SDXL, SDXL refiner\)",
    ):
        Pipeline.load(engines, backend="onnxruntime-cpu")


def test_split_unet_and_deepcache_on_sdxl(pipe, tmp_path) -> None:
    """The layer list models SDXL's added conditioning (text_embeds + time_ids join the time
    embedding in conv_in): stages and DeepCache's full UNet compute what the whole UNet does."""
    from trt_sd.export import export_model

    common = {"height": "16:24", "width": "16:24", "batch": "1:2", "progress": False}
    export_model(tiny_sdxl_model(), tmp_path / "split", split_unet=2, **common)
    export_model(tiny_sdxl_model(), tmp_path / "dc", deepcache=0, **common)
    latents = _latents(3, 2)
    kw = {"sampler": "euler", "steps": 4, "guidance": GUIDANCE, "batch": 2, "latents": latents}
    kw["original_size"] = (24, 24)
    whole = pipe(PROMPT, "dog", **kw).images
    split = Pipeline.load(tmp_path / "split", backend="onnxruntime-cpu", devices="cpu,cpu")
    assert split.manifest.unet_partition is not None
    stage0 = split.manifest.components["unet_stage0"]
    assert {"text_embeds", "time_ids"} <= {t["name"] for t in stage0.inputs}
    assert _max_diff(split(PROMPT, "dog", **kw).images, np.stack(whole)) <= 1
    dc = Pipeline.load(tmp_path / "dc", backend="onnxruntime-cpu")
    assert _max_diff(dc(PROMPT, "dog", deepcache=1, **kw).images, np.stack(whole)) <= 1
    cached = dc(PROMPT, "dog", deepcache=2, **kw)
    assert cached.params["deepcache"]["shallow_calls"] == 2


def test_fp16_engines_give_fp16_outputs_and_an_image(tmp_path) -> None:
    """fp16 text encoders return fp16 hidden states as their descriptors say (the penultimate
    CLIP state came out fp32, so the UNet got a float32 context it does not take)."""
    import onnx

    from trt_sd.export import export_model

    out = tmp_path / "fp16"
    manifest = export_model(tiny_sdxl_model(), out, precision="fp16", batch="1:2", progress=False)
    for name in ("text_encoder", "text_encoder_2", "unet"):
        graph = onnx.load(out / manifest.components[name].file, load_external_data=False).graph
        assert {o.type.tensor_type.elem_type for o in graph.output} == {onnx.TensorProto.FLOAT16}
    image = Pipeline.load(out, backend="onnxruntime-cpu")("a cat", steps=2, seed=1).images[0]
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0
