"""Build a small CLIP-format byte-level BPE tokenizer folder without the model hub.

Why: the bundled default model must ship a tokenizer that every consumer reads the way it
reads Stable Diffusion's: transformers' ``CLIPTokenizer.from_pretrained(folder)`` on the export
side and the ``tokenizers`` library (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``) in
the lean runtime. The real CLIP vocabulary is 49 408 entries; this one keeps CLIP's layout
(every byte character, then its ``</w>`` word-final form, then merge results, then the two
special tokens last, so ``<|endoftext|>`` has the highest id as in CLIP) but only has merges for
the words of a known prompt set. Any other text still tokenizes, byte by byte.

Standard library only (json); nothing here imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
WORD_END = "</w>"
MODEL_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table (the same table CLIP uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _word_symbols(word: str, byte_chars: dict[int, str]) -> list[str]:
    """A word as CLIP's BPE sees it before merging: byte characters, last one with ``</w>``."""
    symbols = [byte_chars[b] for b in word.encode("utf-8")]
    symbols[-1] += WORD_END
    return symbols


def build_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """CLIP-layout vocabulary and merge list that turn each of ``words`` into one token.

    Merges are written left to right per word (``s e``, ``se v``, ``sev e``, ``seve n</w>``);
    every merge result is added to the vocabulary, so whatever order the BPE applies them in,
    every produced token has an id.
    """
    byte_chars = bytes_to_unicode()
    base = list(byte_chars.values())
    vocab_list = base + [c + WORD_END for c in base]
    known = set(vocab_list)
    merges: list[str] = []
    seen_merges: set[str] = set()
    for word in sorted({w.lower() for w in words if w}):
        symbols = _word_symbols(word, byte_chars)
        current = symbols[0]
        for nxt in symbols[1:]:
            merge = f"{current} {nxt}"
            current += nxt
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append(merge)
            if current not in known:
                known.add(current)
                vocab_list.append(current)
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_clip_tokenizer(out_dir: str | Path, words: Iterable[str]) -> dict[str, int]:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` (the files of SD 1.5's ``tokenizer/`` folder) and return the
    vocabulary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(words)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return vocab
