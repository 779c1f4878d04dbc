"""AGC, anti-gradient control (method.md §2), on the device and without a host sync per sample.

A proxy keeps a memory bank m[t] of running losses, one float per timestep. Sample i with timestep
t_i is KEPT when λ·ℓ_i ≥ m[t_i] (decided against the bank as it was before the batch); afterwards
every sample updates its timestep's entry in batch order, m[t] ← d·m[t] + (1−d)·ℓ.

When k samples share a timestep, applying those k updates one after another gives
    m[t] ← d^k·m[t] + (1−d)·Σ_j d^(k−1−r_j)·ℓ_j      (r_j: the sample's rank among them, in batch order)
which `update_memory_bank` computes for the whole batch at once.

A skip is STALE when its entry m[t_i] was last written more than `stale_after_steps` optimizer steps
before, else LOW-LOSS. A batch of B samples writes about B of the T entries, so an entry is refreshed
about every T/B steps; one older than three such intervals holds losses of a model that many steps
behind, and a loss below it says more about how far the loss has fallen since than about the sample.
Only the count changes with this: what is skipped does not.
"""

from __future__ import annotations

import math

import torch


def agc_keep_mask(bank: torch.Tensor, timesteps: torch.Tensor, losses: torch.Tensor, lam: float) -> torch.Tensor:
    """True for samples whose loss is not far below the running loss of their timestep."""
    return lam * losses >= bank[timesteps]


def update_memory_bank(bank: torch.Tensor, timesteps: torch.Tensor, losses: torch.Tensor, decay: float) -> torch.Tensor:
    """The bank after applying every sample's EMA update in batch order (returns a new tensor)."""
    batch = timesteps.shape[0]
    counts = torch.bincount(timesteps, minlength=bank.shape[0])
    # Rank of each sample among the samples sharing its timestep, in batch order (stable sort).
    sorted_t, order = torch.sort(timesteps, stable=True)
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(timesteps)
    rank[order] = torch.arange(batch, device=timesteps.device) - group_start[sorted_t]
    exponent = (counts[timesteps] - 1 - rank).to(bank.dtype)
    contribution = (1.0 - decay) * torch.pow(torch.as_tensor(decay, dtype=bank.dtype, device=bank.device), exponent)
    decayed = bank * torch.pow(torch.as_tensor(decay, dtype=bank.dtype, device=bank.device), counts.to(bank.dtype))
    return decayed.index_add(0, timesteps, contribution * losses.to(bank.dtype))


def threshold_distance(bank: torch.Tensor, timesteps: torch.Tensor, losses: torch.Tensor, lam: float) -> torch.Tensor:
    """d_i = |λ·ℓ_i − m[t_i]| / |m[t_i]|: how far a sample sits from the skip threshold (TAA, §4)."""
    threshold = bank[timesteps]
    return (lam * losses - threshold).abs() / threshold.abs().clamp_min(1e-12)


def stale_after_steps(num_timesteps: int, batch: int) -> int:
    """A bank entry older than this many optimizer steps is stale: three expected refresh intervals (module docstring)."""
    return 3 * math.ceil(num_timesteps / batch)
