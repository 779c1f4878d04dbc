"""Unlearning methods over one UNet: SISS and the naive / NegGrad / EraseDiff baselines.

Every method takes the trained UNet, its DDPM scheduler and two uint8 image arrays — the keep set
X \\ A and the forget set A, each (N, C, H, W) — and fine-tunes the UNet in place with AdamW until
the forget set is no longer reproduced or `settings.max_steps` steps are done. Given the same seed,
weights and data, the result is the same.

SISS (subtracted importance-sampled scores), "Data Unlearning in Diffusion Models",
Alberti et al., ICLR 2025 (method.md §6). Per step: pair each keep image x with a forget image a,
draw one t and one ε for the pair, noise a with probability λ and x otherwise (the mixture m_t),
and run ONE forward pass on the mixed batch. Both losses are importance-weighted against the
mixture density,
    w_x = 1 / ((1−λ) + λ·exp(D_x − D_a)),   w_a = 1 / ((1−λ)·exp(D_a − D_x) + λ),
    D_z = ‖m_t − √ᾱ_t z‖² / (2(1−ᾱ_t)),
computed in log space (in high dimension the exp terms overflow). The two gradients are combined
as g = g_x − (c_t / ‖g_a‖)·g_a — the gradient form of the paper's released code, a set norm c_t for
the forget direction instead of the superfactor — then clipped and applied with AdamW. The norm is
relative by default, c_t = ρ·‖g_x‖ (ρ = 0.1, the authors' advice, method.md §6b): the forget
direction is a fixed fraction of the keep direction whatever the model's size. `absolute` keeps the
published fixed c (5 at MNIST scale), which at our model size dominates every step and forgets the
rest with the image. With the relative term the forget loss rises roughly in proportion to the
learning rate; what limits the rate is AdamW's first steps, which move every weight by about the
rate whatever its gradient: on the digits benchmark (BENCHMARKS.md, issue 14) ten steps at the
training rate 2e-4 raise the keep loss by 6% even with no forget term at all (naive), and SISS at
2e-4 ends at +5.5% to +11%. At 1e-4, checked every 10 steps, SISS forgets the planted image in 10
steps with the keep loss +1.3% to +1.5% (two seeds); at the published 5e-5 it needs 20 to 50 steps.
The tiny test model, trained at 1e-3, forgets in ~100 steps at 2e-4 (the absolute c = 5: 20 steps,
keep loss ×3).

Stopping on evidence: every `check_every` steps (and before the first and after the last) a
`ForgetCheck` measures the forget and keep losses at fixed seeded (t, ε) and, where they can decide
a stop, the pixel matches of the forget images among a fixed seeded set of few-step generations;
unlearning stops as soon as the forget set is no longer reproduced (`forget_check` has the rule),
and at `max_steps` otherwise. The checks' time counts in the seconds returned; their measures are
the returned trajectory.

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
from memshard.unlearning.forget_check import PIXEL_MATCH_THRESHOLD, CheckPoint, ForgetCheck

FORGET_SCALE_MODES = ("relative", "absolute")


@dataclass(frozen=True)
class UnlearnSettings:
    """Defaults: the published MNIST-scale SISS setting (method.md §6: batch 64, λ 0.5, clip 1.0,
    300 steps, now the cap) with the forget term scaled relative to the keep term (§6b), the rate of
    the module notes, and stopping on the forget measures."""

    batch_size: int = 64
    learning_rate: float = 1e-4  # measured on digits (module notes); published: 5e-5 with the absolute c
    max_steps: int = 300  # hard cap on optimizer steps
    lam: float = 0.5  # λ: probability that a pair's noised input comes from the forget image
    forget_scale_mode: str = "relative"  # relative: c_t = rho·‖g_x‖; absolute: c_t = c
    rho: float = 0.1  # the forget direction's norm as a fraction of the keep gradient's (relative)
    c: float = 5.0  # the forget direction's norm (absolute; the published MNIST-scale value)
    grad_clip: float = 1.0
    weight_decay: float = 0.01  # AdamW's default
    check_every: int = 10  # steps between forget checks; 0: no checks, run max_steps
    check_images: int = 64  # seeded generations per check
    check_sampling_steps: int = 20  # DDPM steps per check generation
    check_samples: int = 128  # keep images, and at most as many forget images, scored per check
    stop_loss_ratio: float = 1.0  # stop needs forget loss ≥ this × keep loss (and 0 pixel matches); 0: those alone
    seed: int = 0

    def check(self) -> None:
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be at least 1")
        if self.max_steps < 1:
            problems.append(f"max_steps={self.max_steps} must be at least 1")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate} must be positive")
        if not 0 < self.lam < 1:
            problems.append(f"lam={self.lam} must lie strictly between 0 and 1")
        if self.forget_scale_mode not in FORGET_SCALE_MODES:
            problems.append(f"forget_scale_mode={self.forget_scale_mode!r} must be one of {', '.join(FORGET_SCALE_MODES)}")
        if not self.rho > 0:
            problems.append(f"rho={self.rho} must be positive")
        if not self.c >= 0:
            problems.append(f"c={self.c} must be non-negative")
        if not self.grad_clip > 0:
            problems.append(f"grad_clip={self.grad_clip} must be positive")
        if self.check_every < 0:
            problems.append(f"check_every={self.check_every} must be 0 (no checks) or more")
        if self.check_images < 1 or self.check_sampling_steps < 1 or self.check_samples < 1:
            problems.append("check_images, check_sampling_steps and check_samples must be at least 1")
        if not self.stop_loss_ratio >= 0:
            problems.append(f"stop_loss_ratio={self.stop_loss_ratio} must be non-negative")
        if self.seed < 0:
            problems.append(f"seed={self.seed} must be non-negative")
        if problems:
            raise MemshardError(f"unlearning settings: {'; '.join(problems)}: fix them with --set / --steps")


@dataclass(frozen=True)
class UnlearnStats:
    steps: int  # optimizer steps taken
    seconds: float  # wall time, the checks included
    check_seconds: float  # the checks' share of `seconds`
    final_keep_loss: float  # the last step's training-batch losses (NaN where the method has none)
    final_forget_loss: float
    stopped: str  # STOP_FORGOTTEN or STOP_MAX_STEPS
    trajectory: tuple[CheckPoint, ...] = ()  # every check, the first at step 0 (empty: no checks)


STOP_FORGOTTEN = "forgotten"  # a check found the forget set no longer reproduced
STOP_MAX_STEPS = "max_steps"  # the cap was reached first (or no checks were asked for)


def unlearn(method: str, unet: UNet2DModel, scheduler: DDPMScheduler, keep_images: np.ndarray,
            forget_images: np.ndarray, settings: UnlearnSettings = UnlearnSettings(),
            pixel_match_threshold: float = PIXEL_MATCH_THRESHOLD) -> UnlearnStats:
    """Fine-tune `unet` in place so it forgets `forget_images`, stopping when the forget checks say so
    (or at max_steps); returns steps, seconds, the last losses and the checks' trajectory."""
    if method not in METHODS:
        raise MemshardError(f"unknown unlearning method {method!r}: choose one of {', '.join(METHODS)}")
    settings.check()
    if len(forget_images) == 0 or len(keep_images) == 0:
        raise MemshardError("unlearning needs a non-empty forget set and a non-empty keep set")
    timesteps = int(scheduler.config.num_train_timesteps)
    if settings.check_every and settings.check_sampling_steps > timesteps:
        raise MemshardError(f"check_sampling_steps={settings.check_sampling_steps}: the model was trained with "
                            f"{timesteps} timesteps, choose 1 to {timesteps}")
    device = next(unet.parameters()).device
    torch.manual_seed(settings.seed)  # dropout
    generator = torch.Generator(device).manual_seed(settings.seed)
    keep = to_model_range(keep_images, device)
    forget = to_model_range(forget_images, device)
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    step_fn = STEP_FUNCTIONS[method]
    check = None
    if settings.check_every:
        check = ForgetCheck(scheduler, keep_images, forget_images, generations=settings.check_images,
                            sampling_steps=settings.check_sampling_steps, samples=settings.check_samples,
                            pixel_match_threshold=pixel_match_threshold, stop_loss_ratio=settings.stop_loss_ratio,
                            seed=settings.seed)
    trajectory: list[CheckPoint] = []

    def forgotten(step: int, full: bool = False) -> bool:
        trajectory.append(check(unet, step, full))
        return check.forgotten(trajectory[-1])

    unet.train()
    started = time.perf_counter()
    keep_loss = forget_loss = math.nan
    step, stopped = 0, STOP_MAX_STEPS
    if check is not None and forgotten(0, full=True):
        stopped = STOP_FORGOTTEN
    while stopped != STOP_FORGOTTEN and step < settings.max_steps:
        x = keep[torch.randint(0, len(keep), (settings.batch_size,), generator=generator, device=device)]
        a = forget[torch.randint(0, len(forget), (settings.batch_size,), generator=generator, device=device)]
        t = torch.randint(0, len(alphas), (settings.batch_size,), generator=generator, device=device)
        noise = torch.randn(x.shape, generator=generator, device=device)
        optimizer.zero_grad(set_to_none=True)
        keep_loss, forget_loss = step_fn(unet, params, alphas, x, a, t, noise, generator, settings)
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        step += 1
        last = step == settings.max_steps
        if check is not None and (step % settings.check_every == 0 or last) and forgotten(step, full=last):
            stopped = STOP_FORGOTTEN
    if device.type == "cuda":
        torch.cuda.synchronize()
    unet.eval()
    return UnlearnStats(step, time.perf_counter() - started, sum(p.seconds for p in trajectory), float(keep_loss),
                        float(forget_loss), stopped, tuple(trajectory))


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
    for p, g in zip(params, combine_gradients(params, grad_x, grad_a, settings), strict=True):
        p.grad = g
    return loss_x.detach(), loss_a.detach()


def combine_gradients(params, grad_x, grad_a, settings: UnlearnSettings) -> list[torch.Tensor]:
    """g = g_x − (c_t / ‖g_a‖)·g_a, with c_t = rho·‖g_x‖ (relative, §6b) or the fixed c (absolute, §6).
    A None gradient (a parameter the loss does not reach) counts as zero."""
    grad_x = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grad_x, strict=True)]
    grad_a = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grad_a, strict=True)]
    scale = settings.rho * _norm(grad_x) if settings.forget_scale_mode == "relative" else settings.c
    factor = scale / torch.clamp(_norm(grad_a), min=1e-12)
    return [gx - factor * ga for gx, ga in zip(grad_x, grad_a, strict=True)]


def _norm(grads) -> torch.Tensor:
    return torch.sqrt(sum((g.float() ** 2).sum() for g in grads))


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


# The approximate methods, by name: the one registry (`unlearning.runner` adds the exact `retrain`).
STEP_FUNCTIONS = {"siss": _siss_step, "naive": _naive_step, "neggrad": _neggrad_step, "erasediff": _erasediff_step}
METHODS = tuple(STEP_FUNCTIONS)
