"""LCM-distilled UNets (``time_cond_proj_dim`` in the UNet config): the guidance scale is a UNet
input (``timestep_cond``, diffusers' ``get_guidance_scale_embedding`` of ``guidance - 1``,
computed in NumPy), and no unconditional rows run. Compared with diffusers'
``LatentConsistencyModelPipeline`` on a tiny UNet with ``time_cond_proj_dim``, same latents
and the same per-step noise (its ``randn_tensor`` handed our draws)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from runtime_engines import SIZE
from test_pipeline_parity import PROMPT, _assert_close, _latents
from tiny_pipeline import make_tiny_pipeline

from trt_sd.export import export_model
from trt_sd.runtime import Pipeline
from trt_sd.runtime.guidance_embedding import guidance_embedding
from trt_sd.runtime.noise import sampler_noise_fn

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

COND_DIM = 32
SEED = 3


@pytest.fixture(scope="module")
def lcm_model(tmp_path_factory) -> Path:
    """The tiny SD pipeline with its UNet replaced by one with ``time_cond_proj_dim``."""
    folder = make_tiny_pipeline(tmp_path_factory.mktemp("lcm") / "model", seed=4)
    config = dict(diffusers.UNet2DConditionModel.load_config(folder / "unet"))
    torch.manual_seed(4)
    unet = diffusers.UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": COND_DIM})
    unet.eval().save_pretrained(folder / "unet")
    return folder


@pytest.fixture(scope="module")
def pipe(lcm_model: Path, tmp_path_factory) -> Pipeline:
    out = tmp_path_factory.mktemp("lcm") / "engines"
    export_model(lcm_model, out, height=SIZE, width=SIZE, batch="1:2", progress=False)
    return Pipeline.load(out, backend="onnxruntime-cpu")


def test_embedding_is_diffusers() -> None:
    """Equal up to float32 rounding: the angles reach 1000 * w (7500 rad at guidance 8.5), so
    a 1-ulp difference between NumPy's and torch's ``exp`` moves a sine by up to ~1e-4."""
    ref = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding
    for dim in (COND_DIM, 33, 256):
        w = torch.tensor([0.0, 2.5, 7.5])
        want = ref(None, w, embedding_dim=dim).numpy()
        np.testing.assert_allclose(guidance_embedding([1.0, 3.5, 8.5], dim), want, atol=5e-4)


def test_descriptor_and_no_cfg_rows(pipe: Pipeline) -> None:
    unet = pipe.manifest.components["unet"]
    spec = {t["name"]: t for t in unet.inputs}
    assert spec["timestep_cond"]["shape"][1] == COND_DIM
    assert pipe.manifest.dims.time_cond_proj_dim == COND_DIM
    calls: list[int] = []
    engine = pipe.engines["unet"]
    original = engine.run

    def counting(feeds, keep_on_device=()):
        calls.append(len(feeds["sample"]))
        assert feeds["timestep_cond"].shape == (len(feeds["sample"]), COND_DIM)
        return original(feeds, keep_on_device)

    engine.run = counting  # type: ignore[method-assign]
    try:
        result = pipe(PROMPT, "a negative prompt", sampler="lcm", steps=3, guidance=8.5, seed=1)
    finally:
        del engine.run
    assert calls == [1, 1, 1] and result.params["guidance"] == 8.5  # one row: no CFG batch


@pytest.mark.parametrize("guidance", [8.5])
def test_matches_latent_consistency_pipeline(pipe, lcm_model, guidance, monkeypatch) -> None:
    latents = _latents(SEED, 2)
    ours = pipe(PROMPT, sampler="LCM", steps=4, guidance=guidance, seed=SEED, batch=2,
                latents=latents)  # fmt: skip
    draw = sampler_noise_fn([SEED, SEED + 1])
    monkeypatch.setattr(
        "diffusers.schedulers.scheduling_lcm.randn_tensor",
        lambda shape, **kw: torch.from_numpy(draw(tuple(shape))),
    )
    base = diffusers.StableDiffusionPipeline.from_pretrained(
        str(lcm_model), safety_checker=None, requires_safety_checker=False
    )
    ref = diffusers.LatentConsistencyModelPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=diffusers.LCMScheduler.from_config(base.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = ref([PROMPT] * 2, height=SIZE, width=SIZE, num_inference_steps=4,
                  guidance_scale=guidance, latents=torch.from_numpy(latents),
                  output_type="np")  # fmt: skip
    theirs = (out.images * 255).round().astype(np.uint8)
    _assert_close(np.stack(ours.images), theirs)
    other = pipe(PROMPT, sampler="LCM", steps=4, guidance=guidance + 3, seed=SEED, batch=2,
                 latents=latents)  # fmt: skip
    assert np.abs(np.stack(other.images).astype(int) - theirs).max() > 2  # guidance matters


@pytest.mark.parametrize(
    ("options", "flag"),
    [({"precision": "int8"}, "--precision int8"), ({"split_unet": 2}, "--split-unet"),
     ({"deepcache": 0}, "--deepcache")],
)  # fmt: skip
def test_unsupported_export_features_say_so(lcm_model, tmp_path, options, flag) -> None:
    from trt_sd.models.errors import InputError

    with pytest.raises(InputError, match=f"^{flag} is not available for LCM-distilled UNets yet$"):
        export_model(lcm_model, tmp_path / "e", progress=False, **options)


def test_batching_engine_embeds_each_request_guidance(pipe) -> None:
    """Requests with different guidance share UNet calls; each row gets its own embedding."""
    from trt_sd.runtime.serve.engine import BatchingEngine

    engine = BatchingEngine(pipe, max_batch=2)
    requests = [
        {"prompt": PROMPT, "sampler": "lcm", "steps": 3, "guidance": 8.5, "seed": 1},
        {"prompt": "a cat", "sampler": "lcm", "steps": 3, "guidance": 3.0, "seed": 2},
    ]
    try:
        results = [t.future.result(timeout=300) for t in [engine.submit(**r) for r in requests]]
    finally:
        engine.close()
    for r, got in zip(requests, results, strict=True):
        alone = pipe(**r)
        assert int(np.abs(got.image.astype(int) - alone.images[0].astype(int)).max()) <= 1
