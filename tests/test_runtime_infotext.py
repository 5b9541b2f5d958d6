"""WebUI-format generation parameters: writing, parsing back, and atomic PNG writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trt_sd.models.errors import InputError
from trt_sd.runtime.infotext import (
    format_infotext,
    parse_infotext,
    parse_webui_sampler,
    read_infotext,
    webui_sampler_name,
    write_png,
)

PARAMS = {
    "prompt": "a photo of a cat",
    "negative_prompt": "blurry",
    "sampler": "dpm++",
    "karras": True,
    "steps": 20,
    "guidance": 7.5,
    "guidance_rescale": 0.0,
    "seed": 1,
    "seeds": [1, 2],
    "width": 512,
    "height": 768,
    "eta": None,
    "model": "my: model, v1",
    "model_hash": "abcdef1234567890",
}


def test_webui_format() -> None:
    text = format_infotext(PARAMS, 0)
    assert text == (
        "a photo of a cat\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, Size: 512x768, "
        "Model hash: abcdef1234, Model: my model v1"
    )
    assert "Seed: 2," in format_infotext(PARAMS, 1)  # image i of a batch: seed + i


def test_no_negative_line_without_negative_prompt() -> None:
    text = format_infotext({**PARAMS, "negative_prompt": "", "karras": None}, 0)
    assert "Negative prompt" not in text
    assert "Sampler: DPM++ 2M," in text


def test_round_trip_with_awkward_prompts() -> None:
    params = {
        **PARAMS,
        "prompt": "line one, with: colons\nline two 🚀",
        "negative_prompt": "bad, ugly",
        "strength": 0.65,
        "eta": 0.3,
        "guidance": 3.0,
        "sampler": "euler-a",
        "karras": None,
    }
    parsed = parse_infotext(format_infotext(params, 1))
    assert parsed["prompt"] == params["prompt"]
    assert parsed["negative_prompt"] == "bad, ugly"
    assert parsed["sampler"] == "euler-a" and parsed["karras"] is None
    assert (parsed["steps"], parsed["guidance"], parsed["seed"]) == (20, 3.0, 2)
    assert (parsed["width"], parsed["height"]) == (512, 768)
    assert parsed["strength"] == 0.65 and parsed["eta"] == 0.3


def test_parses_real_webui_infotexts() -> None:
    old = (
        "girl with a beret, detailed\nNegative prompt: ugly, (deformed)\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, "
        "Model hash: 45dee52b"
    )
    p = parse_infotext(old)
    assert p["prompt"] == "girl with a beret, detailed"
    assert p["negative_prompt"] == "ugly, (deformed)"
    assert (p["sampler"], p["guidance"], p["seed"]) == ("euler-a", 7.0, 965400086)
    new = (
        "cat\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 3, "
        'Size: 640x512, Model: "a, b", Version: v1.10.0'
    )
    p = parse_infotext(new)
    assert (p["sampler"], p["karras"], p["width"], p["model"]) == ("dpm++2m", True, 640, "a, b")


def test_sampler_names() -> None:
    assert parse_webui_sampler("DPM++ 2M Karras") == ("dpm++2m", True)
    assert parse_webui_sampler("Euler a") == ("euler-a", None)
    assert webui_sampler_name("euler-a", None) == "Euler a"
    assert webui_sampler_name("dpm++2m-sde", True) == "DPM++ 2M SDE Karras"
    assert webui_sampler_name("dpm-solver-3m", None) == "dpm-solver-3m"  # no WebUI name
    assert parse_webui_sampler("DDIM") == ("ddim", None)
    assert parse_webui_sampler("my-own") == ("my-own", None)


def test_exponential_schedule_round_trip() -> None:
    params = {**PARAMS, "karras": None, "sampler": "euler"}
    params["sampler_options"] = {"use_exponential_sigmas": True}
    text = format_infotext(params, 0)
    assert "Sampler: Euler, Schedule type: Exponential," in text
    assert parse_infotext(text)["sampler_options"] == {"use_exponential_sigmas": True}


def test_bad_values_raise_input_error() -> None:
    with pytest.raises(InputError, match="unreadable"):
        parse_infotext("p\nSteps: many, Sampler: DDIM, CFG scale: 7, Seed: 1")


def test_png_round_trip_and_atomic_write(tmp_path: Path) -> None:
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    text = format_infotext({**PARAMS, "prompt": "café 🚀"}, 0)
    path = write_png(tmp_path / "out.png", image, text)
    assert read_infotext(path) == text
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im), image)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temp file left behind


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises((TypeError, ValueError)):
        write_png(tmp_path / "bad.png", np.zeros((4, 4), dtype=np.float64), "x")
    assert list(tmp_path.iterdir()) == []


def test_png_without_parameters(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(InputError, match="no generation parameters"):
        read_infotext(tmp_path / "plain.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable PNG"):
        read_infotext(tmp_path / "junk.png")
