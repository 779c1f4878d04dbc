"""The model every layer shares: the UNet and noise schedule built from the config, where it runs,
the pixel range it is trained in, how an image is noised (method.md notation), and the per-sample
loss at fixed, seeded (t, ε) that training, MSR and the unlearning audit compare models by."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from memshard.config import Config
from memshard.errors import MemshardError

# Non-leaky augmentation (Karras et al., EDM, 2022; method.md §9): TAA's per-image parameters (shard_worker.taa)
# go through a bias-free linear map into the UNet's time embedding (diffusers' "identity" class
# embedding). "No augmentation" is the zero vector, whose embedding is zero, so the model without the
# map -- the one that is sampled, saved and registered -- is exactly the trained model at zero.
AUGMENTATION_PARAMS = 5  # shift x, shift y, flip, contrast, brightness
AUGMENTATION_EMBEDDING = "augmentation_embedding.weight"


def build_unet(cfg: Config, channels: int, *, for_training: bool = False) -> UNet2DModel:
    """The DDPM UNet: one down/up block per width, attention at `model.attention_resolutions`. The
    training UNet of a non-leaky TAA run also takes the augmentation parameters (see above)."""
    m = cfg.model
    resolution = cfg.data.resolution
    sizes = [resolution // 2**level for level in range(len(m.block_out_channels))]
    down = tuple("AttnDownBlock2D" if size in m.attention_resolutions else "DownBlock2D" for size in sizes)
    up = tuple("AttnUpBlock2D" if size in m.attention_resolutions else "UpBlock2D" for size in reversed(sizes))
    conditioned = for_training and cfg.conditions_on_augmentation
    unet = UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(m.block_out_channels),
        layers_per_block=m.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        dropout=m.dropout,
        # GroupNorm needs every width divisible by the group count; small test models use 8.
        norm_num_groups=32 if all(c % 32 == 0 for c in m.block_out_channels) else 8,
        class_embed_type="identity" if conditioned else None,
    )
    if conditioned:
        unet.augmentation_embedding = torch.nn.Linear(AUGMENTATION_PARAMS, unet.time_embedding.linear_2.out_features,
                                                      bias=False)
        torch.nn.init.zeros_(unet.augmentation_embedding.weight)  # starts as the plain UNet
    return unet


def denoise(unet: UNet2DModel, noisy: torch.Tensor, timesteps: torch.Tensor,
            augmentation: torch.Tensor | None = None) -> torch.Tensor:
    """ε_θ(x_t, t); a training UNet conditioned on augmentation gets its parameters (None: none applied)."""
    if not hasattr(unet, "augmentation_embedding"):
        return unet(noisy, timesteps).sample
    if augmentation is None:
        augmentation = noisy.new_zeros(len(noisy), AUGMENTATION_PARAMS)
    return unet(noisy, timesteps, class_labels=unet.augmentation_embedding(augmentation.to(noisy.dtype))).sample


def sampling_weights(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights of the model that is sampled: a training UNet's augmentation map dropped (exact,
    since sampling conditions on the zero vector)."""
    return {name: array for name, array in weights.items() if name != AUGMENTATION_EMBEDDING}


def build_scheduler(cfg: Config) -> DDPMScheduler:
    m = cfg.model
    return DDPMScheduler(
        num_train_timesteps=m.num_train_timesteps,
        beta_start=m.beta_start,
        beta_end=m.beta_end,
        beta_schedule=m.beta_schedule,
    )


def state_to_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Weights leave a worker as CPU numpy arrays (what the object store and aggregation take)."""
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in module.state_dict().items()}


def load_numpy_state(module: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
    # Arrays from the object store are read-only views; copy before torch takes them.
    module.load_state_dict({name: torch.from_numpy(np.array(array)) for name, array in state.items()})


def resolve_device(setting: str | torch.device | None = "auto") -> torch.device:
    """None or "auto": CUDA when there is one, else the CPU; "cuda" on a machine without one is an error."""
    if setting is None or setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except (RuntimeError, TypeError):
        raise MemshardError(f"device {setting!r} is not a device: use auto, cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise MemshardError(f"device {setting!r} is not supported: use auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MemshardError(f"device {setting!r} was asked for but torch sees no CUDA device: use auto or cpu")
    return device


def to_model_range(images_uint8: torch.Tensor | np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range the DDPM is trained in (numpy input is copied)."""
    if isinstance(images_uint8, np.ndarray):
        images_uint8 = torch.from_numpy(np.array(images_uint8))  # writable copy: loaded arrays are read-only
    if device is not None:
        images_uint8 = images_uint8.to(device)
    return images_uint8.float() / 127.5 - 1.0


def noised(alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, abar_t as (N, 1, 1, 1))."""
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, abar


# ---------------------------------------------------------------- per-sample loss at fixed, seeded (t, ε)
#
# The (t, ε) of a sample depend only on (seed, its global index, repeat), never on which batch or shard
# it is scored in: noise is drawn per block of SCORING_BLOCK consecutive indices from a generator seeded
# with (seed, block). That is what lets MSR's least-familiar rule compare proxies on the same draws, and
# an unlearning audit compare a model before and after on the same draws.

SCORING_BLOCK = 1024


def fixed_timesteps_and_noise(
    seed: int, indices: np.ndarray, shape: tuple[int, int, int], num_timesteps: int, repeats: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, ε) of shape (repeats, n) and (repeats, n, C, H, W) on the CPU, a function of (seed, index)."""
    indices = np.asarray(indices, dtype=np.int64)
    timesteps = torch.empty(repeats, len(indices), dtype=torch.long)
    noise = torch.empty(repeats, len(indices), *shape)
    for block in np.unique(indices // SCORING_BLOCK):
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(block))
        block_t = torch.randint(0, num_timesteps, (repeats, SCORING_BLOCK), generator=generator)
        block_noise = torch.randn(repeats, SCORING_BLOCK, *shape, generator=generator)
        where = np.nonzero(indices // SCORING_BLOCK == block)[0]
        offsets = torch.from_numpy(indices[where] % SCORING_BLOCK)
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
