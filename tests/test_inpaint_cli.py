"""``trt-sd run --image PATH --mask PATH``: the same image as the API, bad input in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runtime_engines import SIZE, tiny_engines

from trt_sd.runtime import Pipeline
from trt_sd.runtime.cli import main
from trt_sd.runtime.infotext import parse_infotext, read_infotext


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("inpaint-cli")
    image = np.random.default_rng(2).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[2:10, 4:12] = 255
    Image.fromarray(image).save(folder / "image.png")
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(folder / "black.png")
    return folder / "image.png", folder / "mask.png", folder / "black.png"


def test_cli_inpaints_as_the_api(capsys, tmp_path: Path, files) -> None:
    image, mask, _ = files
    out = tmp_path / "out.png"
    common = ["--prompt", "cat", "--steps", "3", "--seed", "4", "--sampler", "euler"]
    code, _, err = run(
        capsys,
        "--engines",
        str(tiny_engines()),
        *common,
        "--image",
        str(image),
        "--mask",
        str(mask),
        "--mask-blur",
        "1",
        "--out",
        str(out),
        "--quiet",
    )
    assert code == 0, err
    pipe = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    api = pipe("cat", steps=3, seed=4, sampler="euler", image=image, mask=mask, mask_blur=1)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), api.images[0])
    stored = parse_infotext(read_infotext(out))
    assert stored["mask_blur"] == 1.0 and stored["strength"] == 1.0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mask", "MASK"], "pass the image to repaint too"),
        (["--image", "IMAGE", "--mask", "BLACK"], "mask has no white pixels"),
        (["--image", "IMAGE", "--mask-blur", "2"], "--mask-blur needs --mask"),
        (["--image", "IMAGE", "--mask", "/no/such/mask.png"], "mask '/no/such/mask.png' is not"),
        (["--image", "IMAGE", "--mask", "MASK", "--mask-blur", "99"], "mask_blur must be in"),
    ],
)
def test_cli_bad_inpaint_input_is_one_line(capsys, files, flags, message) -> None:
    paths = dict(zip(("IMAGE", "MASK", "BLACK"), map(str, files), strict=True))
    argv = [paths.get(f, f) for f in flags]
    code, _, err = run(capsys, "--engines", str(tiny_engines()), "--steps", "2", "--quiet", *argv)
    assert code == 2 and message in err and err.count("\n") == 1, err
