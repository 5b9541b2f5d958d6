"""``trt-sd run`` flags for ControlNet engines (``--control-image``, ``--control-scale``, ...).

Kept apart from :mod:`trt_sd.runtime.run_cli` so the CLI module only gains two hooks; the
values go to ``Pipeline.__call__`` as its ``control_*`` keywords.
"""

from __future__ import annotations

import argparse
from typing import Any

from trt_sd.models.errors import InputError


def add_control_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "ControlNet (engines exported with --controlnet; control images are used as they are: "
        "preprocess them yourself (edges, depth, pose) at the output size)"
    )
    group.add_argument(
        "--control-image",
        action="append",
        metavar="FILE",
        help="control image, one per ControlNet in export order (repeat the flag)",
    )
    for flag, default, text in (
        ("--control-scale", 1.0, "conditioning scale"),
        ("--control-start", 0.0, "fraction of the steps where the ControlNet starts acting"),
        ("--control-end", 1.0, "fraction of the steps where it stops"),
    ):
        group.add_argument(
            flag,
            action="append",
            type=float,
            metavar="X",
            help=f"{text} (default {default:g}); once for all ControlNets or once per ControlNet",
        )


def control_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Pipeline keywords of the control flags; InputError for settings without an image."""
    images = getattr(args, "control_image", None)
    values = {
        "controlnet_scale": getattr(args, "control_scale", None),
        "control_start": getattr(args, "control_start", None),
        "control_end": getattr(args, "control_end", None),
    }
    if not images:
        given = [k for k, v in values.items() if v]
        if given:
            flag = "--" + given[0].replace("controlnet_", "control_").replace("_", "-")
            raise InputError(f"{flag} needs --control-image FILE")
        return {}
    out: dict[str, Any] = {"control_image": images}
    for key, value in values.items():
        if value:
            out[key] = value[0] if len(value) == 1 else value
    return out
