"""AGC against a slow reference written straight from method.md §2; TAA's strength and augmentations."""

import numpy as np
import pytest
import torch

from memshard.config import TAAConfig
from memshard.shard_worker.agc import agc_keep_mask, threshold_distance, update_memory_bank
from memshard.shard_worker.taa import augment, augmentation_strength


def reference_agc(bank, timesteps, losses, lam, decay):
    """One sample at a time, exactly as the formula reads."""
    bank = list(bank)
    keep = [lam * loss >= bank[t] for t, loss in zip(timesteps, losses, strict=True)]  # against the pre-batch bank
    for t, loss in zip(timesteps, losses, strict=True):  # then updates in batch order
        bank[t] = decay * bank[t] + (1 - decay) * loss
    return np.array(keep), np.array(bank)


@pytest.mark.parametrize("seed", range(5))
def test_vectorized_agc_matches_sequential_reference_with_repeated_timesteps(seed):
    rng = np.random.default_rng(seed)
    num_timesteps, batch = 7, 64  # few timesteps: every batch repeats most of them many times
    bank = rng.uniform(0.0, 1.0, num_timesteps) * (rng.uniform(size=num_timesteps) > 0.3)
    timesteps = rng.integers(0, num_timesteps, batch)
    losses = rng.exponential(0.4, batch)
    lam, decay = 2.0, 0.8

    keep_ref, bank_ref = reference_agc(bank, timesteps, losses, lam, decay)
    bank_t = torch.tensor(bank, dtype=torch.float64)
    t_t, l_t = torch.tensor(timesteps), torch.tensor(losses, dtype=torch.float64)
    keep = agc_keep_mask(bank_t, t_t, l_t, lam)
    new_bank = update_memory_bank(bank_t, t_t, l_t, decay)

    assert np.bincount(timesteps).max() > 5
    np.testing.assert_array_equal(keep.numpy(), keep_ref)
    assert 0 < keep_ref.sum() < batch  # the case mixes kept and skipped samples
    np.testing.assert_allclose(new_bank.numpy(), bank_ref, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(bank_t.numpy(), bank)  # the input bank is not modified


def test_agc_bank_update_in_float32_over_many_batches_tracks_reference():
    rng = np.random.default_rng(11)
    bank_ref = np.zeros(1000)
    bank = torch.zeros(1000)
    for _ in range(50):
        timesteps = rng.integers(0, 1000, 128)
        losses = rng.exponential(0.1, 128)
        _, bank_ref = reference_agc(bank_ref, timesteps, losses, 2.0, 0.8)
        bank = update_memory_bank(bank, torch.tensor(timesteps), torch.tensor(losses, dtype=torch.float32), 0.8)
    np.testing.assert_allclose(bank.numpy(), bank_ref, atol=1e-6)


def test_taa_strength_is_strongest_at_the_threshold():
    bank = torch.tensor([1.0, 1.0, 1.0])
    losses = torch.tensor([0.5, 1.0, 3.0])  # λ·ℓ = 1 sits exactly on m = 1
    distance = threshold_distance(bank, torch.tensor([0, 1, 2]), losses, lam=2.0)
    strength = augmentation_strength(distance)
    np.testing.assert_allclose(distance.numpy(), [0.0, 1.0, 5.0])
    np.testing.assert_allclose(strength.numpy(), np.exp([-0.0, -5.0, -25.0]), rtol=1e-6)
    # An empty bank entry (m = 0, the start of training) gives strength 0, not NaN.
    assert augmentation_strength(threshold_distance(torch.zeros(1), torch.tensor([0]), torch.tensor([0.3]), 2.0)).item() == 0.0


def test_augment_leaves_strength_zero_unchanged_and_changes_strength_one():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 16, 16, generator=generator) * 2 - 1
    strength = torch.tensor([0.0] * 4 + [1.0] * 4)
    out = augment(images, strength, TAAConfig(flip=True), generator)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out[:4], images[:4], atol=1e-5, rtol=0)
    assert (out[4:] - images[4:]).abs().mean() > 0.05


def test_augment_is_deterministic_given_the_generator():
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    strength = torch.full((4,), 0.7)
    a = augment(images, strength, TAAConfig(), torch.Generator().manual_seed(3))
    b = augment(images, strength, TAAConfig(), torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
