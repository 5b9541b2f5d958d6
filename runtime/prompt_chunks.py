"""Prompts beyond 77 tokens and weighted prompts, encoded the way the AUTOMATIC1111 WebUI
encodes them: 75-token chunks run through the text encoder one 77-token window each and
concatenated along the sequence, per-token emphasis applied to the hidden states.

Reference matched (AUTOMATIC1111/stable-diffusion-webui, v1.6-1.10):
``modules/sd_hijack_clip.py`` ``TextConditionalModel.tokenize_line`` (chunking, the comma
backtrack, ``BREAK``), ``forward`` / ``process_tokens`` (chunks of a batch padded with empty
chunks, SD 2.x pad ids after the end token), ``modules/sd_emphasis.py`` (the emphasis modes;
"Original" is the default) and ``modules/sd_samplers_cfg_denoiser.py`` ``pad_cond_uncond``
(prompt and negative prompt padded to the same length with empty-prompt chunks). Textual
inversion embeddings are not supported.

Per prompt (:func:`chunk_prompt`):

- parse the emphasis (:func:`~.prompt_weights.parse_prompt_attention`), tokenise each piece
  without BOS / EOS, and fill chunks of 75 tokens, each token carrying its piece's weight;
- a ``BREAK`` closes the current chunk (padded), even an empty one;
- comma backtrack: when a chunk is full and the last comma in it is at most
  ``comma_backtrack`` tokens back (WebUI setting "Prompt word wrap length limit", default 20;
  0 turns it off), the tokens after that comma move to the next chunk, so a phrase is not cut
  in two;
- each chunk becomes ``BOS + 75 tokens + EOS``, padded with EOS (weight 1.0); where the pad
  token differs from EOS (SD 2.x: "!"), everything after the first EOS becomes the pad token.

So a prompt of at most 75 tokens without emphasis gives exactly the plain tokenizer's ids.

Emphasis ("original", the WebUI default): ``z' = z * w`` per token, then ``z' *= mean(z) /
mean(z')`` so the chunk's mean is restored. One deliberate difference: the WebUI takes these
means over every prompt of its encoder batch at once, which makes one image's conditioning
depend on what else is in the batch; we take them per prompt and chunk, which equals the
WebUI for a batch of one prompt (its usual case) and keeps batched and single requests equal.
Other modes: "no_norm" (multiply only, the WebUI's "No norm"), "ignore" (parse for BREAK,
ignore the weights) and "none" (the prompt is plain text: no emphasis, no BREAK).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from trt_sd.models.errors import InputError

from .prompt_weights import BREAK, parse_prompt_attention

logger = logging.getLogger("trt_sd.runtime")

EMPHASIS_MODES = ("original", "no_norm", "ignore", "none")
#: the WebUI's default "Prompt word wrap length limit" (comma_padding_backtrack)
COMMA_BACKTRACK = 20
COMMA_TOKEN = ",</w>"


class PromptTokenizer(Protocol):
    """What chunking needs of a tokenizer (``runtime.tokenizer.ClipTokenizer`` has it)."""

    bos_id: int
    eos_id: int
    pad_id: int
    max_length: int

    def content_ids(self, texts: Sequence[str]) -> list[list[int]]: ...

    def token_id(self, token: str) -> int | None: ...


@dataclass(frozen=True)
class PromptChunks:
    """One prompt: ``ids`` and ``weights`` of shape (chunks, max_length); ``token_count`` is
    the WebUI's count (75 per full chunk + the tokens of the last)."""

    ids: np.ndarray
    weights: np.ndarray
    token_count: int


@dataclass(frozen=True)
class PromptBatch:
    """Prompts padded to one chunk count: ``ids`` int32 and ``weights`` float32, both
    (rows, chunks, max_length)."""

    ids: np.ndarray
    weights: np.ndarray
    token_counts: tuple[int, ...]

    @property
    def chunks(self) -> int:
        return int(self.ids.shape[1])

    @property
    def sequence_length(self) -> int:
        """The UNet's text length for this batch: chunks * max_length (77, 154, 231, ...)."""
        return int(self.ids.shape[1] * self.ids.shape[2])

    @property
    def plain(self) -> bool:
        """One chunk and no emphasis: ``ids[:, 0]`` equals the plain tokenizer's ids, and
        encoding needs no host-side weighting."""
        return self.chunks == 1 and bool(np.all(self.weights == 1.0))


