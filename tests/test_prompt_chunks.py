"""Long and weighted prompts: WebUI chunking through the runtime tokenizer, and the emphasis
math on a fake text encoder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from tiny_pipeline import write_clip_tokenizer

from trt_sd.models.errors import InputError
from trt_sd.runtime.prompt_chunks import (
    apply_emphasis,
    chunk_prompt,
    encode_long_prompts,
    encode_prompts,
    pooled_first_chunk,
    tokenize_prompts,
)
from trt_sd.runtime.tokenizer import ClipTokenizer

D = 8
FILES = {"vocab": "vocab.json", "merges": "merges.txt"}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    write_clip_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> ClipTokenizer:
    return ClipTokenizer.from_engine_dir(tok_dir, FILES, 77)


@pytest.fixture(scope="module")
def tok_sd2(tok_dir: Path) -> ClipTokenizer:
    """SD 2.x style: the pad token is "!", not the end token."""
    return ClipTokenizer.from_engine_dir(tok_dir, {**FILES, "pad": "!"}, 77)


def one(tok: ClipTokenizer, word: str) -> int:
    (ids,) = tok.content_ids([word])
    assert len(ids) == 1, word
    return ids[0]


def content(tok: ClipTokenizer, row: np.ndarray) -> list[int]:
    """The text tokens of one chunk (between BOS and the first EOS)."""
    ids = row.tolist()
    return ids[1 : ids.index(tok.eos_id, 1)]


@pytest.mark.parametrize(
    "prompt",
    ["a photo of an astronaut riding a horse on the moon", "", "cat: dog, seven!", "x " * 70],
)
def test_short_plain_prompt_gives_the_plain_tokenizer_ids(tok, tok_sd2, prompt: str) -> None:
    for t in (tok, tok_sd2):
        batch = tokenize_prompts(t, [prompt])
        assert batch.ids.shape == (1, 1, 77) and batch.plain
        assert batch.ids[0, 0].tolist() == t([prompt])[0].tolist()


@pytest.mark.parametrize("words,chunks,count", [(1, 1, 1), (75, 1, 75), (76, 2, 76), (151, 3, 151)])
def test_chunk_boundaries(tok, words: int, chunks: int, count: int) -> None:
    cat = one(tok, "cat")
    got = chunk_prompt(tok, "cat " * words)
    assert got.ids.shape == (chunks, 77) and got.token_count == count
    assert (got.ids[:, 0] == tok.bos_id).all() and (got.ids[:, 76] == tok.eos_id).all()
    body = [t for row in got.ids for t in content(tok, row)]
    assert body == [cat] * words
    assert content(tok, got.ids[-1]) == [cat] * (words - 75 * (chunks - 1))


def test_break_starts_a_new_chunk(tok) -> None:
    cat, dog = one(tok, "cat"), one(tok, "dog")
    got = chunk_prompt(tok, "cat BREAK dog")
    assert [content(tok, r) for r in got.ids] == [[cat], [dog]]
    assert [content(tok, r) for r in chunk_prompt(tok, "BREAK cat").ids] == [[], [cat]]
    assert [content(tok, r) for r in chunk_prompt(tok, "cat BREAK").ids] == [[cat]]
    # emphasis "none": the prompt is plain text, BREAK included
    assert chunk_prompt(tok, "cat BREAK dog", emphasis="none").ids.shape == (1, 77)
    # inside brackets the WebUI no longer breaks: the word is encoded, weighted -1.1
    quirk = chunk_prompt(tok, "(cat BREAK dog)")
    assert quirk.ids.shape == (1, 77)
    n = len(tok.content_ids(["BREAK"])[0])  # the word's tokens ("break" is not one here)
    expected = [1.1, *[-1.1] * n, 1.1]
    np.testing.assert_allclose(quirk.weights[0, 1 : n + 3], expected, rtol=1e-6)


def test_comma_backtrack_moves_the_last_phrase(tok) -> None:
    cat, dog, comma = one(tok, "cat"), one(tok, "dog"), one(tok, ",")
    prompt = "cat " * 70 + ", " + "dog " * 10  # the comma is token 71 of the first chunk
    got = chunk_prompt(tok, prompt)
    assert content(tok, got.ids[0]) == [cat] * 70 + [comma]
    assert content(tok, got.ids[1]) == [dog] * 10
    assert got.token_count == 75 + 10  # the WebUI counts a full chunk as 75
    off = chunk_prompt(tok, prompt, comma_backtrack=0)
    assert content(tok, off.ids[0]) == [cat] * 70 + [comma] + [dog] * 4
    far = chunk_prompt(tok, prompt, comma_backtrack=3)  # the comma is 5 tokens back: too far
    assert content(tok, far.ids[1]) == [dog] * 6


def test_weights_follow_the_emphasis(tok) -> None:
    got = chunk_prompt(tok, "a (cat:1.5) [dog] (seven)")
    assert got.ids.shape == (1, 77)
    np.testing.assert_allclose(got.weights[0, :6], [1.0, 1.0, 1.5, 1 / 1.1, 1.1, 1.0], rtol=1e-6)
    assert (got.weights[0, 5:] == 1.0).all() and got.weights.dtype == np.float32
    ignored = tokenize_prompts(tok, ["a (cat:1.5)"], emphasis="none")
    assert ignored.weights[0, 0, 2] == 1.0  # plain text: the brackets are tokens


def test_sd2_pads_after_the_end_token(tok_sd2) -> None:
    got = chunk_prompt(tok_sd2, "cat " * 80)
    assert content(tok_sd2, got.ids[1]) == [one(tok_sd2, "cat")] * 5
    assert got.ids[1, 6] == tok_sd2.eos_id and (got.ids[1, 7:] == tok_sd2.pad_id).all()
    batch = tokenize_prompts(tok_sd2, ["cat " * 80, ""])
    assert batch.ids[1, 1].tolist() == tok_sd2([""])[0].tolist()  # empty-prompt padding


def test_prompt_and_negative_get_the_same_chunk_count(tok) -> None:
    batch = tokenize_prompts(tok, ["", "cat " * 200])
    assert batch.ids.shape == (2, 3, 77) and batch.sequence_length == 231 and not batch.plain
    empty = tok([""])[0].tolist()
    assert all(batch.ids[0, k].tolist() == empty for k in range(3))
    assert (batch.weights[0] == 1.0).all() and batch.token_counts == (0, 200)


def test_max_chunks_truncates_with_a_warning(tok, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="trt_sd.runtime"):
        batch = tokenize_prompts(tok, ["cat " * 300, "dog"], max_chunks=3)
    assert batch.ids.shape == (2, 3, 77)
    assert "longer than this engine takes (3 chunks of 75 tokens)" in caplog.text


def fake_encoder(d: int = D, seed: int = 0):
    """A deterministic stand-in for the text encoder: token + position embeddings, with a
    little mixing across the sequence, so every chunk's output depends on its ids."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((50000, d)).astype(np.float32)
    pos = rng.standard_normal((77, d)).astype(np.float32)
    calls: list[int] = []

    def encode(ids: np.ndarray) -> np.ndarray:
        assert ids.dtype == np.int32 and ids.shape[1:] == (77,)
        calls.append(len(ids))
        h = table[ids] + pos
        return (h + 0.1 * np.cumsum(h, axis=1) / 77).astype(np.float32)

    encode.calls = calls  # type: ignore[attr-defined]
    return encode


