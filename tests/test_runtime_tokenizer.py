"""The runtime's CLIP tokenizer gives transformers' CLIPTokenizer ids (transformers: test-only)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from tiny_pipeline import write_clip_tokenizer

from trt_sd.models.errors import ManifestError
from trt_sd.runtime.tokenizer import ClipTokenizer

PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "",
    "   ",
    "  Multiple   spaces\tand\nnewlines  ",
    "CASING MiXeD Astronaut",
    "Héllo wörld café naïve façade",
    "emoji 🚀🔥 and ❤️ hearts",
    "Punctuation!!! ...?? (a), [b]; {c}: 'quoted' \"double\"",
    "cat's dog'll they're I'm we've you'd don't",
    "digits 12345 and 3.14159",
    "日本語のテキスト 中文",
    "ligatures ﬁ and combining Å Å",
    "a <|endoftext|> inside and <|startoftext|>",
    "tabs\tand\r\nwindows line ends",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    write_clip_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def ours(tokenizer_dir: Path) -> ClipTokenizer:
    return ClipTokenizer.from_engine_dir(
        tokenizer_dir, {"vocab": "vocab.json", "merges": "merges.txt"}, 77
    )


@pytest.fixture(scope="module")
def reference(tokenizer_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir))


def _reference_ids(reference, prompts: list[str]) -> np.ndarray:
    enc = reference(prompts, padding="max_length", max_length=77, truncation=True)
    return np.asarray(enc.input_ids)


def test_ids_match_transformers(ours: ClipTokenizer, reference) -> None:
    got = ours(PROMPTS)
    want = _reference_ids(reference, PROMPTS)
    assert got.dtype == np.int32 and got.shape == (len(PROMPTS), 77)
    for prompt, g, w in zip(PROMPTS, got, want, strict=True):
        assert g.tolist() == w.tolist(), prompt


def test_structure(ours: ClipTokenizer) -> None:
    empty, word = ours(["", "seven"])
    assert empty[0] == ours.bos_id and empty[1] == ours.eos_id
    assert (empty[2:] == ours.pad_id).all()
    assert word[0] == ours.bos_id and word[2] == ours.eos_id  # "seven" is one merged token


def test_overlong_prompt_truncates_keeping_eos_and_warns(
    ours: ClipTokenizer, reference, caplog: pytest.LogCaptureFixture
) -> None:
    prompt = " ".join(["seven", "cat", "moon!"] * 40)
    with caplog.at_level(logging.WARNING, logger="trt_sd.runtime"):
        got = ours([prompt])
    assert got[0].tolist() == _reference_ids(reference, [prompt])[0].tolist()
    assert got[0, -1] == ours.eos_id
    assert "truncated" in caplog.text and "77 tokens" in caplog.text
    assert "moon" in caplog.text  # names the dropped text, like diffusers


def test_no_warning_at_exactly_max_length(ours: ClipTokenizer, caplog) -> None:
    prompt = " ".join(["seven"] * 75)  # 75 tokens + bos + eos = 77
    with caplog.at_level(logging.WARNING, logger="trt_sd.runtime"):
        ids = ours([prompt])
    assert not caplog.records
    assert ids[0, -1] == ours.eos_id


def test_custom_pad_token(tokenizer_dir: Path) -> None:
    """SD 2.x tokenizers pad with "!" rather than the end token."""
    tok = ClipTokenizer.from_engine_dir(
        tokenizer_dir, {"vocab": "vocab.json", "merges": "merges.txt", "pad": "!"}, 77
    )
    ids = tok(["cat"])[0]
    assert ids[-1] == tok.pad_id != tok.eos_id


def test_missing_or_corrupt_files(tmp_path: Path, tokenizer_dir: Path) -> None:
    settings = {"vocab": "vocab.json", "merges": "merges.txt"}
    with pytest.raises(ManifestError, match="missing"):
        ClipTokenizer.from_engine_dir(tmp_path, settings, 77)
    (tmp_path / "vocab.json").write_text("{not json", "utf-8")
    (tmp_path / "merges.txt").write_text((tokenizer_dir / "merges.txt").read_text("utf-8"))
    with pytest.raises(ManifestError, match="corrupt"):
        ClipTokenizer.from_engine_dir(tmp_path, settings, 77)
    with pytest.raises(ManifestError, match="lacks"):
        ClipTokenizer.from_engine_dir(tokenizer_dir, {"vocab": "vocab.json"}, 77)
