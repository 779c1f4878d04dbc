"""AGC against a slow reference written straight from method.md §2; TAA's strength and augmentations."""

import numpy as np
import pytest
import torch

from memshard.config import TAAConfig, build_config
from memshard.model import AUGMENTATION_EMBEDDING, AUGMENTATION_PARAMS, build_unet, denoise, state_to_numpy
from memshard.pipeline import build_pipeline
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
    out, parameters = augment(images, strength, TAAConfig(flip=True), generator)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out[:4], images[:4], atol=1e-5, rtol=0)
    assert (out[4:] - images[4:]).abs().mean() > 0.05
    # what non-leaky augmentation conditions on: the zero vector exactly where nothing was done
    assert parameters.shape == (8, AUGMENTATION_PARAMS) and (parameters[:4] == 0).all()
    assert (parameters[4:].abs().sum(dim=1) > 0).all()


def test_augment_reports_the_shift_and_brightness_it_applied():
    images = torch.full((64, 1, 16, 16), -1.0)
    images[:, :, 6:10, 6:10] = 1.0  # a bright square on black
    cfg = TAAConfig(max_translate=0.25, max_brightness=0.2, max_contrast=0.0)
    out, parameters = augment(images, torch.ones(64), cfg, torch.Generator().manual_seed(0))
    shift_x, shift_y, flip, contrast, brightness = parameters.T
    assert (flip == 0).all() and (contrast == 0).all()
    assert shift_x.abs().max() <= 0.25 and brightness.abs().max() <= 0.4
    # grid_sample with shift +s (normalized) reads from x + s: content moves left/up by s of the side
    column_mass = (out > 0).float().sum(dim=(1, 2))  # (64, 16): the square's pixels per column
    centre = (column_mass * torch.arange(16)).sum(dim=1) / column_mass.sum(dim=1)
    assert np.corrcoef(centre.numpy(), shift_x.numpy())[0, 1] < -0.95
    background = out[:, 0, 0, 0]  # a corner pixel: black shifted by the brightness (clamped at -1)
    raised = brightness > 0
    torch.testing.assert_close(background[raised], -1 + brightness[raised], atol=1e-5, rtol=0)


def test_augment_is_deterministic_given_the_generator():
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    strength = torch.full((4,), 0.7)
    a = augment(images, strength, TAAConfig(), torch.Generator().manual_seed(3))
    b = augment(images, strength, TAAConfig(), torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_unet_conditioned_on_augmentation_is_the_sampled_unet_at_the_zero_vector():
    cfg = build_config("tiny", sets=["iet.method=iet-agc-plus", "taa.non_leaky=true"])
    torch.manual_seed(0)
    trained = build_unet(cfg, 1, for_training=True)
    torch.nn.init.normal_(trained.augmentation_embedding.weight)  # as if trained: the map is not zero
    weights = state_to_numpy(trained)
    assert AUGMENTATION_EMBEDDING in weights
    sampled = build_pipeline(cfg, 1, weights).unet  # what is saved, registered and sampled
    assert not hasattr(sampled, "augmentation_embedding") and sampled.config.class_embed_type is None
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 999])
    trained.eval()
    with torch.no_grad():
        expected = sampled(x, t).sample
        torch.testing.assert_close(denoise(trained, x, t), expected, atol=1e-6, rtol=0)  # None: no augmentation
        shifted = denoise(trained, x, t, torch.tensor([[0.1, 0.0, 0.0, 0.0, 0.2]] * 3))
    assert (shifted - expected).abs().max() > 1e-3  # the parameters do reach the network
    # without non_leaky (or without TAA) the training UNet is the plain one
    assert not hasattr(build_unet(build_config("tiny", sets=["taa.non_leaky=true", "iet.method=iet"]), 1,
                                  for_training=True), "augmentation_embedding")
