"""Long and weighted prompts end to end (runtime/conditioning.py over runtime/prompt_chunks.py).

Ground truths: transformers' CLIP text encoder on each 77-token chunk (the chunked context),
diffusers' plain encoding (``emphasis="none"``), and diffusers' ``StableDiffusionPipeline``
fed our long-prompt embeddings as ``prompt_embeds`` (the UNet path at 231 tokens).
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from runtime_engines import SIZE, tiny_engines, tiny_model
from tiny_pipeline import _WORDS

from trt_sd.models.descriptors import CONTEXT, TEXT_ENCODER
from trt_sd.models.families import PromptRows
from trt_sd.runtime import Pipeline
from trt_sd.runtime.tokenizer import DEFAULT_SPECIALS

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _one_token_words() -> list[str]:
    from trt_sd.runtime.tokenizer import ClipTokenizer

    folder = tiny_model() / "tokenizer"
    tok = ClipTokenizer(folder / "vocab.json", folder / "merges.txt", 77, DEFAULT_SPECIALS)
    return [w for w in _WORDS if len(tok.content_ids([w])[0]) == 1]


#: 200 one-token words: three chunks (75 + 75 + 50)
LONG = " ".join((_one_token_words() * 20)[:200])
NEGATIVE = "painting"
STEPS = 4


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")


def _context(pipe: Pipeline, prompt: str, negative: str = NEGATIVE, **kw) -> np.ndarray:
    rows = PromptRows.for_request([prompt], [negative], True, (SIZE, SIZE), {})
    return np.asarray(pipe.encode_conditioning(rows, **kw)[CONTEXT])


def _clip(ids: np.ndarray) -> np.ndarray:
    """transformers' CLIP text encoder (the checkpoint's own) on (k, 77) ids."""
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(str(tiny_model() / "text_encoder"))
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64)))[0].numpy()


def test_long_prompt_gives_a_231_token_context_of_clip_chunks(pipe) -> None:
    context = _context(pipe, LONG)
    assert context.shape == (2, 231, 32)
    # each 77-token window is CLIP on BOS + 75 tokens + EOS (the negative padded with empties)
    words = pipe.tokenizer.content_ids([LONG])[0]
    assert len(words) == 200
    chunks = [words[:75], words[75:150], words[150:]]
    bos, eos = pipe.tokenizer.bos_id, pipe.tokenizer.eos_id
    ids = np.full((3, 77), eos, np.int32)
    for i, c in enumerate(chunks):
        ids[i, : len(c) + 1] = [bos, *c]
    expected = _clip(ids).reshape(231, -1)
    np.testing.assert_allclose(context[1], expected, atol=1e-5)
    negative = pipe.tokenizer([NEGATIVE, ""])
    neg_expected = _clip(negative[[0, 1, 1]]).reshape(231, -1)
    np.testing.assert_allclose(context[0], neg_expected, atol=1e-5)


def test_plain_prompt_is_bit_identical_to_the_plain_path(pipe) -> None:
    prompt = "a photo of an astronaut riding a horse"
    ours = _context(pipe, prompt)
    ids = pipe.tokenizer([NEGATIVE, prompt])
    direct = pipe.engines[TEXT_ENCODER].run({"input_ids": ids})["text_embeddings"]
    assert ours.shape == (2, 77, 32)
    assert np.array_equal(ours, direct)


def _diffusers_image(embeds: np.ndarray, latents: np.ndarray) -> np.ndarray:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(tiny_model()), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        out = pipe(
            prompt_embeds=torch.from_numpy(embeds[1:]),
            negative_prompt_embeds=torch.from_numpy(embeds[:1]),
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            latents=torch.from_numpy(latents),
            output_type="np",
        )
    return (out.images[0] * 255).round().astype(np.uint8)


def test_long_prompt_image_matches_diffusers_fed_our_embeddings(pipe) -> None:
    latents = np.random.default_rng(3).standard_normal((1, 4, SIZE // 2, SIZE // 2), np.float32)
    ours = pipe(LONG, NEGATIVE, sampler="dpm++", steps=STEPS, latents=latents)
    assert ours.images[0].shape == (SIZE, SIZE, 3)
    theirs = _diffusers_image(_context(pipe, LONG), latents)
    diff = np.abs(ours.images[0].astype(int) - theirs.astype(int))
    assert (diff <= 2).mean() >= 0.99, diff.max()
    # and the tail of the prompt matters: the 77-token truncation is another image
    short = pipe(" ".join(LONG.split()[:75]), NEGATIVE, steps=STEPS, latents=latents)
    assert np.abs(short.images[0].astype(int) - ours.images[0].astype(int)).max() > 2


def test_emphasis_changes_the_image_and_none_is_diffusers_plain_encoding(pipe) -> None:
    weighted = "a photo of a (cat:1.6) on the [moon]"
    literal_ids = pipe.tokenizer([NEGATIVE, weighted])
    assert _context(pipe, weighted, emphasis="none").shape == (2, 77, 32)
    np.testing.assert_allclose(
        _context(pipe, weighted, emphasis="none"), _clip(literal_ids), atol=1e-5
    )
    plain_ids = pipe.tokenizer([NEGATIVE, "a photo of a cat on the moon"])
    ignored = _context(pipe, weighted, emphasis="ignore")
    np.testing.assert_allclose(ignored, _clip(plain_ids), atol=1e-5)
    original = _context(pipe, weighted)
    assert np.abs(original - ignored).max() > 1e-3
    assert not np.allclose(_context(pipe, weighted, emphasis="no_norm"), original)
    kw = {"steps": STEPS, "seed": 5}
    images = {m: pipe(weighted, NEGATIVE, emphasis=m, **kw) for m in ("original", "ignore")}
    assert (
        np.abs(
            images["original"].images[0].astype(int) - images["ignore"].images[0].astype(int)
        ).max()
        > 2
    )
    assert images["ignore"].params["emphasis"] == "ignore"
    assert "emphasis" not in images["original"].params


def test_old_manifest_takes_one_chunk_and_truncates_with_a_warning(tmp_path, caplog) -> None:
    old = tmp_path / "engines"
    shutil.copytree(tiny_engines(), old)
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["components"].values():
        assert entry["shape_range"]["text_length"] == [77, 77, 231]
        del entry["shape_range"]["text_length"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.load(old, backend="onnxruntime-cpu")
    assert pipe.text.max_chunks == 1
    with caplog.at_level(logging.WARNING, logger="trt_sd.runtime"):
        context = _context(pipe, LONG)
    assert context.shape == (2, 77, 32)
    assert "longer than this engine takes" in caplog.text
    first75 = " ".join(LONG.split()[:75])
    assert np.array_equal(context, _context(pipe, first75))


def test_sdxl_long_prompt_matches_diffusers_fed_our_embeddings() -> None:
    from runtime_engines import tiny_sdxl_engines, tiny_sdxl_model

    from trt_sd.models.families.sdxl import TEXT_EMBEDS, TEXT_ENCODER_2

    pipe = Pipeline.load(tiny_sdxl_engines(), backend="onnxruntime-cpu")
    options = pipe.family.check_options({}, SIZE, SIZE)
    rows = PromptRows.for_request([LONG], [NEGATIVE], True, (SIZE, SIZE), options)
    cond = pipe.encode_conditioning(rows)
    assert cond[CONTEXT].shape[:2] == (2, 231)
    # the pooled embedding is bigG's on each prompt's first chunk
    first = pipe.tokenizers[TEXT_ENCODER_2]([NEGATIVE, " ".join(LONG.split()[:75])])
    pooled = pipe.engines[TEXT_ENCODER_2].run({"input_ids": first})[TEXT_EMBEDS]
    np.testing.assert_allclose(cond[TEXT_EMBEDS], pooled, atol=1e-6)
    latents = np.random.default_rng(4).standard_normal((1, 4, SIZE // 2, SIZE // 2), np.float32)
    ours = pipe(LONG, NEGATIVE, sampler="euler", steps=STEPS, latents=latents)
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model()))
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in cond.items()}
    with torch.no_grad():
        out = reference(
            prompt_embeds=t[CONTEXT][1:],
            negative_prompt_embeds=t[CONTEXT][:1],
            pooled_prompt_embeds=t[TEXT_EMBEDS][1:],
            negative_pooled_prompt_embeds=t[TEXT_EMBEDS][:1],
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            latents=torch.from_numpy(latents),
            output_type="np",
        )
    theirs = (out.images[0] * 255).round().astype(np.uint8)
    assert np.abs(ours.images[0].astype(int) - theirs.astype(int)).max() <= 2


def test_batching_engine_never_mixes_context_lengths(pipe) -> None:
    from trt_sd.runtime.serve.engine import BatchingEngine

    requests = [
        {"prompt": LONG, "steps": STEPS, "seed": 1},
        {"prompt": "a cat", "steps": STEPS, "seed": 2},
        {"prompt": "a (dog:1.4)", "steps": STEPS, "seed": 3, "emphasis": "no_norm"},
        {"prompt": " ".join(LONG.split()[:120]), "steps": STEPS, "seed": 4},  # two chunks
    ]
    lengths: list[int] = []
    unet = pipe.engines["unet"]
    original = unet.run

    def spy(feeds, keep_on_device=()):
        lengths.append(np.shape(feeds[CONTEXT])[1])
        return original(feeds, keep_on_device=keep_on_device)

    unet.run = spy
    engine = BatchingEngine(pipe, max_batch=4)
    try:
        tickets = [engine.submit(**r) for r in requests]
        results = [t.future.result(timeout=120) for t in tickets]
    finally:
        engine.close()
        del unet.run
    for request, result in zip(requests, results, strict=True):
        alone = pipe(**request)
        assert np.abs(alone.images[0].astype(int) - result.image.astype(int)).max() <= 1
        assert result.params == alone.params
    assert set(lengths) == {77, 154, 231}
