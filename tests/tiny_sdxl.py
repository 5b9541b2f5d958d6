"""A tiny random SDXL base pipeline built from configs (no hub), for export and parity tests.

Same structure as ``stabilityai/stable-diffusion-xl-base-1.0``: CLIP-L-style ``CLIPTextModel``
and bigG-style ``CLIPTextModelWithProjection`` (different hidden sizes, so a mix-up of the two
fails), a UNet with ``addition_embed_type="text_time"`` (pooled text embedding +
6 micro-conditioning values), an AutoencoderKL with SDXL's scaling factor, the Euler
scheduler config SDXL ships, and ``tokenizer_2`` padding with ``!`` as bigG's does.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_pipeline import write_clip_tokenizer

SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
}
HIDDEN, HIDDEN_2, PROJECTION, TIME_DIM = 32, 48, 40, 8


def _text_config(vocab_size: int, hidden: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        **extra,
    )


def make_tiny_sdxl(
    folder: Path, *, seed: int = 0, sample_size: int = 8, in_channels: int = 4
) -> Path:
    """Write the tiny SDXL base pipeline to ``folder`` (16x16 images <-> 8x8 latents);
    ``in_channels=9``: an inpainting UNet, as SDXL inpainting checkpoints have."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / "tokenizer_2" / name
        data = json.loads(path.read_text("utf-8"))
        data["pad_token"] = "!"
        path.write_text(json.dumps(data), "utf-8")
    vocab_size = len(json.loads((folder / "tokenizer" / "vocab.json").read_text("utf-8")))
    CLIPTextModel(_text_config(vocab_size, HIDDEN)).eval().save_pretrained(folder / "text_encoder")
    CLIPTextModelWithProjection(
        _text_config(vocab_size, HIDDEN_2, projection_dim=PROJECTION, hidden_act="gelu")
    ).eval().save_pretrained(folder / "text_encoder_2")
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN + HIDDEN_2,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=PROJECTION + 6 * TIME_DIM,
        transformer_layers_per_block=(1, 2),
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
        scaling_factor=0.13025,
        force_upcast=True,
    )
    vae.eval().save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER), "utf-8")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionXLPipeline",
                "_diffusers_version": "0.42.1",
                "force_zeros_for_empty_prompt": True,
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            }
        ),
        "utf-8",
    )
    return folder


def make_tiny_sdxl_refiner(folder: Path, *, seed: int = 1, sample_size: int = 8) -> Path:
    """A tiny SDXL refiner: bigG-style encoder alone (its tokenizer in ``tokenizer_2``), a
    text-time UNet with 5 micro-conditioning values (aesthetic score), SDXL's VAE settings;
    ``model_index.json`` as the refiner ships it (no CLIP-L, aesthetic score required, empty
    prompts not zeroed)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    write_clip_tokenizer(folder / "tokenizer_2")
    vocab_size = len(json.loads((folder / "tokenizer_2" / "vocab.json").read_text("utf-8")))
    CLIPTextModelWithProjection(
        _text_config(vocab_size, HIDDEN_2, projection_dim=PROJECTION, hidden_act="gelu")
    ).eval().save_pretrained(folder / "text_encoder_2")
    UNet2DConditionModel(
        sample_size=sample_size,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN_2,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=PROJECTION + 5 * TIME_DIM,
        norm_num_groups=16,
    ).eval().save_pretrained(folder / "unet")
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        norm_num_groups=16,
        sample_size=2 * sample_size,
        layers_per_block=1,
        scaling_factor=0.13025,
    ).eval().save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER), "utf-8")
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline",
        "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": False,
        "requires_aesthetics_score": True,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index), "utf-8")
    return folder
