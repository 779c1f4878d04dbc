"""Ambient training at high noise (method.md §10): the loss against hand-computed cases, the fixed copies
(a function of the run seed and the row alone) and training with it, through ProxyTrainer."""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from memshard.config import build_config
from memshard.errors import MemshardError
from memshard.model import (
    Ambient,
    ambient_coefficients,
    ambient_setting,
    build_scheduler,
    build_unet,
    noised_from_copy,
    per_sample_loss,
)
from memshard.orchestrator.settings import check
from memshard.shard_worker.trainer import ProxyTrainer

LEVEL = 0.8  # the published σ_n = 0.5


@pytest.fixture(scope="module")
def digits_8x8():
    return np.round(load_digits().images * 255 / 16).astype(np.uint8)[:, None]


@pytest.fixture(scope="module")
def tiny():
    """A tiny untrained UNet, its schedule, and a batch of 8x8 one-channel images with fixed draws."""
    cfg = build_config("tiny")
    torch.manual_seed(0)
    unet = build_unet(cfg, 1).eval()
    generator = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 1, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    copy_noise = torch.randn(x0.shape, generator=generator)
    return cfg, unet, build_scheduler(cfg), x0, noise, copy_noise


def ambient_cfg(level=LEVEL, **sets):
    sets = {"training.ambient_alpha_bar": level, **sets}
    return build_config("tiny", sets=[f"{k}={v}" for k, v in sets.items()])


# ---------------------------------------------------------------- the loss


def test_posterior_coefficients_match_a_hand_computed_case():
    c0, c1 = ambient_coefficients(torch.tensor(0.3, dtype=torch.float64), 0.8)
    # c0 = √0.8 (1 − 0.3/0.8) / 0.7 = 0.894427191 · 0.625 / 0.7;  c1 = √0.375 · 0.2 / 0.7
    assert float(c0) == pytest.approx(0.798595706, abs=1e-9)
    assert float(c1) == pytest.approx(0.174963553, abs=1e-9)
    # The posterior mean is unbiased: with x̂0 = x0, E[ŷ] = (c0 + c1 √ᾱ_t) x0 must be √ᾱ_n x0 = E[y].
    assert float(c0 + c1 * math.sqrt(0.3)) == pytest.approx(math.sqrt(0.8), abs=1e-12)


def test_at_the_copy_level_the_input_and_the_prediction_of_the_copy_are_the_copy_itself():
    level = torch.tensor(0.8, dtype=torch.float64)
    c0, c1 = ambient_coefficients(level, 0.8)
    assert float(c0) == 0.0 and float(c1) == 1.0  # ŷ = x_t, whatever x̂0 is
    copy, noise = torch.randn(2, 3, 8, 8, dtype=torch.float64).unbind()
    assert torch.equal(noised_from_copy(level, 0.8, copy, noise), copy)


def test_at_the_copy_level_the_x0_weighted_loss_is_zero_for_any_model(tiny):
    _, unet, scheduler, x0, noise, copy_noise = tiny
    t = torch.full((6,), 300)
    level = float(scheduler.alphas_cumprod[300])
    at_level = Ambient(timestep=299, alpha_bar=level, weighting="x0", seed=0)
    with torch.no_grad():
        loss = per_sample_loss(unet, scheduler, x0, t, noise, ambient=at_level, copy_noise=copy_noise)
    assert torch.equal(loss, torch.zeros(6))


def test_the_input_built_from_the_copy_has_the_forward_marginal_of_x0():
    generator = torch.Generator().manual_seed(2)
    x0 = torch.tensor([-0.9, 0.1, 0.7], dtype=torch.float64)
    abar_t, abar_n, draws = torch.tensor(0.3, dtype=torch.float64), 0.8, 400_000
    copy = math.sqrt(abar_n) * x0 + math.sqrt(1 - abar_n) * torch.randn(draws, 3, generator=generator, dtype=torch.float64)
    x_t = noised_from_copy(abar_t, abar_n, copy, torch.randn(draws, 3, generator=generator, dtype=torch.float64))
    torch.testing.assert_close(x_t.mean(0), abar_t.sqrt() * x0, atol=5e-3, rtol=0)
    torch.testing.assert_close(x_t.var(0), (1 - abar_t).expand(3), atol=5e-3, rtol=0)
    # and ŷ with the true x0 is the posterior mean of the copy: an unbiased residual, uncorrelated with x_t
    c0, c1 = ambient_coefficients(abar_t, abar_n)
    residual = copy - (c0 * x0 + c1 * x_t)
    torch.testing.assert_close(residual.mean(0), torch.zeros(3, dtype=torch.float64), atol=3e-3, rtol=0)
    torch.testing.assert_close((residual * (x_t - x_t.mean(0))).mean(0), torch.zeros(3, dtype=torch.float64),
                               atol=3e-3, rtol=0)


