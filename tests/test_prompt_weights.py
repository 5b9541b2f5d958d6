"""AUTOMATIC1111 emphasis syntax: the WebUI's own doctest examples and its edge cases."""

from __future__ import annotations

import pytest

from trt_sd.models.errors import InputError
from trt_sd.runtime.prompt_weights import parse_prompt_attention

# modules/prompt_parser.py parse_prompt_attention's doctests (AUTOMATIC1111 v1.6-1.10)
WEBUI_DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]
# further behaviour of the same function (values from running it)
EDGE_CASES = [
    ("", [("", 1.0)]),
    ("[a]", [("a", 0.9090909090909091)]),
    ("((a))", [("a", 1.2100000000000002)]),
    ("(cat : 1.5 )", [("cat ", 1.5)]),  # the space before the colon stays text
    ("(a:-1)", [("a", -1.0)]),
    ("a) b] c:d", [("a) b] c:d", 1.0)]),  # unmatched closers and lone colons are text
    ("a:1.3) b", [("a:1.3) b", 1.0)]),  # a weight with no open bracket is text too
    ("a\\b\\\\c", [("ab\\c", 1.0)]),  # a backslash before a non-bracket is dropped
    ("[a (b] c)", [("a ", 0.9090909090909091), ("b", 1.0), (" c", 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("BREAKfast, break BREAK", [("BREAKfast, break", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    # inside brackets the WebUI scales the marker too, so it is no longer a break
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
]


@pytest.mark.parametrize("prompt,expected", WEBUI_DOCTESTS + EDGE_CASES, ids=repr)
def test_matches_the_webui(prompt: str, expected: list) -> None:
    assert parse_prompt_attention(prompt) == expected


def test_non_numeric_weight_is_an_input_error() -> None:
    """The WebUI crashes with a bare ValueError from float('1.2.3'); we name the problem."""
    with pytest.raises(InputError, match=r"prompt weight '1\.2\.3' is not a number"):
        parse_prompt_attention("(a:1.2.3)")
    with pytest.raises(InputError, match="must be a string"):
        parse_prompt_attention(None)  # type: ignore[arg-type]
