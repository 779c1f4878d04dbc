"""One proxy model and its local training: per-sample DDPM loss (clean or ambient), AGC, TAA, AdamW, warm-up.

The training step reads top to bottom like diffusers' `train_unconditional.py`; the extra lines are
AGC (which samples count), TAA (how hard each sample is augmented) and per-sample bookkeeping, all
kept on the device so a round syncs with the host once, at its end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from memshard.config import Config
from memshard.files import replace_file
from memshard.model import (
    ambient_setting,
    build_scheduler,
    build_unet,
    load_numpy_state,
    per_sample_loss,
    resolve_device,
    score_samples,
    state_to_numpy,
    to_model_range,
)
from memshard.shard_worker.agc import agc_keep_mask, stale_after_steps, threshold_distance, update_memory_bank
from memshard.shard_worker.faults import FaultPlan
from memshard.shard_worker.taa import augment, augmentation_strength


class NonFiniteLossError(FloatingPointError):
    """A proxy's loss became NaN or Inf; the driver rolls the round back and stops the run."""

    def __init__(self, shard: int, step: int):
        super().__init__(f"shard {shard} produced a non-finite loss at step {step}")
        self.shard, self.step = shard, step

    def __reduce__(self):  # crosses the Ray boundary intact
        return (NonFiniteLossError, (self.shard, self.step))


@dataclass
class RoundResult:
    """What a proxy reports after a round; per-sample arrays are aligned with `indices`."""

    shard: int
    indices: np.ndarray  # global dataset indices of the shard's samples this round
    skip_counts: np.ndarray  # times AGC dropped the sample this round
    mean_loss: np.ndarray  # mean training loss of the sample this round (NaN if never drawn)
    seen_counts: np.ndarray
    mean_loss_all: float  # mean per-sample loss over every sample drawn
    kept_fraction: float  # share of drawn samples AGC kept (1.0 without AGC)
    skips_stale: int  # skips against a bank entry written long ago (shard_worker.agc, stale_after_steps)
    skips_low_loss: int  # the other skips: the loss fell below a recent running loss
    steps: int
    images_per_second: float
    seconds: float


