"""The proxy model and its local training, driven through ProxyTrainer's public methods."""

import copy

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from memshard.config import build_config
from memshard.shard_worker.faults import FAULTS_ENV, FaultPlan
from memshard.shard_worker.trainer import NonFiniteLossError, ProxyTrainer


@pytest.fixture(scope="module")
def digits_8x8():
    return np.round(load_digits().images * 255 / 16).astype(np.uint8)[:, None]


def make_trainer(digits_8x8, shard=0, **sets):
    cfg = build_config("tiny", sets=[f"{k}={v}" for k, v in sets.items()])
    return ProxyTrainer(cfg, digits_8x8, shard)


def test_model_matches_config(digits_8x8):
    trainer = make_trainer(digits_8x8)
    assert trainer.model.config.sample_size == 8 and trainer.model.config.in_channels == 1
    assert tuple(trainer.model.config.block_out_channels) == (16, 32)
    assert trainer.scheduler.config.num_train_timesteps == 1000


def test_local_steps_lower_the_loss_on_a_tiny_shard(digits_8x8):
    trainer = make_trainer(digits_8x8, **{"training.learning_rate": 1e-3})
    shard = np.arange(64)
    before = trainer.score(shard, seed=5).mean()
    result = trainer.train_round(shard, 60)
    after = trainer.score(shard, seed=5).mean()
    assert after < 0.7 * before, (before, after)
    assert result.steps == 60 and result.images_per_second > 0 and np.isfinite(result.mean_loss_all)


def test_round_result_is_aligned_with_the_shard_and_counts_agc_skips(digits_8x8):
    trainer = make_trainer(digits_8x8, **{"training.learning_rate": 1e-3})
    shard = np.arange(100, 148)
    trainer.train_round(shard, 20)  # fill the memory bank
    result = trainer.train_round(shard, 30)
    np.testing.assert_array_equal(result.indices, shard)
    assert result.seen_counts.sum() == 30 * 16
    assert result.skip_counts.sum() > 0 and 0 < result.kept_fraction < 1
    assert result.kept_fraction == pytest.approx(1 - result.skip_counts.sum() / result.seen_counts.sum())
    assert np.all(result.skip_counts <= result.seen_counts)
    drawn = result.seen_counts > 0
    assert np.all(np.isfinite(result.mean_loss[drawn])) and np.all(np.isnan(result.mean_loss[~drawn]))


def test_skips_split_into_stale_and_low_loss_by_the_age_of_the_bank_entry(digits_8x8):
    """A skip is stale when its bank entry was written more than stale_after_steps (3 × ⌈1000/16⌉ = 189 in
    tiny) steps before; the split is counted only, so both copies skip the same samples."""
    trainer = make_trainer(digits_8x8, **{"training.learning_rate": 1e-3})
    shard = np.arange(100, 148)
    trainer.train_round(shard, 20)  # fill the memory bank
    state = trainer.state_dict()
    recent, old = make_trainer(digits_8x8), make_trainer(digits_8x8)
    recent.load_state_dict(copy.deepcopy(state))
    aged = copy.deepcopy(state)
    aged["bank_written_at"] = torch.full_like(state["bank_written_at"], state["global_step"] - 1000)
    old.load_state_dict(aged)
    fresh, stale = recent.train_round(shard, 30), old.train_round(shard, 30)
    np.testing.assert_array_equal(fresh.skip_counts, stale.skip_counts)
    assert fresh.skip_counts.sum() > 0 and fresh.skips_stale == 0 and fresh.skips_low_loss == fresh.skip_counts.sum()
    assert stale.skips_stale > 0 and stale.skips_stale + stale.skips_low_loss == stale.skip_counts.sum()


def test_plain_iet_never_skips(digits_8x8):
    trainer = make_trainer(digits_8x8, **{"iet.method": "iet"})
    shard = np.arange(32)
    trainer.train_round(shard, 10)
    result = trainer.train_round(shard, 10)
    assert result.kept_fraction == 1.0 and result.skip_counts.sum() == 0


def test_training_is_deterministic_given_the_seeds(digits_8x8):
    shard = np.arange(40)
    runs = []
    for _ in range(2):
        trainer = make_trainer(digits_8x8, shard=1)
        trainer.train_round(shard, 8)
        runs.append(trainer.get_weights())
    for name in runs[0]:
        np.testing.assert_array_equal(runs[0][name], runs[1][name])
    other_shard = make_trainer(digits_8x8, shard=2)
    other_shard.train_round(shard, 8)
    assert any(not np.array_equal(runs[0][n], w) for n, w in other_shard.get_weights().items())


