"""Calibration prompts: a user file, the bundled set for the bundled model, or a generic set.

Calibration should see the prompts the model will serve: activation ranges depend on what the
text conditioning asks for. The bundled digits model gets ``models/calibration_prompts.txt``
(its own prompt forms); other checkpoints get a small generic photo/art set unless the user
passes ``--calib-prompts FILE``.
"""

from __future__ import annotations

from pathlib import Path

from trt_sd.models import DEFAULT_MODEL_DIR, InputError

BUNDLED_PROMPTS = DEFAULT_MODEL_DIR.parent / "calibration_prompts.txt"

#: Generic prompts for checkpoints other than the bundled one (subjects, styles, lengths vary).
GENERIC_PROMPTS: tuple[str, ...] = (
    "a photo of an astronaut riding a horse on the moon",
    "a portrait of an old man with a beard, studio lighting, 85mm",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a red sports car parked on a wet city street at night, neon reflections",
    "a bowl of ramen with egg and green onions, top view, food photography",
    "a medieval castle on a hill surrounded by fog, digital art",
    "a cute corgi puppy sitting in a field of flowers",
    "an isometric illustration of a cozy bedroom with plants",
    "a snowy mountain landscape with a frozen lake, wide angle",
    "a futuristic city skyline with flying cars, concept art",
    "a close-up photo of a hummingbird drinking from a flower",
    "an oil painting of a vase of sunflowers in the style of van gogh",
    "a black and white photo of a busy train station in the 1950s",
    "a fantasy dragon flying over a burning village, dramatic lighting",
    "a minimalist logo of a fox, flat vector",
    "a tropical beach with palm trees and turquoise water",
    "a robot reading a book in a library, cinematic",
    "a macro photo of a dew drop on a leaf",
    "a pencil sketch of a cat sleeping on a windowsill",
    "an astronaut floating inside a space station, realistic",
    "a plate of colorful macarons on a marble table",
    "a knight in shining armor standing in a forest clearing",
    "a cyberpunk street market in the rain, highly detailed",
    "a children's book illustration of a bear having a picnic",
    "",
)


def parse_prompts(text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a user file; ``InputError`` when it is missing, unreadable or empty."""
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise InputError(f"calibration prompts file {str(p)!r} {what}")
    try:
        text = p.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(
            f"calibration prompts file {str(p)!r} is not readable UTF-8 text: {e}"
        ) from None
    prompts = parse_prompts(text)
    if not prompts:
        raise InputError(
            f"calibration prompts file {str(p)!r} holds no prompts "
            "(one per line; blank lines and # comments are skipped)"
        )
    return prompts


def load_prompts(path: str | Path | None, *, bundled_model: bool) -> tuple[list[str], str]:
    """(prompts, source description for the manifest)."""
    if path is not None:
        return read_prompt_file(path), str(Path(path).expanduser().absolute())
    if bundled_model:
        return read_prompt_file(BUNDLED_PROMPTS), f"bundled:{BUNDLED_PROMPTS.name}"
    return list(GENERIC_PROMPTS), "builtin:generic"