class ProxyTrainer:
    """A proxy model training on its shard. Holds all per-proxy state; the driver holds the loop.

    `images` is the whole dataset (N, C, H, W) uint8 — through Ray, a zero-copy view of one object
    in the object store shared by every actor on the node; only the shard's rows go to the device.
    `faults` is a test-only plan (shard_worker.faults); None in every real run.
    """

    def __init__(self, cfg: Config, images: np.ndarray, shard: int, faults: FaultPlan | None = None):
        self.cfg = cfg
        self.shard = shard
        self.images = images
        self.faults = faults
        self.device = resolve_device(cfg.training.device)
        seed = cfg.training.seed
        # Same initial weights on every proxy (seeded by the run seed alone); shard-specific stream
        # for everything random after that (batches, t, ε, augmentation, dropout).
        torch.manual_seed(seed)
        channels = images.shape[1]
        self.model = build_unet(cfg, channels, for_training=True).to(self.device).train()
        self.scheduler = build_scheduler(cfg)
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        self.ambient = ambient_setting(cfg, self.scheduler)  # None: the clean loss at every t
        t = cfg.training
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay,
            fused=self.device.type == "cuda",
        )
        warmup = max(t.warmup_steps, 1)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / warmup))
        # The EMA's shadow weights live beside the model (same device); warm-up as diffusers' script.
        self.ema = EMAModel(self.model.parameters(), decay=t.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0,
                            power=t.ema_power, foreach=True) if t.ema else None
        self.generator = torch.Generator(self.device).manual_seed(seed * 7919 + 104729 * (shard + 1))
        torch.manual_seed(seed * 7919 + shard + 1)
        self.memory_bank = torch.zeros(cfg.model.num_train_timesteps, device=self.device)
        # The global step that last wrote each bank entry (-1: never), to tell stale skips from low-loss ones.
        self.bank_written_at = torch.full((cfg.model.num_train_timesteps,), -1, dtype=torch.long, device=self.device)
        self.taa_strength = torch.zeros(len(images), device=self.device)
        self.global_step = 0
        self._permutation = torch.empty(0, dtype=torch.long, device=self.device)

    # ---- weights in and out (CPU numpy, for the object store and aggregation) ----
    def get_weights(self) -> dict[str, np.ndarray]:
        return state_to_numpy(self.model)

    def set_weights(self, weights: dict[str, np.ndarray], ema_weights: dict[str, np.ndarray] | None = None) -> None:
        """The global weights, and with `training.ema` the global (averaged) EMA the local one continues from."""
        load_numpy_state(self.model, weights)
        if self.ema is not None and ema_weights is not None:
            for name, shadow in self._named_ema_shadows():
                shadow.copy_(torch.from_numpy(np.array(ema_weights[name])))

    def get_ema_weights(self) -> dict[str, np.ndarray]:
        """The EMA's weights, named like `get_weights` (the UNet has parameters only, no buffers)."""
        if self.ema is None:
            raise ValueError("this proxy keeps no EMA: set training.ema=true")
        return {name: shadow.detach().cpu().numpy().copy() for name, shadow in self._named_ema_shadows()}

    def _named_ema_shadows(self):
        """(parameter name, EMA shadow tensor) pairs: EMAModel keeps its shadows in parameter order."""
        return ((name, shadow) for (name, _), shadow in zip(self.model.named_parameters(), self.ema.shadow_params, strict=True))

    # ---- local training ----
    def train_round(self, indices: np.ndarray, steps: int) -> RoundResult:
        """Train `steps` optimizer steps on the samples `indices` (global dataset rows)."""
        cfg, device = self.cfg, self.device
        indices = np.array(indices, dtype=np.int64)  # a writable copy: Ray hands in read-only views
        n = len(indices)
        if n == 0:
            raise ValueError(f"shard {self.shard} has no samples to train on")
        shard_images = torch.from_numpy(np.ascontiguousarray(self.images[indices])).to(device)
        global_index = torch.from_numpy(indices).to(device)
        # Each row's fixed copy noise, drawn from (seed, row) once per round, so no step waits on the host.
        shard_copy_noise = (self.ambient.copy_noise(indices, self.images.shape[1:]).to(device)
                            if self.ambient is not None else None)
        batch = min(cfg.training.batch_size, n)  # unique rows per batch keeps scatter updates exact
        skip_counts = torch.zeros(n, device=device)
        loss_sums = torch.zeros(n, device=device)
        seen_counts = torch.zeros(n, device=device)
        stale_skips = torch.zeros((), dtype=torch.long, device=device)
        stale_after = stale_after_steps(cfg.model.num_train_timesteps, batch)
        self._permutation = torch.empty(0, dtype=torch.long, device=device)  # the shard changed
        autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                  enabled=cfg.training.mixed_precision == "bf16" and device.type == "cuda")
        first_bad_step = torch.full((), -1, dtype=torch.long, device=device)  # read once, at the end
        start = time.perf_counter()
        for _ in range(steps):
            if self.faults is not None:
                self.faults.before_step(self.shard, self.global_step)
            rows = self._next_batch_rows(n, batch)
            x0 = to_model_range(shard_images[rows])
            parameters = None
            if cfg.uses_taa:
                x0, parameters = augment(x0, self.taa_strength[global_index[rows]], cfg.taa, self.generator)
            noise = torch.randn(x0.shape, generator=self.generator, device=device)
            timesteps = torch.randint(0, cfg.model.num_train_timesteps, (batch,), generator=self.generator, device=device)
            # With TAA the copy is of the augmented image (its η still fixed), as the published code adds
            # its fixed noise after augmenting.
            copy_noise = shard_copy_noise[rows] if shard_copy_noise is not None else None
            with autocast:
                losses = per_sample_loss(self.model, self.scheduler, x0, timesteps, noise, parameters,
                                         self.ambient, copy_noise)
            if self.faults is not None:
                losses = self.faults.losses(losses, self.shard, self.global_step)
            detached = losses.detach()
            bad_now = ~torch.isfinite(detached).all() & (first_bad_step < 0)
            first_bad_step = torch.where(bad_now, self.global_step, first_bad_step)

            if cfg.uses_agc:
                keep = agc_keep_mask(self.memory_bank, timesteps, detached, cfg.agc.lam)
                loss = (losses * keep).sum() / keep.sum().clamp_min(1)
                if cfg.uses_taa:
                    strength = augmentation_strength(threshold_distance(self.memory_bank, timesteps, detached, cfg.agc.lam))
                    current = self.taa_strength[global_index[rows]]
                    self.taa_strength[global_index[rows]] = torch.where(keep, strength, current)
                age = self.global_step - self.bank_written_at[timesteps]  # before this batch's writes
                stale_skips += (~keep & (age > stale_after)).sum()
                self.memory_bank = update_memory_bank(self.memory_bank, timesteps, detached, cfg.agc.decay)
                self.bank_written_at[timesteps] = self.global_step
                skip_counts.index_add_(0, rows, (~keep).float())
            else:
                loss = losses.mean()
            loss_sums.index_add_(0, rows, detached)
            seen_counts.index_add_(0, rows, torch.ones_like(detached))

            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.training.grad_clip)
            self.optimizer.step()
            self.lr_schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.step(self.model.parameters())
            self.global_step += 1

        # One host sync per round.
        if first_bad_step.item() >= 0:
            raise NonFiniteLossError(self.shard, int(first_bad_step.item()))
        skip_np, sums_np, seen_np = (x.cpu().numpy() for x in (skip_counts, loss_sums, seen_counts))
        seconds = time.perf_counter() - start
        drawn = seen_np.sum()
        skips, stale = int(skip_np.sum()), int(stale_skips.item())
        mean_loss = np.divide(sums_np, seen_np, out=np.full(n, np.nan), where=seen_np > 0)
        mean_loss_all = float(sums_np.sum() / max(drawn, 1))
        return RoundResult(
            shard=self.shard,
            indices=indices,
            skip_counts=skip_np.astype(np.int64),
            mean_loss=mean_loss,
            seen_counts=seen_np.astype(np.int64),
            mean_loss_all=mean_loss_all,
            kept_fraction=float(1.0 - skips / max(drawn, 1)),
            skips_stale=stale,
            skips_low_loss=skips - stale,
            steps=steps,
            images_per_second=steps * batch / max(seconds, 1e-9),
            seconds=seconds,
        )

    def _next_batch_rows(self, n: int, batch: int) -> torch.Tensor:
        """The next `batch` shard rows: seeded epochs without repeats, the short tail dropped."""
        if self._permutation.numel() < batch:
            self._permutation = torch.randperm(n, generator=self.generator, device=self.device)
        rows, self._permutation = self._permutation[:batch], self._permutation[batch:]
        return rows

    # ---- scoring ----
    def score(self, indices: np.ndarray, seed: int, repeats: int = 4) -> np.ndarray:
        """This proxy's loss on `indices` at fixed, seeded (t, ε) (MSR least-familiar, evaluation)."""
        return score_samples(self.model, self.scheduler, self.images, indices, seed, repeats, ambient=self.ambient)

    # ---- checkpoint (all per-proxy state; tensors only, so torch.load(weights_only=True) reads it) ----
    def state_dict(self) -> dict:
        # On the CPU: the state leaves the actor for the driver and the checkpoint file, where no GPU may be.
        # Like torch's state_dict, CPU tensors are references: Ray serializes them when the state leaves.
        return _on_cpu({
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "memory_bank": self.memory_bank,
            "bank_written_at": self.bank_written_at,
            "taa_strength": self.taa_strength,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
            "global_step": self.global_step,
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        })

    def save_state(self, path: str) -> int:
        """Write this proxy's state to `path` itself (whole or not at all; the driver names the file, on
        storage the driver and every node see) and return the file's size: the state never passes
        through the driver."""
        state = self.state_dict()
        return replace_file(Path(path), lambda file: torch.save(state, file))

    def load_state_file(self, path: str) -> None:
        """Continue from a state `save_state` wrote (read with weights_only: tensors and plain values only)."""
        self.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.memory_bank = state["memory_bank"].to(self.device)
        self.taa_strength = state["taa_strength"].to(self.device)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state["cuda_rng"].numel():
            torch.cuda.set_rng_state(state["cuda_rng"])
        self.global_step = int(state["global_step"])
        # Checkpoints from before the stale/low-loss split: every entry counts as written now (counts only).
        self.bank_written_at = state.get("bank_written_at", torch.full_like(self.bank_written_at, self.global_step))
        self.bank_written_at = self.bank_written_at.to(self.device)
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("the checkpoint was trained without training.ema: resume it without the EMA")
            self.ema.load_state_dict(state["ema"])
            self.ema.to(self.device)


def _on_cpu(tree):
    """`tree` with every tensor in it on the CPU (copied from a GPU, kept where already on the CPU;
    dicts and lists rebuilt, other leaves kept)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {key: _on_cpu(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_on_cpu(value) for value in tree)
    return tree
