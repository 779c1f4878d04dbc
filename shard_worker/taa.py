"""TAA, threshold-aware augmentation (method.md §4), written in torch and vectorized over a batch.

Strength s_i = exp(−5·d_i) where d_i is the sample's relative distance to the AGC threshold: a
sample just above the threshold (nearly memorized) gets the strongest augmentation. The strength
is remembered per sample and used the next time the sample is drawn (the published prototype
queues kept samples for augmentation; here the queue is a per-sample strength table).
Augmentations are label-preserving: small translation, brightness, contrast, optional h-flip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memshard.config import TAAConfig


def augmentation_strength(distance: torch.Tensor) -> torch.Tensor:
    return torch.exp(-5.0 * distance)


def augment(images: torch.Tensor, strength: torch.Tensor, cfg: TAAConfig, generator: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment images in [-1, 1], each by its own strength in [0, 1]; strength 0 leaves it unchanged.
    Returns the images and each one's parameters (N, model.AUGMENTATION_PARAMS): shift x, shift y
    (fractions of the side), flip (0 or 1), contrast and brightness offsets -- all 0 for an image left
    unchanged, which is what non-leaky augmentation conditions the UNet on."""
    batch = images.shape[0]
    device, dtype = images.device, images.dtype
    s = strength.to(dtype).view(batch, 1, 1, 1)

    def uniform_pm1(*shape: int) -> torch.Tensor:  # uniform in [-1, 1]
        return torch.rand(*shape, generator=generator, device=device, dtype=dtype) * 2 - 1

    # Translation by up to max_translate of the side (affine grid: one kernel for the whole batch).
    shift = uniform_pm1(batch, 2) * cfg.max_translate * 2 * s.view(batch, 1)  # normalized coords span 2
    theta = torch.zeros(batch, 2, 3, device=device, dtype=dtype)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    flip = torch.zeros(batch, 1, 1, 1, device=device, dtype=torch.bool)
    if cfg.flip:
        flip = torch.rand(batch, generator=generator, device=device, dtype=dtype).view(batch, 1, 1, 1) < 0.5 * s
        out = torch.where(flip, out.flip(-1), out)
    # Contrast around each image's mean, then brightness; both scaled by strength.
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform_pm1(batch, 1, 1, 1) * cfg.max_contrast * s
    brightness = uniform_pm1(batch, 1, 1, 1) * cfg.max_brightness * 2 * s
    out = (out - mean) * (1 + contrast) + mean + brightness
    parameters = torch.cat([shift / 2, flip.view(batch, 1).to(dtype), contrast.view(batch, 1), brightness.view(batch, 1)], dim=1)
    return out.clamp(-1, 1), parameters
