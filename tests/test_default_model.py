"""The bundled default model (models/default): a real, loadable Stable Diffusion folder that
draws the digit it is asked for.

Loads it the way users and the export stage do (diffusers / transformers, offline, local folder)
and checks the contracts the runtime relies on (77-token CLIP tokenizer, SD 1.5 scheduler config,
VAE factor and scaling factor), then generates a few digits and has the held-out-trained judge
read them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from trt_sd.models import digits
from trt_sd.models.paths import DEFAULT_MODEL_DIR

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

MAX_BYTES = 20 * 1024 * 1024
COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")


def _config(component: str, name: str = "config.json") -> dict:
    return json.loads((DEFAULT_MODEL_DIR / component / name).read_text())


def test_folder_layout_and_size() -> None:
    index = json.loads((DEFAULT_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for component in COMPONENTS:
        assert index[component][1], component
        assert (DEFAULT_MODEL_DIR / component).is_dir(), component
    weights = sorted(DEFAULT_MODEL_DIR.glob("*/*.safetensors"))
    assert [w.parent.name for w in weights] == ["text_encoder", "unet", "vae"]
    total = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.rglob("*") if f.is_file())
    assert total <= MAX_BYTES, f"default model is {total / 2**20:.1f} MiB"


def test_scheduler_config_is_sd15() -> None:
    config = _config("scheduler", "scheduler_config.json")
    assert config["_class_name"] in ("PNDMScheduler", "DDIMScheduler")
    expected = {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "skip_prk_steps": True,
    }
    assert {k: config[k] for k in expected} == expected


def test_component_shapes_agree() -> None:
    text, unet, vae = _config("text_encoder"), _config("unet"), _config("vae")
    assert text["max_position_embeddings"] == 77
    assert unet["cross_attention_dim"] == text["hidden_size"]
    assert unet["in_channels"] == vae["latent_channels"] == 4
    vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    assert vae_factor * unet["sample_size"] == vae["sample_size"] == digits.IMAGE_SIZE
    # A measured 1 / std of the latents, not SD's 0.18215 copied over.
    assert 0.05 < vae["scaling_factor"] < 20 and vae["scaling_factor"] != 0.18215


def test_tokenizer_round_trip(tmp_path) -> None:
    from tokenizers import Tokenizer

    folder = DEFAULT_MODEL_DIR / "tokenizer"
    tok = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert tok.model_max_length == 77
    ids = tok("A handwritten digit Seven", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert tok.convert_ids_to_tokens(ids[:6]) == [
        "<|startoftext|>",
        "a</w>",
        "handwritten</w>",
        "digit</w>",
        "seven</w>",
        "<|endoftext|>",
    ]
    assert ids[6:] == [tok.pad_token_id] * 71 and tok.pad_token_id == tok.eos_token_id
    assert tok.eos_token_id == len(tok) - 1  # CLIP's layout: <|endoftext|> is the last id
    # Numerals are single-byte tokens; text outside the prompt set still encodes byte-wise.
    assert tok.convert_ids_to_tokens(tok("the number 7").input_ids)[1:4] == [
        "the</w>",
        "number</w>",
        "7</w>",
    ]
    assert tok.decode(tok("zebra 42!").input_ids, skip_special_tokens=True) == "zebra 4 2 !"

    # The tokenizers library reads tokenizer.json alone and agrees.
    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for prompt in ("a handwritten digit seven", "the number 7", "digit 3", ""):
        assert fast.encode(prompt).ids == tok(prompt).input_ids, prompt

    # vocab.json + merges.txt alone (SD 1.5's classic files) give the same ids.
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    classic = transformers.CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for prompt in ("a handwritten digit nine", "number 0", "zebra"):
        assert classic(prompt).input_ids == tok(prompt).input_ids, prompt


def test_holdout_is_the_seeded_split() -> None:
    _, labels = digits.load_digits_8x8()
    held = digits.read_holdout(DEFAULT_MODEL_DIR)
    _, expected = digits.holdout_split(labels, fraction=0.1, seed=0)
    assert np.array_equal(held, expected)
    assert len(held) == 179 and np.bincount(labels[held]).min() >= 17


def test_generated_digits_match_their_prompts() -> None:
    """Ten steps of DPM++ 2M with CFG 5, one image per digit, read by the judge."""
    from trt_sd.models.evaluate_default import generate_digits, load_pipeline

    torch.set_num_threads(2)
    pipe = load_pipeline(DEFAULT_MODEL_DIR)
    assert pipe.unet.dtype == torch.float32
    images = generate_digits(pipe, list(range(10)), steps=10, guidance=5.0, seed=1)
    assert images.shape == (10, 3, 32, 32) and np.isfinite(images).all()
    predicted = digits.DigitJudge(DEFAULT_MODEL_DIR).predict(images)
    correct = int(np.sum(predicted == np.arange(10)))
    assert correct >= 8, f"only {correct}/10 digits drawn as prompted: {predicted.tolist()}"
