"""Per-sample DDPM loss at fixed, seeded (t, ε): comparable across proxies, rounds and models.

The (t, ε) of a sample depend only on (seed, its global index, repeat), never on which batch or
shard it is scored in: noise is drawn per block of 1,024 consecutive indices from a generator
seeded with (seed, block). That is what lets MSR's least-familiar rule compare proxies on the same
draws, and an unlearning audit compare a model before and after on the same draws.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from memshard.model import denoise, noised, to_model_range

BLOCK = 1024


def fixed_timesteps_and_noise(
    seed: int, indices: np.ndarray, shape: tuple[int, int, int], num_timesteps: int, repeats: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, ε) of shape (repeats, n) and (repeats, n, C, H, W) on the CPU, a function of (seed, index)."""
    indices = np.asarray(indices, dtype=np.int64)
    timesteps = torch.empty(repeats, len(indices), dtype=torch.long)
    noise = torch.empty(repeats, len(indices), *shape)
    for block in np.unique(indices // BLOCK):
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(block))
        block_t = torch.randint(0, num_timesteps, (repeats, BLOCK), generator=generator)
        block_noise = torch.randn(repeats, BLOCK, *shape, generator=generator)
        where = np.nonzero(indices // BLOCK == block)[0]
        offsets = torch.from_numpy(indices[where] % BLOCK)
        timesteps[:, where] = block_t[:, offsets]
        noise[:, where] = block_noise[:, offsets]
    return timesteps, noise


def per_sample_loss(
    model: UNet2DModel, scheduler: DDPMScheduler, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
    augmentation: torch.Tensor | None = None,
) -> torch.Tensor:
    """ℓ_i = mean over pixels of (ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t) − ε)², one value per sample
    (`augmentation`: x0's TAA parameters, for a UNet conditioned on them; None: no augmentation)."""
    noisy, _ = noised(scheduler.alphas_cumprod.to(x0.device), x0, timesteps, noise)
    prediction = denoise(model, noisy, timesteps, augmentation)
    return ((prediction.float() - noise.float()) ** 2).mean(dim=(1, 2, 3))


@torch.no_grad()
def score_samples(
    model: UNet2DModel,
    scheduler: DDPMScheduler,
    images_uint8: np.ndarray,
    indices: np.ndarray,
    seed: int,
    repeats: int = 4,
    batch_size: int = 256,
) -> np.ndarray:
    """Mean loss over `repeats` fixed draws for each of `images_uint8[indices]` (eval mode, no dropout)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    indices = np.asarray(indices, dtype=np.int64)
    shape = tuple(images_uint8.shape[1:])
    losses = np.zeros(len(indices), dtype=np.float64)
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            x0 = to_model_range(torch.from_numpy(np.ascontiguousarray(images_uint8[chunk])).to(device))
            timesteps, noise = fixed_timesteps_and_noise(seed, chunk, shape, scheduler.config.num_train_timesteps, repeats)
            for r in range(repeats):
                loss = per_sample_loss(model, scheduler, x0, timesteps[r].to(device), noise[r].to(device))
                losses[start : start + len(chunk)] += loss.double().cpu().numpy() / repeats
    finally:
        model.train(was_training)
    return losses
