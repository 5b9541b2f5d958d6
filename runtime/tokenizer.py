"""CLIP tokenizer built from the engine directory's ``vocab.json`` / ``merges.txt``.

The ``tokenizers`` library (Rust, no torch) is configured exactly as transformers'
``CLIPTokenizer`` configures it, so the ids match transformers for every prompt:

* normalizer: NFC, runs of whitespace -> one space, lowercase;
* pre-tokenizer: CLIP's regex (contractions, letter runs, single digits, punctuation runs),
  then byte-level mapping;
* BPE with the ``</w>`` end-of-word suffix and no continuing-subword prefix;
* ``<|startoftext|>`` ... ``<|endoftext|>`` around the text, truncated to ``max_length`` keeping
  the end token, padded to ``max_length`` with the pad token (``<|endoftext|>`` for SD 1.x,
  ``!`` for SD 2.x).

Truncation logs a warning naming the dropped text, as diffusers does. The special tokens are
registered as added tokens, so a literal ``<|endoftext|>`` in a prompt maps to its id as in
transformers. Encoding holds no per-call state, so one instance serves concurrent threads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trt_sd.models.errors import ManifestError

logger = logging.getLogger("trt_sd.runtime")

CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
    r"""|[^\s\p{L}\p{N}]+"""
)
END_OF_WORD = "</w>"
DEFAULT_SPECIALS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


def _special_tokens(folder: Path, settings: dict[str, Any]) -> dict[str, str]:
    """bos/eos/unk/pad: the manifest's settings (``bos`` or ``bos_token``, ...), else the
    folder's special_tokens_map.json / tokenizer_config.json, else CLIP's defaults."""
    found = dict(DEFAULT_SPECIALS)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text("utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ManifestError(f"tokenizer file {path} is not readable JSON: {e}") from None
            for key in DEFAULT_SPECIALS:
                value = data.get(key)
                if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
                    value = value.get("content")
                if isinstance(value, str):
                    found[key] = value
    for key in DEFAULT_SPECIALS:  # the manifest writes "bos" / "eos" / ...; accept both
        for name in (key, key.removesuffix("_token")):
            if isinstance(settings.get(name), str):
                found[key] = settings[name]
    return found


class ClipTokenizer:
    """Prompt text -> fixed-length int32 token ids for the text encoder."""

    def __init__(
        self, vocab_path: Path, merges_path: Path, max_length: int, specials: dict[str, str]
    ):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise ManifestError(f"tokenizer file {path} is missing from the engine directory")
        try:
            model = BPE.from_file(
                str(vocab_path),
                str(merges_path),
                continuing_subword_prefix="",
                end_of_word_suffix=END_OF_WORD,
                fuse_unk=False,
                unk_token=specials["unk_token"],
            )
        except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
            raise ManifestError(f"tokenizer files {vocab_path.parent} are corrupt: {e}") from None
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t in dict.fromkeys(specials.values())
            ]
        )
        found = {k: tok.token_to_id(v) for k, v in specials.items()}
        missing = [specials[k] for k, v in found.items() if v is None]
        if missing:
            raise ManifestError(f"tokenizer vocabulary lacks special tokens {missing}")
        ids = {k: int(v) for k, v in found.items() if v is not None}
        self._tok = tok
        self.max_length = int(max_length)
        self.bos_id = ids["bos_token"]
        self.eos_id = ids["eos_token"]
        self.pad_id = ids["pad_token"]

    @classmethod
    def from_engine_dir(
        cls, engine_dir: Path, settings: dict[str, Any], default_max_length: int
    ) -> ClipTokenizer:
        """Build from the manifest's ``tokenizer`` entry (file paths relative to the engine
        directory, plus optional ``max_length`` and special-token settings)."""
        try:
            vocab = Path(engine_dir) / str(settings["vocab"])
            merges = Path(engine_dir) / str(settings["merges"])
        except KeyError as e:
            raise ManifestError(f"manifest 'tokenizer' lacks {e.args[0]!r}") from None
        max_length = int(settings.get("max_length") or default_max_length)
        return cls(vocab, merges, max_length, _special_tokens(vocab.parent, settings))

    def _content_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        # one encode per prompt: encode_batch hands a few short prompts to a thread pool that
        # costs more than it saves and competes with the engine's threads
        return [self._tok.encode(p, add_special_tokens=False).ids for p in prompts]

    def content_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without BOS / EOS / padding and untruncated (what prompt
        chunking (``prompt_chunks``) lays out into 75-token chunks itself)."""
        return self._content_ids(texts)

    def token_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (``",</w>"``: the comma chunking backtracks to)."""
        found = self._tok.token_to_id(token)
        return None if found is None else int(found)

    def decode(self, ids: Sequence[int]) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=False)
        return text.replace(END_OF_WORD, " ").strip()

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """(len(prompts), max_length) int32 ids: bos, text, eos, pad...

        Text beyond ``max_length - 2`` tokens is dropped with a warning naming it.
        """
        room = self.max_length - 2
        rows = []
        for ids in self._content_ids(prompts):
            if len(ids) > room:
                logger.warning(
                    "The following part of your input was truncated because CLIP can only "
                    "handle sequences up to %d tokens: %s",
                    self.max_length,
                    self.decode(ids[room:]),
                )
                ids = ids[:room]
            row = [self.bos_id, *ids, self.eos_id]
            rows.append(row + [self.pad_id] * (self.max_length - len(row)))
        return np.asarray(rows, dtype=np.int32).reshape(len(rows), self.max_length)
