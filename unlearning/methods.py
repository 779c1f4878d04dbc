"""Unlearning methods over one UNet: SISS and the naive / NegGrad / EraseDiff baselines.

Every method takes the trained UNet, its DDPM scheduler and two uint8 image arrays — the keep set
X \\ A and the forget set A, each (N, C, H, W) — and fine-tunes the UNet in place for
`settings.steps` AdamW steps. Given the same seed, weights and data, the result is the same.

SISS (subtracted importance-sampled scores), "Data Unlearning in Diffusion Models",
Alberti et al., ICLR 2025 (method.md §6). Per step: pair each keep image x with a forget image a,
draw one t and one ε for the pair, noise a with probability λ and x otherwise (the mixture m_t),
and run ONE forward pass on the mixed batch. Both losses are importance-weighted against the
mixture density,
    w_x = 1 / ((1−λ) + λ·exp(D_x − D_a)),   w_a = 1 / ((1−λ)·exp(D_a − D_x) + λ),
    D_z = ‖m_t − √ᾱ_t z‖² / (2(1−ᾱ_t)),
computed in log space (in high dimension the exp terms overflow). The two gradients are combined
as g = g_x − (c / ‖g_a‖)·g_a — the gradient form of the paper's released code, with a fixed norm
c for the forget direction instead of the superfactor — then clipped and applied with AdamW.

Baselines (same interface): `naive` fine-tunes on X \\ A only; `neggrad` ascends the forget loss;
`erasediff` trains on X \\ A while regressing the forget images' noise prediction onto uniform
noise (the EraseDiff objective without its bi-level outer step).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from memshard.errors import MemshardError
from memshard.model import noised, to_model_range

METHODS = ("siss", "naive", "neggrad", "erasediff")


@dataclass(frozen=True)
class UnlearnSettings:
    """Defaults: the published MNIST-scale SISS setting (method.md §6)."""

    batch_size: int = 64
    learning_rate: float = 5e-5
    steps: int = 300
    lam: float = 0.5  # λ: probability that a pair's noised input comes from the forget image
    c: float = 5.0  # norm of the subtracted forget gradient (SISS gradient form)
    grad_clip: float = 1.0
    weight_decay: float = 0.01  # AdamW's default
    seed: int = 0

    def check(self) -> None:
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be at least 1")
        if self.steps < 1:
            problems.append(f"steps={self.steps} must be at least 1")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate} must be positive")
        if not 0 < self.lam < 1:
            problems.append(f"lam={self.lam} must lie strictly between 0 and 1")
        if not self.c >= 0:
            problems.append(f"c={self.c} must be non-negative")
        if not self.grad_clip > 0:
            problems.append(f"grad_clip={self.grad_clip} must be positive")
        if problems:
            raise MemshardError(f"unlearning settings: {'; '.join(problems)}: fix them with --set / --steps")


@dataclass(frozen=True)
class UnlearnStats:
    steps: int
    seconds: float
    final_keep_loss: float
    final_forget_loss: float


def unlearn(method: str, unet: UNet2DModel, scheduler: DDPMScheduler, keep_images: np.ndarray,
            forget_images: np.ndarray, settings: UnlearnSettings = UnlearnSettings()) -> UnlearnStats:
    """Fine-tune `unet` in place so it forgets `forget_images`; returns steps, seconds and last losses."""
    if method not in METHODS:
        raise MemshardError(f"unknown unlearning method {method!r}: choose one of {', '.join(METHODS)}")
    settings.check()
    if len(forget_images) == 0 or len(keep_images) == 0:
        raise MemshardError("unlearning needs a non-empty forget set and a non-empty keep set")
    device = next(unet.parameters()).device
    torch.manual_seed(settings.seed)  # dropout
    generator = torch.Generator(device).manual_seed(settings.seed)
    keep = to_model_range(keep_images, device)
    forget = to_model_range(forget_images, device)
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    step_fn = {"siss": _siss_step, "naive": _naive_step, "neggrad": _neggrad_step, "erasediff": _erasediff_step}[method]
    unet.train()
    started = time.perf_counter()
    keep_loss = forget_loss = math.nan
    for _ in range(settings.steps):
        x = keep[torch.randint(0, len(keep), (settings.batch_size,), generator=generator, device=device)]
        a = forget[torch.randint(0, len(forget), (settings.batch_size,), generator=generator, device=device)]
        t = torch.randint(0, len(alphas), (settings.batch_size,), generator=generator, device=device)
        noise = torch.randn(x.shape, generator=generator, device=device)
        optimizer.zero_grad(set_to_none=True)
        keep_loss, forget_loss = step_fn(unet, params, alphas, x, a, t, noise, generator, settings)
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    unet.eval()
    return UnlearnStats(settings.steps, time.perf_counter() - started, float(keep_loss), float(forget_loss))


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over pixels."""
    return ((prediction.float() - target.float()) ** 2).flatten(1).mean(dim=1)


