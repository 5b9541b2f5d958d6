"""Generation parameters inside PNGs, in the Stable Diffusion WebUI "infotext" format.

The text goes in a PNG text chunk named ``parameters`` (tEXt; Pillow writes iTXt instead when
the text is not Latin-1, e.g. an emoji prompt, exactly as the WebUI's own Pillow call does)::

    a photo of a cat
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: \
abcdef1234, Model: name

(one line; wrapped here).

Format details follow AUTOMATIC1111's ``create_infotext`` / ``parse_generation_parameters``:
the negative-prompt line only when there is one; ``Size`` is width x height; values containing
``,``, ``:`` or a newline are JSON-quoted; ``Model`` has ``,`` and ``:`` removed; the sampler is
the WebUI's display name with a `` Karras`` suffix for Karras sigmas (newer WebUIs write
``Schedule type: Karras`` instead, which the parser also reads).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from trt_sd.models.errors import InputError

PNG_KEY = "parameters"
TOOL_VERSION_KEY = "Version"

#: Sampler display names of the Stable Diffusion WebUI (AUTOMATIC1111 / Forge). A trt-sd sampler
#: is written under the first of its registry aliases found here, else under its own name.
WEBUI_SAMPLERS = (
    "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE",
    "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DDIM", "PLMS", "UniPC", "LCM", "DDPM",
)  # fmt: skip
#: Emphasis modes by the WebUI's names (modules/sd_emphasis.py); it writes "Emphasis" only
#: when the mode is not the default "Original", and so do we.
WEBUI_EMPHASIS = {"original": None, "no_norm": "No norm", "ignore": "Ignore", "none": "None"}
#: ``dpm++`` has no fixed order; with the scheduler default (solver_order 2) it is DPM++ 2M.
_EXTRA_LABELS = {"dpm++": "DPM++ 2M"}

# AUTOMATIC1111's modules/infotext_utils.py, with the key and the whitespace around it bounded:
# unbounded, a long run of word characters or spaces without a ":" made findall quadratic (a
# 30 kB line took 10 s), which a PNG's parameters text could exploit
_RE_PARAM = re.compile(r'\s{0,16}(\w[\w \-/]{0,63}):\s{0,16}("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
#: two maximal prompts and the parameter line fit easily; longer text is not ours
MAX_INFOTEXT_CHARS = 64 * 1024
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def _quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return str(json.loads(text))
    except json.JSONDecodeError:
        return text


def webui_sampler_name(sampler: str, karras: bool | None) -> str:
    """``("dpm++2m", True)`` -> ``"DPM++ 2M Karras"``."""
    from trt_sd.samplers import SAMPLERS

    info = SAMPLERS.get(sampler)
    aliases = info.aliases if info is not None else ()
    name = next((a for a in aliases if a in WEBUI_SAMPLERS), _EXTRA_LABELS.get(sampler, sampler))
    return f"{name} Karras" if karras else name


def parse_webui_sampler(text: str) -> tuple[str, bool | None]:
    """``"DPM++ 2M Karras"`` -> ``("dpm++2m", True)``; a name trt-sd does not know passes
    through unchanged (the pipeline then reports it with the valid choices)."""
    from trt_sd.samplers import resolve

    try:
        canonical, implied = resolve(text)
    except ValueError:
        return text.strip(), None
    return canonical, (True if implied.get("use_karras_sigmas") else None)


def format_infotext(params: dict[str, Any], index: int = 0, version: str = "") -> str:
    """Infotext of image ``index`` of a result (its own seed is ``params["seeds"][index]``).

    Prompts are written as the WebUI writes them, except one that would not read back as
    itself (a line starting ``Negative prompt:``, a last line that looks like the parameter
    line, surrounding whitespace, a quoted string): that one is JSON-quoted, which
    :func:`parse_infotext` unquotes, so every prompt round-trips through ``--from-png``."""

    def pick(key: str) -> Any:
        value = params[key]
        return value[index] if isinstance(value, list) else value

    prompt, negative = str(pick("prompt")), str(pick("negative_prompt") or "")
    body = _parameter_line(params, index, version)
    text = _assemble(prompt, negative, body)
    parsed = parse_infotext(text)
    if parsed["prompt"] != prompt or parsed["negative_prompt"] != negative:
        quote = lambda t: json.dumps(t, ensure_ascii=False) if t else t  # noqa: E731
        quoted_prompt = quote(prompt) if parsed["prompt"] != prompt else prompt
        text = _assemble(quoted_prompt, quote(negative), body)
        if parse_infotext(text)["prompt"] != prompt:  # the negative's text misled the split
            text = _assemble(quote(prompt), quote(negative), body)
    return text


def _assemble(prompt: str, negative: str, body: str) -> str:
    negative_text = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_text}\n{body}".strip()


def _parameter_line(params: dict[str, Any], index: int, version: str) -> str:
    fields: dict[str, Any] = {
        "Steps": params["steps"],
        "Sampler": webui_sampler_name(params["sampler"], params.get("karras")),
        "Schedule type": (
            "Exponential"
            if (params.get("sampler_options") or {}).get("use_exponential_sigmas")
            else None
        ),
        "CFG scale": params["guidance"],
        "Seed": params["seeds"][index],
        "Size": f"{params['width']}x{params['height']}",
        "Model hash": str(params.get("model_hash", ""))[:10] or None,
        "Model": str(params.get("model", "")).replace(",", "").replace(":", "") or None,
        "Denoising strength": params.get("strength"),
        "Mask blur": params.get("mask_blur"),
        "Eta": params.get("eta"),
        "Guidance rescale": params.get("guidance_rescale") or None,
        "Emphasis": WEBUI_EMPHASIS.get(params.get("emphasis") or "original"),
        "Lora hashes": ", ".join(f"{x['name']}: {x['hash']}" for x in params.get("loras", ()))
        or None,
        TOOL_VERSION_KEY: version or None,
    }
    return ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None)


def _unquote_prompt(text: str) -> str:
    """A prompt :func:`format_infotext` JSON-quoted (one line, a JSON string) -> its text."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"' and "\n" not in text:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(value, str):
            return value
    return text