def test_weights_round_trip_as_cpu_numpy(digits_8x8):
    a, b = make_trainer(digits_8x8), make_trainer(digits_8x8)
    a.train_round(np.arange(32), 5)
    weights = a.get_weights()
    assert all(isinstance(w, np.ndarray) for w in weights.values())
    b.set_weights(weights)
    np.testing.assert_allclose(a.score(np.arange(8), seed=0), b.score(np.arange(8), seed=0), rtol=1e-6)


def test_score_depends_only_on_seed_and_sample(digits_8x8):
    trainer = make_trainer(digits_8x8)
    together = trainer.score(np.array([3, 1500, 7]), seed=9)
    alone = np.array([trainer.score(np.array([i]), seed=9)[0] for i in (3, 1500, 7)])
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    assert not np.allclose(trainer.score(np.array([3]), seed=10), together[:1])


def test_state_dict_resumes_bitwise(digits_8x8):
    shard = np.arange(48)
    straight = make_trainer(digits_8x8)
    straight.train_round(shard, 4)
    straight.train_round(shard, 4)
    first = make_trainer(digits_8x8)
    first.train_round(shard, 4)
    state = first.state_dict()
    resumed = make_trainer(digits_8x8)
    resumed.load_state_dict(state)
    resumed.train_round(shard, 4)
    for name, weight in straight.get_weights().items():
        np.testing.assert_array_equal(resumed.get_weights()[name], weight)
    torch.testing.assert_close(resumed.memory_bank, straight.memory_bank, rtol=0, atol=0)


def test_the_ema_follows_diffusers_warmup_decay_and_resumes_bitwise(digits_8x8):
    shard = np.arange(48)
    trainer = make_trainer(digits_8x8, **{"training.ema": "true"})
    trainer.train_round(shard, 1)
    after_one = trainer.get_weights()
    for name, value in trainer.get_ema_weights().items():  # decay 0 at the first step: the EMA is the weights
        np.testing.assert_array_equal(value, after_one[name])
    state = copy.deepcopy(trainer.state_dict())  # a snapshot: on the CPU the state holds references, as torch's
    trainer.train_round(shard, 1)
    decay = 1 - 2 ** -0.75  # min(0.9999, 1 - (1 + n)^-0.75) at the second step (n = 1)
    after_two, ema = trainer.get_weights(), trainer.get_ema_weights()
    for name, value in ema.items():
        np.testing.assert_allclose(value, decay * after_one[name] + (1 - decay) * after_two[name], rtol=1e-5, atol=1e-7)
    assert any(not np.array_equal(ema[n], after_two[n]) for n in ema)

    resumed = make_trainer(digits_8x8, **{"training.ema": "true"})
    resumed.load_state_dict(state)
    resumed.train_round(shard, 1)
    for name, value in resumed.get_ema_weights().items():
        np.testing.assert_array_equal(value, ema[name])
    with pytest.raises(ValueError, match="without training.ema"):
        make_trainer(digits_8x8, **{"training.ema": "true"}).load_state_dict(make_trainer(digits_8x8).state_dict())


def test_set_weights_continues_the_ema_from_the_given_average(digits_8x8):
    a, b = make_trainer(digits_8x8, **{"training.ema": "true"}), make_trainer(digits_8x8, **{"training.ema": "true"})
    a.train_round(np.arange(32), 3)
    b.set_weights(a.get_weights(), a.get_ema_weights())
    for name, value in a.get_ema_weights().items():
        np.testing.assert_array_equal(b.get_ema_weights()[name], value)
    with pytest.raises(ValueError, match="keeps no EMA"):
        make_trainer(digits_8x8).get_ema_weights()


def test_a_test_fault_plan_makes_a_real_nan_on_its_shard_only(digits_8x8):
    shard = np.arange(32)
    planned = make_trainer(digits_8x8, shard=1)
    planned.faults = FaultPlan(shard=1, nan_at_step=5)
    planned.train_round(shard, 3)  # steps 0-2
    with pytest.raises(NonFiniteLossError) as error:
        planned.train_round(shard, 3)  # steps 3-5
    assert (error.value.shard, error.value.step) == (1, 5)
    other = make_trainer(digits_8x8, shard=0)
    other.faults = FaultPlan(shard=1, nan_at_step=2)
    assert np.isfinite(other.train_round(shard, 4).mean_loss_all)


def test_fault_plans_come_only_from_the_test_environment_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    assert FaultPlan.from_environment() is None
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(tmp_path))
    monkeypatch.setenv(FAULTS_ENV, '{"shard": 1, "exit_at_steps": [4, 5]}')
    assert FaultPlan.from_environment() == FaultPlan(shard=1, exit_at_steps=(4, 5),
                                                     marker_dir=str(tmp_path / ".memshard" / "faults"))
    monkeypatch.setenv(FAULTS_ENV, '{"shard": 1, "explode_at": 3}')
    with pytest.raises(ValueError, match="explode_at"):
        FaultPlan.from_environment()
