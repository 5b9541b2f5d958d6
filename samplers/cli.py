"""``trt-sd samplers``: list the sampler names, their aliases, order and cost per step."""

from __future__ import annotations

import argparse
import json

from .registry import describe_samplers

_COLUMNS = [
    ("name", "NAME"),
    ("order", "ORDER"),
    ("calls_per_step", "CALLS/STEP"),
    ("kind", "KIND"),
    ("aliases", "ALIASES"),
    ("summary", "WHAT"),
]
_FOOTER = """\
Names are case- and space-insensitive; append "Karras" or "Exponential" for those sigma
spacings ("DPM++ 2M Karras"). Options: karras=, eta= (ddim, ancestral samplers), order= (where
ORDER can vary), strength= (img2img), exact_timesteps= (DPM-Solver, UniPC: unrounded Karras
timesteps), and any key of the sampler's diffusers scheduler config.
Third-order multistep: dpm++3m and dpm-solver-3m (also dpm-solver with order=3) take the
Taylor-consistent step and measure order 3; the -compat names (and dpm++ with order=3) keep
diffusers' update, which halves the second-difference term and measures about 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the table as JSON rows")


def main(args: argparse.Namespace) -> int:
    rows = describe_samplers()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cells = [[_text(row[key]) for key, _ in _COLUMNS] for row in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title) in enumerate(_COLUMNS)]
    print(
        "  ".join(title.ljust(w) for (_, title), w in zip(_COLUMNS, widths, strict=False)).rstrip()
    )
    for c in cells:
        print("  ".join(text.ljust(w) for text, w in zip(c, widths, strict=False)).rstrip())
    print()
    print(_FOOTER)
    return 0


def _text(value: object) -> str:
    return ", ".join(value) if isinstance(value, list) else str(value)