def _check_mode(emphasis: str) -> None:
    if emphasis not in EMPHASIS_MODES:
        raise InputError(
            f"emphasis={emphasis!r} is not known; allowed: {', '.join(EMPHASIS_MODES)}"
        )


def chunk_prompt(
    tokenizer: PromptTokenizer,
    text: str,
    *,
    emphasis: str = "original",
    comma_backtrack: int = COMMA_BACKTRACK,
) -> PromptChunks:
    """One prompt -> its chunks and per-token weights, as the WebUI lays them out."""
    _check_mode(emphasis)
    if isinstance(comma_backtrack, bool) or not isinstance(comma_backtrack, int):
        raise InputError(f"comma_backtrack={comma_backtrack!r} must be an integer")
    size = tokenizer.max_length - 2
    parsed = [(text, 1.0)] if emphasis == "none" else parse_prompt_attention(text)
    comma = tokenizer.token_id(COMMA_TOKEN)
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1
    count = 0

    def close(last: bool = False) -> None:
        nonlocal tokens, weights, last_comma, count
        count += len(tokens) if last else size
        fill = size - len(tokens)
        chunks.append(
            (
                [tokenizer.bos_id, *tokens, *[tokenizer.eos_id] * fill, tokenizer.eos_id],
                [1.0, *weights, *[1.0] * fill, 1.0],
            )
        )
        tokens, weights, last_comma = [], [], -1

    pieces = tokenizer.content_ids([p for p, _ in parsed])
    for ids, (piece, weight) in zip(pieces, parsed, strict=True):
        if (piece, weight) == BREAK:
            close()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == size and last_comma != -1 and size - last_comma <= comma_backtrack:
                keep = last_comma + 1  # move the words after the comma to the next chunk
                moved, moved_w = tokens[keep:], weights[keep:]
                tokens, weights = tokens[:keep], weights[:keep]
                close()
                tokens, weights = moved, moved_w
            if len(tokens) == size:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close(last=True)
    ids_arr = np.asarray([c[0] for c in chunks], dtype=np.int32)
    if tokenizer.pad_id != tokenizer.eos_id:  # SD 2.x: pad after the first end token
        for row in ids_arr:
            end = int(np.argmax(row == tokenizer.eos_id))
            row[end + 1 :] = tokenizer.pad_id
    return PromptChunks(ids_arr, np.asarray([c[1] for c in chunks], dtype=np.float32), count)


def tokenize_prompts(
    tokenizer: PromptTokenizer,
    texts: Sequence[str],
    *,
    emphasis: str = "original",
    comma_backtrack: int = COMMA_BACKTRACK,
    min_chunks: int = 1,
    max_chunks: int | None = None,
) -> PromptBatch:
    """Chunk every text and pad all of them to one chunk count with empty-prompt chunks
    (``BOS EOS pad...``, weight 1), as the WebUI pads a batch and the negative prompt.

    Pass the negative and positive prompts together so they get the same length. Texts with
    more than ``max_chunks`` chunks (the UNet's built text-length range) keep the first
    ``max_chunks`` with a warning, as the plain tokenizer truncates with one.
    """
    if max_chunks is not None and max_chunks < max(min_chunks, 1):
        raise InputError(f"max_chunks={max_chunks} must be at least min_chunks={min_chunks}")
    rows = [chunk_prompt(tokenizer, t, emphasis=emphasis, comma_backtrack=comma_backtrack)
            for t in texts]  # fmt: skip
    if not rows:
        raise InputError("no prompts to encode")
    n = max(min_chunks, *(len(r.ids) for r in rows))
    if max_chunks is not None and n > max_chunks:
        long = [i for i, r in enumerate(rows) if len(r.ids) > max_chunks]
        logger.warning(
            "Prompt(s) %s are longer than this engine takes (%d chunks of %d tokens); the "
            "text beyond that was dropped",
            long,
            max_chunks,
            tokenizer.max_length - 2,
        )
        n = max_chunks
    empty = chunk_prompt(tokenizer, "", emphasis="none")
    ids = np.empty((len(rows), n, tokenizer.max_length), dtype=np.int32)
    weights = np.ones(ids.shape, dtype=np.float32)
    for i, r in enumerate(rows):
        k = min(len(r.ids), n)
        ids[i, :k], weights[i, :k] = r.ids[:k], r.weights[:k]
        ids[i, k:] = empty.ids[0]
    return PromptBatch(ids, weights, tuple(r.token_count for r in rows))


