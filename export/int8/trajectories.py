"""Whole sampler trajectories of the fp32 pipeline (torch), with every UNet call captured.

Calibration and the accuracy report both need what the UNet really sees in use: the latents
of every denoising step, their timesteps and the text embeddings, classifier-free-guidance
halves included (TensorRT's diffusion recipe and Q-Diffusion calibrate across all timesteps for
the same reason: activation ranges drift strongly from the noisy to the clean end).

The loop is diffusers' DPM++ 2M (``DPMSolverMultistepScheduler``, the checkpoint's own scheduler
config) with classifier-free guidance as diffusers' pipelines apply it. ``unet_fn`` is any
``(sample, timestep, *conditioning) -> output`` on NumPy arrays (the UNet descriptor's inputs
in order: SD's context; SDXL's context, pooled text embedding and time ids), so the same loop
runs the fp32 torch UNet and an INT8 ONNX Runtime session from the same noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .conditioning import Conditioning, num_rows, stack, take

UnetFn = Callable[..., np.ndarray]
SAMPLER = "DPM++ 2M (diffusers DPMSolverMultistepScheduler, the checkpoint's scheduler config)"
#: Latent pixels per chunk of trajectories sampled together (bounds the UNet batch).
CHUNK_LATENT_PIXELS = 4096


@dataclass
class Trajectories:
    """Every UNet call of a set of trajectories, one row per UNet batch row.

    Rows of one call are ``[uncond..., cond...]`` as the UNet receives them with CFG.
    """

    samples: np.ndarray  # (N, C, h, w) float32
    timesteps: np.ndarray  # (N,) float32
    text_index: np.ndarray  # (N,) int64, row of each ``text_table`` input
    text_table: Conditioning  # {UNet conditioning input: (P, ...) float32}, row 0 = uncond
    step_index: np.ndarray  # (N,) int64, 0 = first (noisiest) step
    outputs: np.ndarray  # (N, C, h, w) float32, the UNet output for the row
    final_latents: np.ndarray  # (B, C, h, w), one per trajectory

    def __len__(self) -> int:
        return len(self.timesteps)

    def inputs(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """The UNet inputs of ``rows`` in the UNet descriptor's order (sample, timestep, then
        the conditioning): what the wrapper, the ONNX graph and a UnetFn take positionally."""
        text = take(self.text_table, self.text_index[rows])
        return (self.samples[rows], self.timesteps[rows], *text.values())


def torch_unet_fn(module: torch.nn.Module) -> UnetFn:
    """Wrap the descriptor-shaped UNet module as a NumPy function."""

    @torch.no_grad()
    def run(*inputs: np.ndarray) -> np.ndarray:
        out = module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in inputs))
        return out.float().numpy()

    return run


def trajectory_noise(seed: int, index: int, shape: Sequence[int]) -> np.ndarray:
    """The starting noise of trajectory ``index``: independent of chunking and batch size, so
    fp32 and INT8 runs (and calibration vs report) start from exactly the same latents."""
    return np.random.default_rng([seed, index]).standard_normal(shape).astype(np.float32)


def sample_trajectories(
    unet_fn: UnetFn,
    conditioning: Mapping[str, np.ndarray],
    uncond: Mapping[str, np.ndarray],
    scheduler_config: dict,
    *,
    latent_shape: Sequence[int],
    steps: int,
    guidance: float,
    seed: int,
    capture: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> Trajectories:
    """Sample one trajectory per row of ``conditioning`` (``{UNet input: (B, ...)}``) with CFG
    against ``uncond`` (the same inputs, one row: the empty negative prompt)."""
    from diffusers import DPMSolverMultistepScheduler

    total = num_rows(conditioning)
    chunk = max(1, CHUNK_LATENT_PIXELS // int(np.prod(latent_shape[1:])))
    table = stack(uncond, conditioning)
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("x", "t", "txt", "step", "out")}
    finals = []
    for start in range(0, total, chunk):
        index = np.arange(start, min(start + chunk, total))
        scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(steps)
        noise = np.stack([trajectory_noise(seed, int(i), latent_shape) for i in index])
        latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
        text_rows = np.concatenate([np.zeros(len(index), np.int64), index + 1])
        text = tuple(take(table, text_rows).values())
        for step, t in enumerate(scheduler.timesteps):
            x_in = scheduler.scale_model_input(latents, t).float().numpy()
            x2 = np.concatenate([x_in, x_in])
            t2 = np.full((len(x2),), float(t), dtype=np.float32)
            out = unet_fn(x2, t2, *text)
            uncond_out, cond_out = np.split(out, 2)
            guided = uncond_out + guidance * (cond_out - uncond_out)
            latents = scheduler.step(torch.from_numpy(guided), t, latents).prev_sample
            if capture:
                rows["x"].append(x2)
                rows["t"].append(t2)
                rows["txt"].append(text_rows)
                rows["step"].append(np.full(len(x2), step, np.int64))
                rows["out"].append(out.astype(np.float32))
        finals.append(latents.float().numpy())
        if on_chunk is not None:
            on_chunk(len(index))
    shape = (0, *latent_shape)

    def cat(key: str, empty_shape: tuple, dtype: type) -> np.ndarray:
        return np.concatenate(rows[key]) if rows[key] else np.zeros(empty_shape, dtype)

    return Trajectories(
        samples=cat("x", shape, np.float32),
        timesteps=cat("t", (0,), np.float32),
        text_index=cat("txt", (0,), np.int64),
        text_table=table,
        step_index=cat("step", (0,), np.int64),
        outputs=cat("out", shape, np.float32),
        final_latents=np.concatenate(finals),
    )


@torch.no_grad()
def decode_images(
    vae_decoder: torch.nn.Module, latents: np.ndarray, scaling_factor: float
) -> np.ndarray:
    """Final latents -> images in [-1, 1] with the fp32 VAE decoder (as the runtime does)."""
    images = []
    for chunk in np.array_split(latents, max(1, len(latents) // 16)):
        x = torch.from_numpy(np.ascontiguousarray(chunk)) / scaling_factor
        images.append(vae_decoder(x).float().clamp(-1, 1).numpy())
    return np.concatenate(images)