@pytest.mark.parametrize("weighting", ["epsilon", "x0"])
def test_with_the_copy_at_x0_the_ambient_loss_is_the_clean_epsilon_loss(tiny, weighting):
    _, unet, scheduler, x0, noise, copy_noise = tiny
    t = torch.tensor([0, 10, 150, 500, 900, 999])
    exact_copy = Ambient(timestep=-1, alpha_bar=1.0, weighting=weighting, seed=0)  # ᾱ_n = 1: y = x0, every t above
    with torch.no_grad():
        clean = per_sample_loss(unet, scheduler, x0, t, noise)
        ambient = per_sample_loss(unet, scheduler, x0, t, noise, ambient=exact_copy, copy_noise=copy_noise)
    torch.testing.assert_close(ambient, clean, rtol=1e-4, atol=1e-7)


def test_the_epsilon_weighting_is_the_epsilon_loss_against_the_target_that_reproduces_the_copy(tiny):
    """Derived independently: with r = a/b, the ε-prediction whose ŷ is y has
    x̂0* = y/√b − √a (1−b) / (b √(1−r)) ε  and  ε* = (x_t − √a x̂0*) / √(1−a); the "x0" weighting is c0² times it."""
    _, unet, scheduler, x0, noise, copy_noise = tiny
    setting = ambient_setting(ambient_cfg(), scheduler)
    t = torch.tensor([setting.timestep + 1, setting.timestep + 20, 300, 500, 800, 999])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).double()
    b = setting.alpha_bar
    copy = math.sqrt(b) * x0.double() + math.sqrt(1 - b) * copy_noise.double()
    x_t = (a / b).sqrt() * copy + (1 - a / b).sqrt() * noise.double()
    x0_star = copy / math.sqrt(b) - a.sqrt() * (1 - b) / (b * (1 - a / b).sqrt()) * noise.double()
    eps_star = (x_t - a.sqrt() * x0_star) / (1 - a).sqrt()
    with torch.no_grad():
        eps_theta = unet(x_t.float(), t).sample.double()
        by_weighting = {w: per_sample_loss(unet, scheduler, x0, t, noise, ambient=Ambient(setting.timestep, b, w, 0),
                                           copy_noise=copy_noise).double() for w in ("epsilon", "x0")}
    expected = ((eps_theta - eps_star) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(by_weighting["epsilon"], expected, rtol=2e-3, atol=0)
    c0, _ = ambient_coefficients(a.view(-1), b)
    torch.testing.assert_close(by_weighting["x0"], c0**2 * expected, rtol=2e-3, atol=0)


def test_a_mixed_batch_keeps_the_clean_loss_below_the_level_and_finite_gradients_at_it(tiny):
    cfg, _, scheduler, x0, noise, copy_noise = tiny
    torch.manual_seed(0)
    unet = build_unet(cfg, 1)
    setting = ambient_setting(ambient_cfg(), scheduler)
    n = setting.timestep
    t = torch.tensor([0, n - 1, n, n + 1, n + 2, 999])  # t = t_n is clean; its ambient weight would be infinite
    loss = per_sample_loss(unet, scheduler, x0, t, noise, ambient=setting, copy_noise=copy_noise)
    with torch.no_grad():
        clean = per_sample_loss(unet, scheduler, x0, t, noise)
    torch.testing.assert_close(loss[:3], clean[:3], rtol=0, atol=0)
    assert not torch.allclose(loss[3:], clean[3:])
    loss.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in unet.parameters() if p.grad is not None)


# ---------------------------------------------------------------- the setting


def test_the_level_is_rounded_to_the_schedule_and_checked_against_it():
    cfg = ambient_cfg()
    alphas_cumprod = build_scheduler(cfg).alphas_cumprod
    setting = ambient_setting(cfg, build_scheduler(cfg))
    assert alphas_cumprod[setting.timestep] >= LEVEL > alphas_cumprod[setting.timestep + 1]
    assert setting.alpha_bar == pytest.approx(float(alphas_cumprod[setting.timestep]))
    assert ambient_setting(build_config("tiny"), build_scheduler(cfg)) is None  # off by default
    with pytest.raises(MemshardError, match="training.ambient_alpha_bar = 0.99999: the schedule"):
        check(ambient_cfg(0.99999))  # above ᾱ_0: nothing would train on clean images
    for bad in (0, 1, 1.5):
        with pytest.raises(MemshardError, match=f"training.ambient_alpha_bar = {bad}.*must be in \\(0, 1\\)"):
            ambient_cfg(bad)
    with pytest.raises(MemshardError, match="training.ambient_weighting = 'edm': choose one of epsilon, x0"):
        ambient_cfg(**{"training.ambient_weighting": "edm"})


