"""Tiny Stable Diffusion pipelines built from configs (no hub), shared by the tests.

``make_tiny_pipeline(folder)`` writes a complete diffusers folder (model_index.json, CLIP text
encoder + CLIP-format tokenizer files, UNet2DConditionModel with cross-attention, AutoencoderKL,
scheduler config) with random weights, small enough to export and run in a second or two.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from trt_sd.models.scheduler_configs import sd15_scheduler_config

SD15_SCHEDULER = sd15_scheduler_config()

SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
    "clip_sample": False,
}

_WORDS = [
    "a",
    "photo",
    "of",
    "an",
    "astronaut",
    "riding",
    "horse",
    "on",
    "the",
    "moon",
    "handwritten",
    "digit",
    "seven",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "eight",
    "nine",
    "number",
    "cat",
    "dog",
    "painting",
]


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_clip_tokenizer(folder: Path, words=_WORDS) -> None:
    """CLIP-format tokenizer files: byte-level vocab (+ ``</w>`` forms), merges that build the
    given words, and the special tokens, loadable by transformers' CLIPTokenizer and by the
    ``tokenizers`` library."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        symbols = [*list(word[:-1]), word[-1] + "</w>"]
        while len(symbols) > 1:  # merge left to right: a valid (if not optimal) BPE chain
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    vocab_list += [a + b for a, b in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab), "utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", "utf-8"
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            }
        ),
        "utf-8",
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        ),
        "utf-8",
    )


def make_tiny_pipeline(
    folder: Path,
    *,
    v_prediction: bool = False,
    seed: int = 0,
    sample_size: int = 8,
    hidden: int = 32,
    in_channels: int = 4,
) -> Path:
    """Write a tiny random SD 1.x (epsilon) or SD 2.x-style (v-prediction, trailing) pipeline.

    VAE scale factor 2 (two resolution levels), so 16x16 images <-> 8x8 latents; image sizes
    must still be multiples of 8 per the toolkit's rule. ``in_channels=9``: an inpainting
    UNet (latents + mask + masked-image latents), as SD 1.5 / 2 inpainting checkpoints have.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    write_clip_tokenizer(folder / "tokenizer")
    vocab_size = len(json.loads((folder / "tokenizer" / "vocab.json").read_text("utf-8")))
    text_cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    CLIPTextModel(text_cfg).eval().save_pretrained(folder / "text_encoder")
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    unet.eval().save_pretrained(folder / "unet")
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=2 * sample_size,
        layers_per_block=1,
    )
    vae.eval().save_pretrained(folder / "vae")
    sched = dict(SD21_SCHEDULER if v_prediction else SD15_SCHEDULER)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched), "utf-8")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "feature_extractor": [None, None],
                "safety_checker": [None, None],
                "requires_safety_checker": False,
                "scheduler": ["diffusers", sched["_class_name"]],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            }
        ),
        "utf-8",
    )
    return folder