def apply_emphasis(
    hidden: np.ndarray, weights: np.ndarray, emphasis: str = "original"
) -> np.ndarray:
    """Weight hidden states (..., tokens, D) by ``weights`` (..., tokens), per chunk.

    "original" restores each chunk's mean (module doc); a chunk whose weights are all 1 comes
    back unchanged, bit for bit. Arithmetic in float32, the result in ``hidden``'s dtype.
    """
    _check_mode(emphasis)
    if emphasis in ("ignore", "none") or bool(np.all(weights == 1.0)):
        return hidden
    z = np.asarray(hidden, dtype=np.float32)
    out = z * np.asarray(weights, dtype=np.float32)[..., None]
    if emphasis == "original":
        before = z.mean(axis=(-2, -1), dtype=np.float64, keepdims=True)
        after = out.mean(axis=(-2, -1), dtype=np.float64, keepdims=True)
        # (a chunk whose weighted mean is exactly 0 is left unscaled, not divided by zero)
        safe = np.where(after == 0.0, 1.0, after)
        out *= np.where(after == 0.0, 1.0, before / safe).astype(np.float32)
    return out.astype(hidden.dtype, copy=False)


def encode_prompts(
    encode: Callable[[np.ndarray], np.ndarray],
    batch: PromptBatch,
    *,
    emphasis: str = "original",
    max_rows: int | None = None,
) -> np.ndarray:
    """Hidden states (rows, chunks * max_length, D) of ``batch``.

    ``encode(ids)``: int32 (k, max_length) -> (k, max_length, D), the text encoder. All chunks
    of all rows go through it together (row-major: row 0's chunks first), in calls of at most
    ``max_rows`` (the engine's batch limit); then emphasis, then the chunks of each row are
    concatenated along the sequence axis.
    """
    rows, n, length = batch.ids.shape
    flat = batch.ids.reshape(rows * n, length)
    step = len(flat) if max_rows is None else int(max_rows)
    if step < 1:
        raise InputError(f"max_rows={max_rows!r} must be a positive integer")
    parts = [np.asarray(encode(flat[i : i + step])) for i in range(0, len(flat), step)]
    hidden = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if hidden.ndim != 3 or hidden.shape[:2] != (rows * n, length):
        raise ValueError(
            f"the text encoder returned shape {hidden.shape} for ids of shape "
            f"{(rows * n, length)}; expected ({rows * n}, {length}, D)"
        )
    hidden = apply_emphasis(hidden.reshape(rows, n, length, -1), batch.weights, emphasis)
    return hidden.reshape(rows, n * length, hidden.shape[-1])


def pooled_first_chunk(pooled: np.ndarray, batch: PromptBatch) -> np.ndarray:
    """(rows, P) from an encoder's pooled output (rows * chunks, P) for ``batch``'s ids: the
    WebUI conditions SDXL on the pooled output of each prompt's first chunk."""
    rows, n = batch.ids.shape[:2]
    pooled = np.asarray(pooled)
    if pooled.shape[0] != rows * n:
        raise ValueError(f"pooled has {pooled.shape[0]} rows; the batch has {rows * n} chunks")
    return pooled.reshape(rows, n, *pooled.shape[1:])[:, 0]


def encode_long_prompts(
    encode: Callable[[np.ndarray], np.ndarray],
    tokenizer: PromptTokenizer,
    texts: Sequence[str],
    *,
    emphasis: str = "original",
    comma_backtrack: int = COMMA_BACKTRACK,
    max_chunks: int | None = None,
    max_rows: int | None = None,
) -> np.ndarray:
    """``texts`` (e.g. ``[*negative_prompts, *prompts]``) -> (len(texts), chunks * 77, D),
    every row the same length: :func:`tokenize_prompts` then :func:`encode_prompts`."""
    batch = tokenize_prompts(
        tokenizer, texts, emphasis=emphasis, comma_backtrack=comma_backtrack, max_chunks=max_chunks
    )
    return encode_prompts(encode, batch, emphasis=emphasis, max_rows=max_rows)
