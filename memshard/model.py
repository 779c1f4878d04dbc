"""The model every layer shares: the UNet and noise schedule built from the config, where it runs,
the pixel range it is trained in, how an image is noised (method.md notation), the per-sample loss
(clean, or ambient above a noise level: method.md §10) and that loss at fixed, seeded (t, ε), which
training, MSR and the unlearning audit compare models by."""

from __future__ import annotations

from dataclasses import dataclass

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
    augmentation: torch.Tensor | None = None, ambient: Ambient | None = None, copy_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """ℓ_i = mean over pixels of (ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t) − ε)², one value per sample
    (`augmentation`: x0's TAA parameters, for a UNet conditioned on them; None: no augmentation).
    With `ambient`, the samples drawn above its level learn from their fixed noisy copy instead
    (`ambient_loss`; `copy_noise`: each sample's η, from `Ambient.copy_noise`)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(x0.device)
    if ambient is None:
        noisy, _ = noised(alphas_cumprod, x0, timesteps, noise)
        prediction = denoise(model, noisy, timesteps, augmentation)
        return ((prediction.float() - noise.float()) ** 2).mean(dim=(1, 2, 3))
    if copy_noise is None:
        raise ValueError("an ambient loss needs each sample's copy noise: pass copy_noise=ambient.copy_noise(rows, ...)")
    return ambient_loss(model, alphas_cumprod, x0, timesteps, noise, augmentation, ambient, copy_noise)


# ---------------------------------------------------------------- ambient training at high noise (method.md §10)
#
# Notation: a = ᾱ_t, b = ᾱ_n (the copy's level), r = a/b.
#   copy        y   = √b x0 + √(1−b) η             (η fixed per (run seed, row): `Ambient.copy_noise`)
#   input       x_t = √r y + √(1−r) ε              (the forward marginal of x0: √a x0 + √(1−a)·N(0, 1))
#   prediction  x̂0  = (x_t − √(1−a) ε_θ) / √a
#               ŷ   = c0 x̂0 + c1 x_t,  c0 = √b (1−r)/(1−a),  c1 = √r (1−b)/(1−a)   (posterior mean of x_{t_n})
#
# The weight. ŷ − y = c0 (x̂0 − x̂0*), where x̂0* = (y − c1 x_t)/c0 is the prediction that gives ŷ = y, and
# x̂0 − x̂0* = −√((1−a)/a) (ε_θ − ε*) with ε* = (x_t − √a x̂0*)/√(1−a) the ε-prediction that does. So
#   ‖ŷ − y‖² = c0² (1−a)/a · ‖ε_θ − ε*‖².
# "epsilon" (method.md §10: the scale of the clean ε-loss at the same t): weight a / ((1−a) c0²), the loss
#   is ‖ε_θ − ε*‖². ε* is a noisy target: its spread about its mean given x_t grows like b(1−b)/(b−a) as t
#   falls to t_n (x_t nearly fixes y there), so the first steps above t_n carry losses of tens per pixel.
# "x0" (the published code's choice, kulinshah98/memorization_noisy_data: the copy error carries the
#   weight the clean loss gives an x0 error at that σ): weight a/(1−a), i.e. c0² ‖ε_θ − ε*‖², which fades
#   to 0 at t_n.
# Both are the clean ε-loss exactly when the copy is x0 (b = 1: c0 = 1, c1 = 0, ŷ = x̂0).

# A tag in Philox's counter keeps the copies' draws apart from any other stream keyed by the same numbers.
AMBIENT_STREAM = 0x616D6269


@dataclass(frozen=True)
class Ambient:
    """`training.ambient_alpha_bar` resolved against the noise schedule (`ambient_setting`)."""

    timestep: int  # t_n: steps t <= t_n learn from x0, steps t > t_n from the fixed copy
    alpha_bar: float  # ᾱ_n = ᾱ_{t_n}, the copy's level: the setting rounded to the schedule
    weighting: str  # one of config.AMBIENT_WEIGHTINGS
    seed: int  # the run seed the copies are drawn from

    def copy_noise(self, rows: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        """η of shape (n, *shape) on the CPU for dataset rows `rows`: a function of (seed, row) alone, so
        the same in every shard, after every MSR move and on resume, and never stored. Each row has its
        own counter-based stream (Philox keyed by (seed, row)): a copy costs one image of draws, so a
        shard's copies are drawn once per round (`ProxyTrainer.train_round`) instead of held for every
        row in every actor (CIFAR-10's would be 600 MB of float32 each)."""
        rows = np.asarray(rows, dtype=np.int64)
        draws = np.empty((len(rows), *shape), dtype=np.float32)
        for i, row in enumerate(rows):
            stream = np.random.Philox(key=[self.seed, int(row)], counter=[0, 0, 0, AMBIENT_STREAM])
            draws[i] = np.random.Generator(stream).standard_normal(shape, dtype=np.float32)
        return torch.from_numpy(draws)


def ambient_setting(cfg: Config, scheduler: DDPMScheduler) -> Ambient | None:
    """None when `training.ambient_alpha_bar` is off; else t_n, the last step with ᾱ_t >= the setting.
    A level the schedule never reaches from either side leaves nothing to train on x0 or on the copy:
    a MemshardError (`orchestrator.settings.check` calls this before any work)."""
    level = cfg.training.ambient_alpha_bar
    if level is None:
        return None
    alphas_cumprod = scheduler.alphas_cumprod.double().cpu().numpy()
    first, last = float(alphas_cumprod[0]), float(alphas_cumprod[-1])
    if not last < level <= first:
        raise MemshardError(f"training.ambient_alpha_bar = {level}: the schedule's ᾱ_t runs from {first:.6g} down to "
                            f"{last:.3g}; choose a level between them (0.8 is the published σ_n = 0.5)")
    timestep = int(np.nonzero(alphas_cumprod >= level)[0][-1])
    return Ambient(timestep, float(alphas_cumprod[timestep]), cfg.training.ambient_weighting, cfg.training.seed)


def ambient_coefficients(abar_t: torch.Tensor, abar_n: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1) of ŷ = c0 x̂0 + c1 x_t, the forward-process posterior mean of x_{t_n} given x_t and x̂0."""
    ratio = abar_t / abar_n
    return (abar_n**0.5 * (1 - ratio) / (1 - abar_t), ratio.sqrt() * (1 - abar_n) / (1 - abar_t))


def noised_from_copy(abar_t: torch.Tensor, abar_n: float, copy: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √(ᾱ_t/ᾱ_n) y + √(1 − ᾱ_t/ᾱ_n) ε, for ᾱ_t <= ᾱ_n."""
    ratio = abar_t / abar_n
    return ratio.sqrt() * copy + (1 - ratio).sqrt() * noise


def ambient_loss(
    model: UNet2DModel, alphas_cumprod: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
    augmentation: torch.Tensor | None, ambient: Ambient, copy_noise: torch.Tensor,
) -> torch.Tensor:
    """Per sample: the clean ε-loss at t <= t_n, the weighted ‖ŷ − y‖² above (see the notes above).
    One UNet call for the batch; the ambient arithmetic is in float32 whatever the autocast."""
    abar_n = ambient.alpha_bar
    above = (timesteps > ambient.timestep).view(-1, 1, 1, 1)
    clean_input, abar = noised(alphas_cumprod, x0.float(), timesteps, noise.float())
    # Rows at or below t_n take a stand-in level in the ambient arithmetic they never use: torch.where
    # passes a NaN or Inf of the unused side into the gradient (its weight is infinite at ᾱ_t = ᾱ_n).
    abar = torch.where(above, abar, abar_n / 2)
    copy = abar_n**0.5 * x0.float() + (1 - abar_n) ** 0.5 * copy_noise.float()
    ambient_input = noised_from_copy(abar, abar_n, copy, noise.float())
    noisy = torch.where(above, ambient_input, clean_input)
    prediction = denoise(model, noisy, timesteps, augmentation).float()
    clean = ((prediction - noise.float()) ** 2).mean(dim=(1, 2, 3))
    x0_prediction = (noisy - (1 - abar).sqrt() * prediction) / abar.sqrt()
    c0, c1 = ambient_coefficients(abar, abar_n)
    copy_prediction = c0 * x0_prediction + c1 * noisy
    weight = abar / (1 - abar) / (c0**2 if ambient.weighting == "epsilon" else 1)
    from_copy = (weight * (copy_prediction - copy) ** 2).mean(dim=(1, 2, 3))
    return torch.where(above.view(-1), from_copy, clean)


@torch.no_grad()
def score_samples(
    model: UNet2DModel,
    scheduler: DDPMScheduler,
    images_uint8: np.ndarray,
    indices: np.ndarray,
    seed: int,
    repeats: int = 4,
    batch_size: int = 256,
    ambient: Ambient | None = None,
) -> np.ndarray:
    """Mean loss over `repeats` fixed draws for each of `images_uint8[indices]` (eval mode, no dropout);
    with `ambient`, the loss the model trained with (method.md §10: the scores use the training loss)."""
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
            copy_noise = ambient.copy_noise(chunk, shape).to(device) if ambient is not None else None
            for r in range(repeats):
                loss = per_sample_loss(model, scheduler, x0, timesteps[r].to(device), noise[r].to(device),
                                       ambient=ambient, copy_noise=copy_noise)
                losses[start : start + len(chunk)] += loss.double().cpu().numpy() / repeats
    finally:
        model.train(was_training)
    return losses