def webui_original(z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sd_emphasis.EmphasisOriginal for one prompt's chunk, in float64."""
    z = z.astype(np.float64)
    weighted = z * w.astype(np.float64)[:, None]
    return weighted * (z.mean() / weighted.mean())


def test_emphasis_math_on_a_fake_encoder(tok) -> None:
    encode = fake_encoder()
    batch = tokenize_prompts(tok, ["a (cat:1.5) [dog] seven", "cat dog seven"])
    out = encode_prompts(encode, batch)
    raw = encode(batch.ids.reshape(-1, 77)).reshape(2, 77, D)
    assert out.shape == (2, 77, D) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], webui_original(raw[0], batch.weights[0, 0]), rtol=2e-6)
    assert np.isclose(out[0].mean(), raw[0].mean(), rtol=1e-5)  # the mean is restored
    assert np.array_equal(out[1], raw[1])  # no emphasis: untouched, bit for bit
    no_norm = encode_prompts(encode, batch, emphasis="no_norm")
    np.testing.assert_allclose(no_norm[0], raw[0] * batch.weights[0, 0][:, None], rtol=1e-6)
    assert np.array_equal(encode_prompts(encode, batch, emphasis="ignore"), raw)


def test_emphasis_is_per_prompt_and_chunk() -> None:
    """A prompt's conditioning does not depend on the others in the batch (the WebUI's
    batch-wide mean would); each chunk keeps its own mean."""
    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((2, 3, 77, D)).astype(np.float32) + 0.3
    weights = np.ones((2, 3, 77), np.float32)
    weights[0, 1, 5:9] = 1.4
    alone = apply_emphasis(hidden[:1], weights[:1])
    both = apply_emphasis(hidden, weights)
    assert np.array_equal(both[:1], alone) and np.array_equal(both[1], hidden[1])
    assert np.array_equal(both[0, 0], hidden[0, 0])
    np.testing.assert_allclose(both[0, 1].mean(), hidden[0, 1].mean(), rtol=1e-5)
    half = apply_emphasis(hidden.astype(np.float16), weights)
    assert half.dtype == np.float16


