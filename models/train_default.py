"""Training recipe of the bundled default model (``models/default``): a tiny Stable Diffusion.

    python -m trt_sd.models.train_default --out models/default

Why it exists: trt-sd needs a real text-to-image checkpoint that ships inside the wheel, so
export, the runtime and the tests run with no model hub. It is built from the very classes of
Stable Diffusion 1.5 (CLIP text encoder + CLIP BPE tokenizer, ``UNet2DConditionModel`` with
cross-attention, ``AutoencoderKL``, SD 1.5's PNDM scheduler config), only small, and trained here
on scikit-learn's 8x8 handwritten digits upsampled to 32x32 RGB, so "a handwritten digit seven"
or "the number 7" produce a recognisable 7. One seeded run, CPU only, about 15 minutes on two
idle cores (30 measured on busy ones); see docs/quality.md ("Default model") for the figures.

Stages: (1) VAE (reconstruction + small KL), (2) latent scaling factor = 1 / std of the
latents, as SD does, (3) a short text-encoder pre-training (a digit probe, standing in for
CLIP's pre-training), (4) text encoder and UNet trained together on epsilon prediction with 10%
empty prompts (so classifier-free guidance works), EMA weights kept, (5) save a diffusers
folder. ``--evaluate-only`` reloads a saved folder through diffusers and reports prompt
accuracy (``evaluate_default``).

Imports torch / diffusers / transformers; ``trt_sd.models`` itself never imports this module.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Sleep rather than spin in OpenMP barriers: on a machine whose cores are shared, spinning
# threads made a training step 4x slower (2.1 s vs 0.48 s measured). Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import digits
from .evaluate_default import evaluate
from .tokenizer_build import MODEL_MAX_LENGTH, write_clip_tokenizer

SEED = 0
TEXT_HIDDEN = 128


@dataclass(frozen=True)
class Recipe:
    """Every knob of the run; written to ``training_log.json`` beside the weights."""

    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-3  # per-pixel MSE + kl_weight * KL / pixels
    unet_steps: int = 2500
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    text_pretrain_steps: int = 200
    text_pretrain_lr: float = 1e-3
    prompt_dropout: float = 0.1
    seed: int = SEED


# ----------------------------------------------------------------------------- components
def build_text_encoder(vocab: dict[str, int]) -> CLIPTextModel:
    """A 3-layer CLIP text transformer; ``<|endoftext|>`` is the last id, as in CLIP, so both
    pooling rules (argmax id and eos id) find it."""
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    """SD 1.5's UNet layout with three levels (8x8 -> 4x4 -> 2x2 latents)."""
    return UNet2DConditionModel(
        sample_size=digits.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 64, 96),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def build_vae() -> AutoencoderKL:
    """Three resolution levels -> scale factor 4: 32x32x3 images <-> 8x8x4 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=digits.IMAGE_SIZE,
    )


def build_scheduler() -> PNDMScheduler:
    """Stable Diffusion 1.5's scheduler_config.json, unchanged."""
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )


def _add_clip_sample_false(path: Path) -> None:
    """SD 1.5's scheduler_config.json carries ``"clip_sample": false`` although PNDM ignores
    it: swapped-in DDIM (whose default is True) would otherwise clip every x0 prediction to
    [-1, 1], which wrecks latents of unit scale. Keep the key, as SD 1.5 does."""
    config = json.loads(path.read_text("utf-8"))
    config["clip_sample"] = False
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- training
def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, recipe: Recipe) -> list[float]:
    """Reconstruction + small KL on the training digits with one-pixel shifts."""
    gen = np.random.default_rng(recipe.seed + 1)
    shifted = torch.from_numpy(
        np.stack([digits.shift(pixels.numpy(), dx, dy) for dx, dy in digits.SHIFTS])
    )  # (shifts, N, 3, H, W)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    n_pixels = pixels[0].numel()
    losses: list[float] = []
    vae.train()
    bar = tqdm(range(recipe.vae_steps), desc="vae", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = recipe.vae_lr * _lr_factor(step, recipe.vae_steps, 50)
        idx = torch.from_numpy(gen.integers(0, pixels.shape[0], recipe.vae_batch))
        which = torch.from_numpy(gen.integers(0, len(digits.SHIFTS), recipe.vae_batch))
        batch = shifted[which, idx]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, batch)
        kl = posterior.kl().mean() / n_pixels
        loss = mse + recipe.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(mse.item())
        bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.3f}")
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image (the UNet samples from them)."""
    means, stds = [], []
    for chunk in torch.split(pixels, 256):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def prompt_table(tokenizer: CLIPTokenizer) -> tuple[torch.Tensor, list[list[int]]]:
    """Token ids of every training prompt (row 0 is the empty prompt) and, per digit, the rows
    holding its prompts; tokenised once so each step only indexes."""
    prompts = [""]
    rows: list[list[int]] = []
    for d in range(10):
        variants = digits.prompt_variants(d)
        rows.append(list(range(len(prompts), len(prompts) + len(variants))))
        prompts += variants
    ids = tokenizer(
        prompts, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True
    ).input_ids
    return torch.tensor(ids, dtype=torch.long), rows


def pretrain_text_encoder(
    text_encoder: CLIPTextModel, prompts: tuple[torch.Tensor, list[list[int]]], recipe: Recipe
) -> list[float]:
    """Teach the fresh text encoder which digit a prompt names (empty prompt = 11th class)
    before the UNet sees it: a stand-in for the CLIP pre-training a real SD text encoder has.

    Why: trained only through the UNet's cross-attention, a from-scratch text encoder took
    >1000 steps to carry the digit at all (17% prompt accuracy at 1000 steps). A linear probe
    on the mean of *all 77* output positions makes every position, pads included, informative,
    so cross-attention (near-uniform at first, i.e. a mean over positions) sees the digit from
    its first step. The probe head is thrown away.
    """
    table, rows = prompts
    targets = torch.full((len(table),), 10, dtype=torch.long)
    for digit, digit_rows in enumerate(rows):
        targets[digit_rows] = digit
    head = torch.nn.Linear(TEXT_HIDDEN, 11)
    params = list(text_encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.text_pretrain_lr, weight_decay=0.01)
    gen = np.random.default_rng(recipe.seed + 3)
    losses: list[float] = []
    text_encoder.train()
    for _ in tqdm(range(recipe.text_pretrain_steps), desc="text", unit="step"):
        pick = torch.from_numpy(gen.integers(0, len(table), 64))
        logits = head(text_encoder(table[pick])[0].mean(dim=1))
        loss = torch.nn.functional.cross_entropy(logits, targets[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_denoiser(
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    prompts: tuple[torch.Tensor, list[list[int]]],
    latents: tuple[torch.Tensor, torch.Tensor],
    labels: np.ndarray,
    scaling_factor: float,
    recipe: Recipe,
    on_checkpoint: Callable[[int, CLIPTextModel, UNet2DConditionModel], None] | None = None,
    checkpoint_every: int = 500,
) -> tuple[list[float], CLIPTextModel, UNet2DConditionModel]:
    """Epsilon prediction on SD's noise schedule; returns losses and the EMA copies.

    ``on_checkpoint(step, ema_text, ema_unet)`` is called every ``checkpoint_every`` steps
    (used to size the run: prompt accuracy against steps)."""
    gen = np.random.default_rng(recipe.seed + 2)
    table, rows = prompts
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, 0).float()
    mean, std = latents
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.01)
    ema_text, ema_unet = copy.deepcopy(text_encoder), copy.deepcopy(unet)
    ema_params = list(ema_text.parameters()) + list(ema_unet.parameters())
    losses: list[float] = []
    text_encoder.train()
    unet.train()
    bar = tqdm(range(recipe.unet_steps), desc="unet+text", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = recipe.unet_lr * _lr_factor(step, recipe.unet_steps, recipe.warmup_steps)
        idx = gen.integers(0, len(labels), recipe.unet_batch)
        prompt_rows = np.array([gen.choice(rows[c]) for c in labels[idx]])
        prompt_rows[gen.random(recipe.unet_batch) < recipe.prompt_dropout] = 0
        unique, inverse = np.unique(prompt_rows, return_inverse=True)
        t_idx = torch.from_numpy(idx)
        z = (mean[t_idx] + std[t_idx] * torch.randn_like(std[t_idx])) * scaling_factor
        noise = torch.randn_like(z)
        t = torch.from_numpy(gen.integers(0, 1000, recipe.unet_batch))
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1.0 - a).sqrt() * noise
        hidden = text_encoder(table[torch.from_numpy(unique)])[0][torch.from_numpy(inverse)]
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if on_checkpoint is not None and (step + 1) % checkpoint_every == 0:
            ema_text.eval()
            ema_unet.eval()
            on_checkpoint(step + 1, ema_text, ema_unet)
    ema_text.eval()
    ema_unet.eval()
    return losses, ema_text, ema_unet


# ----------------------------------------------------------------------------- save
def save_model(
    out: Path,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    holdout: np.ndarray,
    log: dict,
) -> None:
    """A diffusers folder (model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/)
    in safetensors, plus holdout.json and training_log.json."""
    from diffusers import StableDiffusionPipeline

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")  # fresh: no padding state
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    _add_clip_sample_false(out / "scheduler" / "scheduler_config.json")
    # save_pretrained writes tokenizer.json; keep the classic CLIP files beside it too.
    write_clip_tokenizer(out / "tokenizer", digits.vocabulary_words())
    digits.save_holdout(out, holdout, log["recipe"]["seed"])
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    for path in out.rglob("*"):  # safetensors writes 0600 files; the wheel must ship readable
        if path.is_file():
            path.chmod(0o644)


# ----------------------------------------------------------------------------- main
def train(out: Path, recipe: Recipe) -> dict:
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    images8, labels = digits.load_digits_8x8()
    train_idx, holdout = digits.holdout_split(labels, fraction=0.1, seed=recipe.seed)
    pixels = torch.from_numpy(digits.upsample(images8[train_idx]))
    vocab = write_clip_tokenizer(out / "tokenizer", digits.vocabulary_words())
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")

    text_encoder, unet, vae = build_text_encoder(vocab), build_unet(), build_vae()
    vae_losses = train_vae(vae, pixels, recipe)
    timings["vae_s"] = time.perf_counter() - start

    mean, std = encode_latents(vae, pixels)
    sampled = mean + std * torch.randn_like(std)
    scaling_factor = float(1.0 / sampled.std())
    vae.register_to_config(scaling_factor=scaling_factor)

    t0 = time.perf_counter()
    prompts = prompt_table(tokenizer)
    text_losses = pretrain_text_encoder(text_encoder, prompts, recipe)
    unet_losses, ema_text, ema_unet = train_denoiser(
        text_encoder, unet, prompts, (mean, std), labels[train_idx], scaling_factor, recipe
    )
    timings["unet_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start

    def curve(losses: list[float], every: int) -> list[float]:
        return [
            round(float(np.mean(losses[i : i + every])), 5) for i in range(0, len(losses), every)
        ]

    log = {
        "recipe": asdict(recipe),
        "params": {
            "text_encoder": param_count(ema_text),
            "unet": param_count(ema_unet),
            "vae": param_count(vae),
        },
        "scaling_factor": scaling_factor,
        "vocab_size": len(vocab),
        "train_images": len(train_idx),
        "holdout_images": len(holdout),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "vae_mse_per_50": curve(vae_losses, 50),
        "text_probe_loss_per_50": curve(text_losses, 50),
        "unet_loss_per_100": curve(unet_losses, 100),
        "torch": torch.__version__,
    }
    save_model(out, ema_text, ema_unet, vae, holdout, log)
    return log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/default"))
    parser.add_argument("--vae-steps", type=int, default=Recipe.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=Recipe.unet_steps)
    parser.add_argument("--evaluate-only", action="store_true", help="skip training")
    parser.add_argument("--per-digit", type=int, default=10, help="evaluation images per digit")
    parser.add_argument("--grid", type=Path, default=None, help="write a sample grid PNG here")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads (2 = the reference machine; 1 runs better on a busy machine)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.evaluate_only:
        recipe = Recipe(vae_steps=args.vae_steps, unet_steps=args.unet_steps)
        log = train(args.out, recipe)
        print(json.dumps({k: log[k] for k in ("params", "scaling_factor", "timings_s")}))
    result = evaluate(args.out, per_digit=args.per_digit, grid=args.grid)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