def parse_infotext(text: str) -> dict[str, Any]:
    """Infotext -> Pipeline keyword arguments (prompt, negative_prompt, sampler, karras, steps,
    guidance, seed, width, height, strength, eta, guidance_rescale, sampler_options, emphasis) plus
    ``model_hash`` / ``model`` when present."""
    if len(text) > MAX_INFOTEXT_CHARS:
        raise InputError(
            f"generation parameters are {len(text)} characters; at most {MAX_INFOTEXT_CHARS} "
            "are read"
        )
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    raw = {k: _unquote(v) for k, v in _RE_PARAM.findall(last)}
    out: dict[str, Any] = {
        "prompt": _unquote_prompt("\n".join(prompt)),
        "negative_prompt": _unquote_prompt("\n".join(negative)),
    }
    try:
        if "Sampler" in raw:
            out["sampler"], out["karras"] = parse_webui_sampler(raw["Sampler"])
        schedule = raw.get("Schedule type", "").strip().lower()
        if schedule == "karras":
            out["karras"] = True
        elif schedule == "exponential":
            out["sampler_options"] = {"use_exponential_sigmas": True}
        conversions = {
            "Steps": ("steps", int),
            "CFG scale": ("guidance", float),
            "Seed": ("seed", int),
            "Denoising strength": ("strength", float),
            "Mask blur": ("mask_blur", float),
            "Eta": ("eta", float),
            "Guidance rescale": ("guidance_rescale", float),
            "Model hash": ("model_hash", str),
            "Model": ("model", str),
        }
        for key, (name, cast) in conversions.items():
            if key in raw:
                out[name] = cast(raw[key])
        if "Emphasis" in raw:
            names = {v.lower(): k for k, v in WEBUI_EMPHASIS.items() if v}
            emphasis = raw["Emphasis"].strip().lower()
            if emphasis not in {*names, "original"}:
                raise ValueError(f"Emphasis {raw['Emphasis']!r} is not a mode trt-sd knows")
            out["emphasis"] = names.get(emphasis, "original")
        if "Size" in raw:
            size = _RE_SIZE.match(raw["Size"].strip())
            if size is None:
                raise ValueError(f"Size {raw['Size']!r} is not WIDTHxHEIGHT")
            out["width"], out["height"] = int(size.group(1)), int(size.group(2))
    except ValueError as e:
        raise InputError(f"unreadable generation parameters: {e}") from None
    return out


def save_png(file: BinaryIO, image: np.ndarray, infotext: str) -> None:
    """Encode an RGB uint8 image with its infotext as PNG into an open binary file (a service
    answers with these bytes, ``trt-sd run`` writes them to disk)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_KEY, infotext)
    Image.fromarray(image, "RGB").save(file, format="PNG", pnginfo=info)


def write_png(path: str | os.PathLike[str], image: np.ndarray, infotext: str) -> Path:
    """Write an RGB uint8 image with its infotext, atomically (temp file + rename), so a
    crash or a full disk never leaves a truncated PNG under the final name."""
    return write_pngs([(path, image, infotext)])[0]


def write_pngs(items: list[tuple[str | os.PathLike[str], np.ndarray, str]]) -> list[Path]:
    """Write several PNGs: every image goes to a temp file beside its target first, and only
    when all are written are they renamed into place, so an unwritable target (missing folder,
    a directory of that name, no permission, full disk) is an InputError naming it that leaves
    none of the images behind, and no file is ever truncated. (A rename itself failing after
    others succeeded, e.g. a target owned by another user in a sticky folder, leaves the
    earlier images: renames cannot be made atomic as a group.)"""
    staged: list[tuple[Path, Path]] = []
    try:
        for target, image, infotext in items:
            path = Path(target)
            if path.is_dir():
                raise InputError(f"cannot write {str(path)!r}: it is a directory")
            try:
                fd, tmp_name = tempfile.mkstemp(
                    prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or "."
                )
            except OSError as e:
                raise InputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
            staged.append((Path(tmp_name), path))
            try:
                os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 is not the user's say
                with os.fdopen(fd, "wb") as f:
                    save_png(f, image, infotext)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise InputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
        for tmp, path in staged:
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise InputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return [path for _, path in staged]


def read_infotext(path: str | os.PathLike[str]) -> str:
    """The ``parameters`` text of a PNG; InputError if the file has none. The image's declared
    size is checked before any pixel is decoded (:func:`trt_sd.runtime.images.open_image`), and
    pixels are decoded only when the text sits after them."""
    from .images import open_image

    with open_image(path, "file", "PNG") as im:
        text = im.info.get(PNG_KEY)
        if text is None:
            try:
                im.load()  # text chunks after the image data are read with it
            except (OSError, ValueError, SyntaxError) as e:
                reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                raise InputError(f"{str(path)!r} is not a readable PNG: {reason}") from None
            text = im.info.get(PNG_KEY)
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{str(path)!r} carries no generation parameters (no 'parameters' text)")
    return text


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (``/proc``), else by
    the set-and-restore dance under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask
