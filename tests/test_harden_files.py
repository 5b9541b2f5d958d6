"""Images and PNGs in and out (issue 17, classes 4 and 7): decompression bombs are refused from
their header, output PNGs follow the umask, every prompt round-trips through ``--from-png``,
``--out DIR/`` writes inside DIR, and a NaN from an fp32 engine on ordinary inputs blames the
engine, not the guidance."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_harden_manifest import valid_manifest

from trt_sd.models.errors import InputError
from trt_sd.models.manifest import Manifest
from trt_sd.runtime.images import MAX_INPUT_PIXELS, image_size, load_image
from trt_sd.runtime.infotext import (
    current_umask,
    format_infotext,
    parse_infotext,
    read_infotext,
    write_png,
)
from trt_sd.runtime.run_cli import output_paths

PARAMS = {
    "prompt": "a cat", "negative_prompt": "", "sampler": "euler", "karras": None, "steps": 4,
    "guidance": 7.5, "seeds": [1], "width": 16, "height": 16, "guidance_rescale": 0.0,
}  # fmt: skip


def bomb_png(width: int, height: int, text: str | None = None) -> bytes:
    """A tiny PNG file that declares ``width`` x ``height`` pixels (its data is a few bytes of
    one zlib stream that would inflate to gigabytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    parts = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", header)]
    if text is not None:
        parts.append(chunk(b"tEXt", b"parameters\x00" + text.encode("latin-1")))
    parts += [chunk(b"IDAT", zlib.compress(b"\x00" * 1024)), chunk(b"IEND", b"")]
    return b"".join(parts)


@pytest.mark.parametrize("size", [(100_000, 100_000), (MAX_INPUT_PIXELS // 1000 + 1, 1000)])
def test_decompression_bombs_are_refused_from_the_header(tmp_path: Path, size) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(*size, text="a cat\nSteps: 4, Sampler: Euler, Seed: 1"))
    for call in (
        lambda: load_image(path, 16, 16),
        lambda: load_image(path.read_bytes(), 16, 16),  # what an HTTP input would be
        lambda: image_size(path),
        lambda: read_infotext(path),
    ):
        with pytest.raises(InputError, match="pixels") as e:
            call()
        assert "\n" not in str(e.value)


def test_bomb_on_the_cli_is_one_line(tmp_path: Path, capsys) -> None:
    from trt_sd.runtime.cli import main

    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(60_000, 60_000, text="a cat\nSteps: 4, Sampler: Euler, Seed: 1"))
    assert main(["run", "--engines", str(tmp_path), "--from-png", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at most" in err and "Traceback" not in err


def test_output_pngs_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert current_umask() == 0o022
        path = write_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8), "x")
        assert (path.stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        path = write_png(tmp_path / "b.png", np.zeros((4, 4, 3), np.uint8), "x")
        assert (path.stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)


PROMPT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40
) | st.sampled_from(
    [
        "a cat\nNegative prompt: dog",
        "x\nSteps: 4, Sampler: Euler, Seed: 1",
        '"quoted"',
        "  padded  ",
        "Negative prompt: at the start",
        "line\n\nbreaks\n",
    ]
)


@settings(max_examples=80, deadline=None)
@given(prompt=PROMPT, negative=PROMPT)
def test_every_prompt_round_trips(prompt: str, negative: str) -> None:
    text = format_infotext({**PARAMS, "prompt": prompt, "negative_prompt": negative})
    parsed = parse_infotext(text)
    assert (parsed["prompt"], parsed["negative_prompt"]) == (prompt, negative)
    assert parsed["steps"] == 4 and parsed["seed"] == 1


def test_ordinary_prompts_stay_webui_text() -> None:
    text = format_infotext({**PARAMS, "prompt": "a cat\non a mat", "negative_prompt": "dog"})
    assert text.startswith("a cat\non a mat\nNegative prompt: dog\nSteps: 4")


def test_newline_negative_prompt_round_trips_through_a_png(tmp_path: Path) -> None:
    prompt = "a cat\nNegative prompt: not really"
    params = {**PARAMS, "prompt": prompt, "negative_prompt": "blurry"}
    write_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8), format_infotext(params))
    parsed = parse_infotext(read_infotext(tmp_path / "a.png"))
    assert parsed["prompt"] == prompt and parsed["negative_prompt"] == "blurry"


def test_out_directory_writes_inside_it(tmp_path: Path) -> None:
    folder = tmp_path / "outdir"
    folder.mkdir()
    assert output_paths(str(folder) + "/", 7, 1) == [folder / "trt-sd-7.png"]
    assert output_paths(str(folder), 7, 2) == [folder / "trt-sd-7-0.png", folder / "trt-sd-7-1.png"]
    assert output_paths(str(tmp_path / "new") + os.sep, 3, 1) == [tmp_path / "new/trt-sd-3.png"]
    assert output_paths(str(tmp_path / "x"), 3, 1) == [tmp_path / "x.png"]


def test_overflow_on_ordinary_inputs_blames_the_engine() -> None:
    from trt_sd.runtime.pipeline import unet_overflow_hint

    manifest = Manifest.from_dict(valid_manifest())
    ordinary = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    assert "engine itself is at fault" in unet_overflow_hint(manifest, ordinary)
    assert "guidance" not in unet_overflow_hint(manifest, ordinary)
    assert "lower the guidance" in unet_overflow_hint(manifest, ordinary * 1e4)
    raw = valid_manifest()
    raw["components"]["unet"]["precision"] = "fp16"
    assert "fp32 export" in unet_overflow_hint(Manifest.from_dict(raw), ordinary)


def test_in_memory_images_are_size_checked() -> None:
    with pytest.raises(InputError, match="pixels"):
        load_image(Image.new("1", (MAX_INPUT_PIXELS // 4096 + 1, 4096)), 16, 16)
    assert load_image(bomb_png(16, 16), 16, 16).shape == (1, 3, 16, 16)  # bytes work too


@pytest.mark.parametrize("line", ["a" * 60_000, " " * 60_000, "a b" * 20_000])
def test_adversarial_parameter_text_parses_in_linear_time(line: str) -> None:
    """A long run of word characters or spaces without ':' made the WebUI regex quadratic
    (30 kB: 10 s); a PNG's parameters text is attacker-controlled with --from-png."""
    import time

    start = time.monotonic()
    parse_infotext("a cat\n" + line)
    assert time.monotonic() - start < 5


def test_oversized_parameter_text_is_refused(tmp_path: Path) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "x" * 200_000 + "\nSteps: 4, Sampler: Euler, Seed: 1")
    Image.new("RGB", (4, 4)).save(tmp_path / "long.png", pnginfo=info)
    with pytest.raises(InputError, match="at most 65536 are read"):
        parse_infotext(read_infotext(tmp_path / "long.png"))
