"""AUTOMATIC1111 prompt emphasis: ``(word:1.3)``, ``(word)``, ``[word]``, ``\\(``, ``BREAK``.

Users paste prompts written for the Stable Diffusion WebUI, so the syntax means here what it
means there. Reference matched: AUTOMATIC1111/stable-diffusion-webui ``modules/prompt_parser.py``
``parse_prompt_attention`` (the version whose weight pattern allows spaces, ``( a : 1.3 )``,
as in v1.6-1.10); its doctest examples are tests/test_prompt_weights.py's cases, and a fuzz run
against that function agreed on every prompt. This is an independent implementation of the
same rules:

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` by 1/1.1; they nest.
- ``(text:w)`` multiplies by ``w`` (a ``[+-]?[.0-9]+`` number, spaces allowed around it).
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; a backslash before anything
  else is dropped (the WebUI's behaviour).
- Unmatched ``)`` / ``]`` are literal text; brackets still open at the end apply to the rest of
  the prompt (round ones first, then square), as the WebUI does.
- ``BREAK`` (a whole word, upper case) outside brackets ends the current 75-token chunk; it is
  returned as ``(BREAK, -1.0)``. Inside brackets the WebUI multiplies that marker's weight like
  any text, so it stops being a break and the word "BREAK" is encoded with a negative weight;
  we keep that quirk rather than invent a different meaning.
- Adjacent pieces of equal weight are merged; an empty prompt is ``[("", 1.0)]``.

The weights multiply in the order the brackets close, so they agree with the WebUI's to the
last bit (``(((house:1.3))`` -> 1.5730000000000004).
"""

from __future__ import annotations

import re

from trt_sd.models.errors import InputError

#: the marker a top-level ``BREAK`` becomes (text, weight), as in the WebUI
BREAK = ("BREAK", -1.0)
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One lexical item per match, tried in this order: an escape, an opening bracket, an explicit
# weight closing a round bracket, a closing bracket, a run of plain text, a lone colon.
_ITEM = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\]?)
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``text`` -> ``[(piece, weight), ...]`` with the WebUI's emphasis rules (module doc).

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    >>> parse_prompt_attention("a BREAK b")
    [('a', 1.0), ('BREAK', -1.0), ('b', 1.0)]

    Raises InputError for an explicit weight that is not a number (``(a:1.2.3)``), where the
    WebUI fails with a bare ValueError.
    """
    if not isinstance(text, str):
        raise InputError(f"a prompt must be a string, got {type(text).__name__}")
    pieces: list[list[str | float]] = []  # [text, weight], mutable: brackets rescale ranges
    rounds: list[int] = []  # where each open bracket's range starts in ``pieces``
    squares: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] = float(piece[1]) * factor

    for m in _ITEM.finditer(text):
        kind = m.lastgroup
        token = m.group(0)
        if kind == "escape":
            pieces.append([token[1:], 1.0])
        elif kind == "open":
            (rounds if token == "(" else squares).append(len(pieces))
        elif kind == "weight" and rounds:
            scale_from(rounds.pop(), _weight(m.group("weight"), text))
        elif kind == "close" and token == ")" and rounds:
            scale_from(rounds.pop(), ROUND_MULTIPLIER)
        elif kind == "close" and token == "]" and squares:
            scale_from(squares.pop(), SQUARE_MULTIPLIER)
        else:  # plain text, or a bracket / weight with nothing open to close
            for i, part in enumerate(_BREAK_SPLIT.split(token)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in rounds:
        scale_from(start, ROUND_MULTIPLIER)
    for start in squares:
        scale_from(start, SQUARE_MULTIPLIER)
    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + str(piece_text), float(weight))
        else:
            merged.append((str(piece_text), float(weight)))
    return merged


def _weight(number: str, prompt: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise InputError(
            f"prompt weight {number!r} is not a number (in {prompt[:80]!r}); write it as "
            "(text:1.2), or escape a literal parenthesis as \\("
        ) from None
