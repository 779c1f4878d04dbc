"""The proxy model: a diffusers UNet2DModel with a DDPMScheduler, built from the config."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from orchestrator.config import Config


def build_unet(cfg: Config, channels: int) -> UNet2DModel:
    """The DDPM UNet: one down/up block per width, attention at `model.attention_resolutions`."""
    m = cfg.model
    resolution = cfg.data.resolution
    sizes = [resolution // 2**level for level in range(len(m.block_out_channels))]
    down = tuple("AttnDownBlock2D" if size in m.attention_resolutions else "DownBlock2D" for size in sizes)
    up = tuple("AttnUpBlock2D" if size in m.attention_resolutions else "UpBlock2D" for size in reversed(sizes))
    return UNet2DModel(
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
    )


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


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device = cuda but this worker sees no CUDA device")
    return torch.device(setting)