# ---------------------------------------------------------------- the fixed copies


def test_a_rows_copy_noise_depends_on_the_seed_and_the_row_alone():
    shape = (1, 8, 8)
    setting = Ambient(timestep=100, alpha_bar=0.8, weighting="epsilon", seed=7)
    whole = setting.copy_noise(np.arange(50), shape)
    torch.testing.assert_close(setting.copy_noise(np.array([42, 3, 17]), shape), whole[[42, 3, 17]], rtol=0, atol=0)
    assert not torch.equal(whole[3], whole[17])
    other_seed = Ambient(timestep=100, alpha_bar=0.8, weighting="epsilon", seed=8).copy_noise(np.arange(50), shape)
    assert not torch.equal(other_seed, whole)
    assert abs(float(whole.mean())) < 0.05 and abs(float(whole.std()) - 1) < 0.05


def test_two_proxies_score_a_row_against_the_same_copy_across_shards_moves_and_resume(digits_8x8):
    """The per-sample scores use the ambient loss, so equal scores at equal weights mean equal copies."""
    rows, scoring_seed = np.arange(200, 232), 3
    first = ProxyTrainer(ambient_cfg(), digits_8x8, shard=0)
    first.train_round(np.arange(0, 48), 3)
    weights = first.get_weights()
    reference = first.score(rows, scoring_seed)

    second = ProxyTrainer(ambient_cfg(), digits_8x8, shard=1)
    second.train_round(np.concatenate([np.arange(48, 80), rows[:8]]), 3)  # rows 200..207 sat in this shard...
    second.train_round(np.arange(80, 120), 3)  # ...and moved away
    second.set_weights(weights)
    np.testing.assert_array_equal(second.score(rows, scoring_seed), reference)

    resumed = ProxyTrainer(ambient_cfg(), digits_8x8, shard=0)
    resumed.load_state_dict(first.state_dict())
    np.testing.assert_array_equal(resumed.score(rows, scoring_seed), reference)

    other_seed = ProxyTrainer(ambient_cfg(**{"training.seed": 1}), digits_8x8, shard=0)
    other_seed.set_weights(weights)
    different = other_seed.score(rows, scoring_seed)
    assert not np.allclose(different, reference)
    clean = ProxyTrainer(build_config("tiny"), digits_8x8, shard=0)
    clean.set_weights(weights)
    assert not np.allclose(clean.score(rows, scoring_seed), reference)


@pytest.mark.parametrize("method", ["ddpm", "iet-agc-plus"])
@pytest.mark.parametrize("weighting", ["epsilon", "x0"])
def test_a_short_ambient_training_run_is_finite_and_deterministic(digits_8x8, method, weighting):
    cfg = ambient_cfg(**{"iet.method": method, "training.ambient_weighting": weighting})
    shard = np.arange(40)
    runs = []
    for _ in range(2):
        trainer = ProxyTrainer(cfg, digits_8x8, shard=1)
        result = trainer.train_round(shard, 6)
        runs.append(trainer.get_weights())
        assert np.isfinite(result.mean_loss_all) and result.seen_counts.sum() == 6 * 16
    for name in runs[0]:
        np.testing.assert_array_equal(runs[0][name], runs[1][name])


def test_an_ambient_proxy_resumes_bitwise(digits_8x8):
    cfg = ambient_cfg(**{"iet.method": "iet-agc-plus"})
    shard = np.arange(64)
    straight = ProxyTrainer(cfg, digits_8x8, shard=0)
    straight.train_round(shard, 4)
    straight.train_round(shard, 4)
    interrupted = ProxyTrainer(cfg, digits_8x8, shard=0)
    interrupted.train_round(shard, 4)
    resumed = ProxyTrainer(cfg, digits_8x8, shard=0)
    resumed.load_state_dict(interrupted.state_dict())
    resumed.train_round(shard, 4)
    for name, weight in straight.get_weights().items():
        np.testing.assert_array_equal(resumed.get_weights()[name], weight)
