"""LoRA file reading and refusals: one line naming the file and the problem, InputError in the
API, exit code 2 on the CLI; the engines keep serving the base model afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from runtime_engines import tiny_engines

from trt_sd.models.errors import InputError
from trt_sd.models.lora import LoraLayer, layer_delta, parse_lora_arg, read_lora
from trt_sd.runtime import Pipeline
from trt_sd.runtime.cli import main

safetensors_numpy = pytest.importorskip("safetensors.numpy")

UNET_Q = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _unet_q_shape() -> tuple[int, int]:
    weights = json.loads((tiny_engines() / "unet.lora.json").read_text())["weights"]
    ref = weights["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    return tuple(ref["shape"][::-1]) if ref["transposed"] else tuple(ref["shape"])


def _kohya(tmp: Path, name: str = "good", **override: np.ndarray) -> Path:
    out_dim, in_dim = _unet_q_shape()
    rng = np.random.default_rng(0)
    tensors = {
        f"lora_unet_{UNET_Q}.lora_down.weight": rng.standard_normal((2, in_dim), np.float32),
        f"lora_unet_{UNET_Q}.lora_up.weight": rng.standard_normal((out_dim, 2), np.float32),
        f"lora_unet_{UNET_Q}.alpha": np.array(1.0, np.float32),
    }
    tensors.update(override)
    tensors = {k: v for k, v in tensors.items() if v.size or v.ndim == 0}
    path = tmp / f"{name}.safetensors"
    safetensors_numpy.save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    out_dim, in_dim = _unet_q_shape()
    nan = np.full((out_dim, 2), np.nan, np.float32)
    pickle = tmp / "model.ckpt"
    pickle.write_bytes(b"\x80\x04junk")
    garbage = tmp / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    empty = np.zeros((0,), np.float32)
    down = f"lora_unet_{UNET_Q}.lora_down.weight"
    up = f"lora_unet_{UNET_Q}.lora_up.weight"
    rng = np.random.default_rng(1)
    return {
        "missing": (tmp / "nope.safetensors", "does not exist"),
        "pickle": (pickle, "only .safetensors"),
        "garbage": (garbage, "not a .safetensors file"),
        "nan": (_kohya(tmp, "nan", **{up: nan}), "NaN or inf"),
        "rank": (
            _kohya(tmp, "rank", **{up: rng.standard_normal((out_dim, 3), np.float32)}),
            "rank mismatch",
        ),
        "no_up": (_kohya(tmp, "no_up", **{up: empty}), "no lora_up"),
        "other_family": (
            _kohya(
                tmp,
                "sdxl",
                **{
                    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (
                        rng.standard_normal((2, 8), np.float32)
                    ),
                    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": (
                        rng.standard_normal((8, 2), np.float32)
                    ),
                },
            ),
            "text_encoder_2",
        ),
        "no_module": (
            _kohya(
                tmp,
                "nomodule",
                **{
                    "lora_unet_down_blocks_7_attn9_to_q.lora_down.weight": rng.standard_normal(
                        (2, in_dim), np.float32
                    ),
                    "lora_unet_down_blocks_7_attn9_to_q.lora_up.weight": rng.standard_normal(
                        (out_dim, 2), np.float32
                    ),
                },
            ),
            "modules this model does not have",
        ),
        "shape": (
            _kohya(tmp, "shape", **{down: rng.standard_normal((2, in_dim + 3), np.float32)}),
            "does not fit",
        ),
    }


CASES = [
    "missing",
    "pickle",
    "garbage",
    "nan",
    "rank",
    "no_up",
    "other_family",
    "no_module",
    "shape",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_lora_is_one_line_and_engines_untouched(pipe, tmp_path, case) -> None:
    path, problem = _bad_files(tmp_path)[case]
    base = pipe("a cat", steps=2, seed=4).images[0]
    good = _kohya(tmp_path)
    with pytest.raises(InputError) as err:
        pipe("a cat", steps=2, seed=4, loras=[(good, 1.0), (path, 1.0)])
    message = str(err.value)
    assert "\n" not in message and path.name in message and problem in message, message
    assert np.array_equal(pipe("a cat", steps=2, seed=4).images[0], base)


def test_cli_lora(capsys, tmp_path) -> None:
    good, out = _kohya(tmp_path), tmp_path / "x.png"
    args = ["run", "--engines", str(tiny_engines()), "--steps", "2", "--seed", "1", "--quiet"]
    assert main([*args, "--out", str(out), "--lora", f"{good}:0.5"]) == 0
    from trt_sd.runtime.infotext import read_infotext

    assert 'Lora hashes: "good: ' in read_infotext(out)
    assert main([*args, "--lora", str(tmp_path / "nan.ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nan.ckpt" in err[0], err


def test_lora_arg_parsing() -> None:
    assert parse_lora_arg("a.safetensors:0.5").scale == 0.5
    assert parse_lora_arg("dir:x/a.safetensors").path == Path("dir:x/a.safetensors")
    with pytest.raises(InputError):
        parse_lora_arg("a.safetensors:99")


def test_bf16_files_read_as_their_values(tmp_path) -> None:
    """bfloat16 (common in the wild, unsupported by NumPy) is decoded from its bit pattern."""
    values = np.array([[1.5, -2.0], [0.15625, 3.0]], np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    header = {
        "lora_unet_x.lora_down.weight": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
        "lora_unet_x.lora_up.weight": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bits.tobytes() * 2)
    layer = read_lora(path).layers[0]
    assert np.array_equal(layer.down, values) and np.array_equal(layer.up, values)


def test_locon_tucker_delta_matches_the_factored_convolution() -> None:
    """LoCon's mid core: delta[o,i,h,w] = sum up[o,a] mid[a,b,h,w] down[b,i]."""
    rng = np.random.default_rng(0)
    down = rng.standard_normal((3, 5, 1, 1)).astype(np.float32)
    mid = rng.standard_normal((3, 3, 3, 3)).astype(np.float32)
    up = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    layer = LoraLayer("unet", "x", True, down, up, 0.5, mid)
    expected = np.zeros((4, 5, 3, 3), np.float32)
    for o in range(4):
        for i in range(5):
            for a in range(3):
                for b in range(3):
                    expected[o, i] += up[o, a, 0, 0] * mid[a, b] * down[b, i, 0, 0]
    np.testing.assert_allclose(
        layer_delta(layer, (4, 5, 3, 3)), 0.5 * expected, rtol=1e-5, atol=1e-6
    )


def test_engines_without_maps_and_openvino_refuse_in_one_line(tmp_path) -> None:
    """Engines exported before run-time LoRA (no weight maps) and the OpenVINO backend (no
    weight patching) refuse with what to do instead."""
    import shutil

    good = _kohya(tmp_path)
    old = tmp_path / "old"
    shutil.copytree(tiny_engines(), old)
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["components"].values():
        entry.pop("lora_map", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"no LoRA weight maps.*re-export"):
        Pipeline.load(old, backend="onnxruntime-cpu")("a cat", steps=2, loras=[good])
    pytest.importorskip("openvino")
    pipe = Pipeline.load(tiny_engines(), backend="openvino-fp32")
    with pytest.raises(InputError, match="cannot apply run-time LoRAs") as err:
        pipe("a cat", steps=2, loras=[good])
    assert "\n" not in str(err.value)