def siss_log_weights(m: torch.Tensor, x: torch.Tensor, a: torch.Tensor, abar: torch.Tensor,
                     lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log w_x, log w_a) per pair, in log space so that neither weight overflows."""
    scale = 2 * (1 - abar).flatten()
    d_x = ((m - abar.sqrt() * x) ** 2).flatten(1).sum(dim=1) / scale
    d_a = ((m - abar.sqrt() * a) ** 2).flatten(1).sum(dim=1) / scale
    log_keep, log_forget = math.log(1 - lam), math.log(lam)
    # w_x = 1 / ((1−λ) + λ e^{D_x − D_a});  w_a = 1 / ((1−λ) e^{D_a − D_x} + λ)
    log_w_x = -torch.logaddexp(torch.full_like(d_x, log_keep), log_forget + d_x - d_a)
    log_w_a = -torch.logaddexp(log_keep + d_a - d_x, torch.full_like(d_a, log_forget))
    return log_w_x, log_w_a


def _siss_step(unet, params, alphas, x, a, t, noise, generator, settings):
    pick_forget = torch.rand(len(x), generator=generator, device=x.device) < settings.lam
    z = torch.where(pick_forget.view(-1, 1, 1, 1), a, x)
    m, abar = noised(alphas, z, t, noise)
    log_w_x, log_w_a = siss_log_weights(m, x, a, abar, settings.lam)
    prediction = unet(m, t).sample  # one forward pass on the mixed batch
    sigma = (1 - abar).sqrt()
    loss_x = (log_w_x.exp() * _mse(prediction, (m - abar.sqrt() * x) / sigma)).mean()
    loss_a = (log_w_a.exp() * _mse(prediction, (m - abar.sqrt() * a) / sigma)).mean()
    grad_x = torch.autograd.grad(loss_x, params, retain_graph=True, allow_unused=True)
    grad_a = torch.autograd.grad(loss_a, params, allow_unused=True)
    grad_a_norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grad_a if g is not None))
    factor = settings.c / torch.clamp(grad_a_norm, min=1e-12)
    for p, gx, ga in zip(params, grad_x, grad_a):
        gx = torch.zeros_like(p) if gx is None else gx
        p.grad = gx if ga is None else gx - factor * ga
    return loss_x.detach(), loss_a.detach()


def _naive_step(unet, params, alphas, x, a, t, noise, generator, settings):
    noisy, _ = noised(alphas, x, t, noise)
    loss = _mse(unet(noisy, t).sample, noise).mean()
    loss.backward()
    return loss.detach(), torch.tensor(math.nan)


def _neggrad_step(unet, params, alphas, x, a, t, noise, generator, settings):
    noisy, _ = noised(alphas, a, t, noise)
    loss = _mse(unet(noisy, t).sample, noise).mean()
    (-loss).backward()
    return torch.tensor(math.nan), loss.detach()


def _erasediff_step(unet, params, alphas, x, a, t, noise, generator, settings):
    batch = torch.cat([x, a])
    noisy, _ = noised(alphas, batch, t.repeat(2), noise.repeat(2, 1, 1, 1))
    prediction = unet(noisy, t.repeat(2)).sample
    uniform = torch.rand(a.shape, generator=generator, device=a.device)  # ε_f ~ U(0, 1)
    keep_loss = _mse(prediction[: len(x)], noise).mean()
    erase_loss = _mse(prediction[len(x):], uniform).mean()
    (keep_loss + erase_loss).backward()
    return keep_loss.detach(), erase_loss.detach()