def test_two_hundred_token_prompt_end_to_end(tok) -> None:
    """~200 tokens with emphasis, commas and a BREAK through the runtime tokenizer, the
    chunker and a fake encoder; prompt and negative prompt come out the same length."""
    words = "a photo of an astronaut riding a horse on the moon, (handwritten digit seven:1.3), "
    prompt = words * 9 + "BREAK [painting] of a cat and a dog"
    negative = "painting, zero"
    encode = fake_encoder()
    hidden = encode_long_prompts(encode, tok, [negative, prompt], max_rows=2)
    assert encode.calls == [2, 2, 2, 2]  # 2 rows x 4 chunks, in calls of at most 2
    batch = tokenize_prompts(tok, [negative, prompt])
    assert batch.token_counts[1] > 190 and batch.chunks == 4
    assert hidden.shape == (2, 4 * 77, D)
    # every text token survives, in order, across the chunks
    plain = prompt.replace("(", "").replace(":1.3)", "").replace("[", "").replace("]", "")
    expected = tok.content_ids([plain.replace(" BREAK ", " ")])[0]
    got = [t for row in batch.ids[1] for t in content(tok, row)]
    assert got == expected
    # the BREAK starts the last chunk; the negative prompt is padded with empty chunks
    assert content(tok, batch.ids[1, 3])[:2] == tok.content_ids(["painting of"])[0]
    assert batch.weights[1, 3, 1] == pytest.approx(1 / 1.1)
    raw = encode(batch.ids.reshape(-1, 77)).reshape(2, 4 * 77, D)
    np.testing.assert_array_equal(hidden[0], raw[0])  # no emphasis in the negative
    for k in range(4):
        window = slice(77 * k, 77 * (k + 1))
        ref = webui_original(raw[1, window], batch.weights[1, k])
        np.testing.assert_allclose(hidden[1, window], ref, rtol=2e-6, atol=1e-6)


def test_pooled_output_of_the_first_chunk(tok) -> None:
    batch = tokenize_prompts(tok, ["cat " * 100, "dog"])
    pooled = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)  # rows x chunks = 4
    np.testing.assert_array_equal(pooled_first_chunk(pooled, batch), pooled[[0, 2]])
    with pytest.raises(ValueError, match="pooled has 2 rows; the batch has 4 chunks"):
        pooled_first_chunk(pooled[:2], batch)


def test_bad_input(tok) -> None:
    with pytest.raises(InputError, match="emphasis='strong' is not known"):
        chunk_prompt(tok, "cat", emphasis="strong")
    with pytest.raises(InputError, match="comma_backtrack"):
        chunk_prompt(tok, "cat", comma_backtrack=1.5)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="no prompts"):
        tokenize_prompts(tok, [])
    with pytest.raises(InputError, match="prompt weight"):
        tokenize_prompts(tok, ["(cat:1..2.)"])
    batch = tokenize_prompts(tok, ["cat"])
    with pytest.raises(ValueError, match="text encoder returned shape"):
        encode_prompts(lambda ids: np.zeros((len(ids), 76, D), np.float32), batch)
    with pytest.raises(InputError, match="max_rows"):
        encode_prompts(fake_encoder(), batch, max_rows=0)


def test_with_the_runtime_text_encoder_engine() -> None:
    """Wired to a real exported text encoder (ONNX Runtime): a plain short prompt gives
    exactly the pipeline's text step's embeddings; a ~200-token one comes out 3 x 77 long,
    encoded in calls no larger than the engine's batch range."""
    pytest.importorskip("torch")
    from runtime_engines import tiny_engines

    from trt_sd.models.descriptors import CONTEXT
    from trt_sd.models.families import PromptRows
    from trt_sd.runtime import Pipeline

    pipe = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    engine, spec = pipe.engines["text_encoder"], pipe.components["text_encoder"]
    entry = pipe.manifest.components["text_encoder"]
    max_rows = entry.shape_range.axis("unet_batch").max  # the engine's batch range

    def encode(ids: np.ndarray) -> np.ndarray:
        assert len(ids) <= max_rows
        out = engine.run({spec.inputs[0].name: ids})[spec.outputs[0].name]
        return engine.to_host(out)

    def encode_text(texts: list[str]) -> np.ndarray:  # the pipeline's own text step
        rows = PromptRows.for_request(texts, [], False, (16, 16), {})
        return np.asarray(pipe.encode_conditioning(rows)[CONTEXT])

    short = ["painting", "a photo of an astronaut riding a horse on the moon"]
    got = encode_long_prompts(encode, pipe.tokenizer, short)
    np.testing.assert_array_equal(got, encode_text(short))
    long = "a photo of an astronaut riding a horse on the moon, (seven:1.2), " * 12
    hidden = encode_long_prompts(encode, pipe.tokenizer, ["", long] * 2, max_rows=max_rows)
    assert hidden.shape == (4, 3 * 77, got.shape[-1]) and np.isfinite(hidden).all()
    empty = encode_text([""])[0]
    for k in range(3):  # the empty prompt, padded with empty-prompt chunks
        np.testing.assert_array_equal(hidden[0, 77 * k : 77 * (k + 1)], empty)
