"""`trt-sd run`: outputs, JSON summary, embedded parameters, --from-png, and error handling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runtime_engines import tiny_engines

from trt_sd.runtime.cli import main
from trt_sd.runtime.infotext import parse_infotext, read_infotext

FAST = ["--steps", "3", "--backend", "onnxruntime-cpu", "--quiet"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path: Path | str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_json_summary_png_and_parameters(capsys, tmp_path: Path) -> None:
    out_png = tmp_path / "cat.png"
    code, out, err = run(
        capsys,
        *("--engines", str(tiny_engines()), "--prompt", "a cat, sitting", "--seed", "7"),
        *("--sampler", "dpm++", "--karras", "--guidance", "6", "--out", str(out_png), "--json"),
        *FAST,
    )
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["images"] == [str(out_png)]
    assert set(summary["timings_s"]) == {"text_encoder", "unet", "vae_decoder", "total"}
    assert summary["unet_calls"] == 3
    assert summary["params"]["seed"] == 7 and summary["params"]["karras"] is True
    text = read_infotext(out_png)
    assert text.startswith("a cat, sitting\nSteps: 3, Sampler: DPM++ 2M Karras, CFG scale: 6.0, ")
    assert "Seed: 7, Size: 16x16, Model hash: " in text
    with Image.open(out_png) as im:
        assert im.text["parameters"] == text  # a PNG text chunk named "parameters"


@pytest.mark.parametrize(
    "sampler", [["--sampler", "euler_a"], ["--karras"], ["--sampler", "DPM++ 2M SDE Karras"]]
)
def test_from_png_reproduces_bit_identical_pixels(capsys, tmp_path: Path, sampler) -> None:
    """Stochastic samplers too, and the default "dpm++" (stored as WebUI "DPM++ 2M")."""
    first = tmp_path / "first.png"
    code, _, err = run(
        capsys,
        *("--engines", str(tiny_engines()), "--prompt", "seven: cat, moon", "--seed", "3"),
        *("--negative-prompt", "dog", *sampler, "--guidance", "5.5"),
        *("--out", str(first)),
        *FAST,
    )
    assert code == 0, err
    again = tmp_path / "again.png"
    code, _, err = run(
        capsys,
        "--engines",
        str(tiny_engines()),
        "--from-png",
        str(first),
        "--out",
        str(again),
        "--backend",
        "onnxruntime-cpu",
        "--quiet",
    )
    assert code == 0, err
    assert np.array_equal(pixels(first), pixels(again))
    assert parse_infotext(read_infotext(again)) == parse_infotext(read_infotext(first))
    # an explicit flag overrides the stored value
    other = tmp_path / "other.png"
    run(
        capsys,
        "--engines",
        str(tiny_engines()),
        "--from-png",
        str(first),
        "--seed",
        "4",
        "--out",
        str(other),
        "--quiet",
    )
    assert not np.array_equal(pixels(first), pixels(other))


def test_default_output_names_and_batch(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run(
        capsys, "--engines", str(tiny_engines()), "--seed", "9", "--batch", "2", *FAST
    )
    assert code == 0, err
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["trt-sd-9-0.png", "trt-sd-9-1.png"]
    assert str(tmp_path / "trt-sd-9-0.png") in out  # the paths are printed
    assert "Seed: 10," in read_infotext(tmp_path / "trt-sd-9-1.png")
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".png"]  # no temp files


def test_default_engine_dir_and_timing_table(capsys, tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home"
    shutil.copytree(tiny_engines(), home / "engines" / "default")
    monkeypatch.setenv("TRT_SD_HOME", str(home))
    code, out, err = run(capsys, "--seed", "1", "--steps", "2", "--out", str(tmp_path / "x.png"))
    assert code == 0, err
    assert "unet (2 calls)" in out and "total" in out
    assert "unet" in err  # the tqdm progress bar goes to stderr


def test_img2img_from_the_cli(capsys, tmp_path: Path) -> None:
    Image.new("RGB", (16, 16), (0, 128, 255)).save(tmp_path / "init.png")
    out_png = tmp_path / "i2i.png"
    args = [
        "--engines",
        str(tiny_engines()),
        "--image",
        str(tmp_path / "init.png"),
        "--strength",
        "0.5",
        "--seed",
        "2",
        "--out",
        str(out_png),
        *FAST,
    ]
    assert run(capsys, *args)[0] == 0
    assert "Denoising strength: 0.5" in read_infotext(out_png)
    code, _, err = run(
        capsys,
        "--engines",
        str(tiny_engines()),
        "--from-png",
        str(out_png),
        "--out",
        str(tmp_path / "again.png"),
        "--quiet",
    )
    assert code == 2 and "--image" in err
    code, _, err = run(
        capsys,
        "--engines",
        str(tiny_engines()),
        "--from-png",
        str(out_png),
        "--image",
        str(tmp_path / "init.png"),
        "--out",
        str(tmp_path / "b.png"),
        "--quiet",
    )
    assert code == 0, err
    assert np.array_equal(pixels(out_png), pixels(tmp_path / "b.png"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--height", "20"], "multiple of 8"),
        (["--width", "64"], "outside the range"),
        (["--batch", "9"], "outside the range"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--sampler", "nope"], "nope"),
        (["--strength", "0.5"], "--image"),
        (["--from-png", "/nonexistent.png"], "not a readable PNG"),
        (["--height", "32.5"], "invalid int value"),  # argparse's own errors: one line too
        (["--bogus"], "unrecognized arguments"),
        (["--guidance", "1e300"], "latents became NaN or inf"),  # no NumPy warnings either
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path: Path, argv, message) -> None:
    code, _, err = run(
        capsys, "--engines", str(tiny_engines()), *argv, "--out", str(tmp_path / "x.png"), *FAST[2:]
    )
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bad_engine_directories(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "--engines", str(tmp_path / "missing"), "--quiet")
    assert code == 2 and "does not exist" in err
    newer = Path(shutil.copytree(tiny_engines(), tmp_path / "newer"))
    manifest = json.loads((newer / "manifest.json").read_text("utf-8"))
    manifest["schema_version"] += 1
    (newer / "manifest.json").write_text(json.dumps(manifest), "utf-8")
    code, _, err = run(capsys, "--engines", str(newer), "--quiet")
    assert code == 2 and "newer" in err and err.count("\n") == 1


def test_missing_output_directory(capsys, tmp_path: Path) -> None:
    code, _, err = run(
        capsys, "--engines", str(tiny_engines()), "--out", str(tmp_path / "no" / "x.png"), "--quiet"
    )
    assert code == 2 and "does not exist" in err


def test_unwritable_outputs_leave_nothing_behind(capsys, tmp_path: Path, monkeypatch) -> None:
    """A batch whose second file cannot be written is refused before generating, and a
    failure while writing leaves none of the batch's images (all or nothing)."""
    (tmp_path / "h-1.png").mkdir()
    out = str(tmp_path / "h.png")
    code, _, err = run(
        capsys, "--engines", str(tiny_engines()), "--batch", "2", "--out", out, *FAST
    )
    assert code == 2 and err.count("\n") == 1 and "is a directory" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h-1.png"]

    from trt_sd.models.errors import InputError
    from trt_sd.runtime.infotext import write_pngs

    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(InputError, match="cannot write"):
        write_pngs([(tmp_path / "a.png", image, "x"), (tmp_path / "no" / "b.png", image, "x")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h-1.png"]  # a.png not left either


def test_debug_zero_keeps_one_line_errors(capsys, monkeypatch) -> None:
    monkeypatch.setenv("TRT_SD_DEBUG", "0")
    code, _, err = run(capsys, "--engines", str(tiny_engines()), "--steps", "0", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
