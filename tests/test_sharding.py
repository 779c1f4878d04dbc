"""Initial split and MSR as pure functions: conservation, fractions, destinations, the rule registry."""

import numpy as np
import pytest

from memshard.config import build_config
from memshard.errors import MemshardError
from memshard.orchestrator.sharding import (
    DESTINATION_RULES,
    Moves,
    apply_moves,
    check_partition,
    destination_rule,
    is_exchange_round,
    least_familiar_destinations,
    reset_skip_counts,
    ring_destinations,
    select_memorized_samples,
    split_into_shards,
)
from memshard.orchestrator.train import train


def no_losses(candidates):
    raise AssertionError("this rule must not ask the proxies for losses")


def test_split_is_a_seeded_near_equal_partition():
    shards = split_into_shards(103, 4, seed=1)
    assert sorted(len(s) for s in shards) == [25, 26, 26, 26]
    check_partition(shards, 103)
    again = split_into_shards(103, 4, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    assert not np.array_equal(split_into_shards(103, 4, seed=2)[0], shards[0])


def test_balanced_split_spreads_every_class():
    labels = np.repeat(np.arange(5), 40)
    shards = split_into_shards(200, 4, seed=0, labels=labels)
    for shard in shards:
        assert np.array_equal(np.bincount(labels[shard], minlength=5), [10] * 5)


def test_more_shards_than_samples_is_a_clear_error():
    with pytest.raises(MemshardError, match="5 shards for 3 samples"):
        split_into_shards(3, 5, seed=0)


def test_check_partition_catches_lost_and_duplicated_samples():
    with pytest.raises(AssertionError, match="1 samples in no shard, 1 in several"):
        check_partition([np.array([0, 1]), np.array([1, 3])], 4)


def test_selection_ranks_by_skips_then_lower_loss():
    shards = [np.arange(0, 8), np.arange(8, 16)]
    skips = np.zeros(16, dtype=np.int64)
    skips[[2, 5, 9]] = [4, 4, 1]
    loss = np.linspace(1.0, 0.1, 16)  # later indices have lower loss
    selected = select_memorized_samples(shards, skips, loss, fraction=0.25)
    assert selected[0].tolist() == [5, 2]  # equal skips: lower loss (index 5) first
    assert selected[1].tolist() == [9, 15]  # then the lowest-loss sample among the unskipped


def test_ring_moves_the_configured_fraction_to_the_next_shard():
    shards = split_into_shards(120, 3, seed=0)
    skips = np.random.default_rng(0).integers(0, 5, 120)
    selected = select_memorized_samples(shards, skips, np.ones(120), fraction=0.25)
    moves = destination_rule("ring")(selected, no_losses)
    assert len(moves.indices) == sum(round(0.25 * len(s)) for s in shards) == 30
    np.testing.assert_array_equal(moves.destinations, (moves.sources + 1) % 3)
    new = apply_moves(shards, moves, 120)
    for index, destination in zip(moves.indices, moves.destinations, strict=True):
        assert index in new[destination]
    assert [len(s) for s in new] == [len(s) for s in shards]
    assert moves.matrix(3).tolist() == [[0, 10, 0], [0, 0, 10], [10, 0, 0]]


def test_least_familiar_sends_each_sample_to_the_proxy_that_knows_it_least():
    selected = [np.array([0, 1]), np.array([10, 11]), np.array([20, 21])]
    # losses[proxy, candidate]; candidates in order 0, 1, 10, 11, 20, 21
    losses = np.array([
        [0.1, 0.1, 0.9, 0.2, 0.8, 0.3],
        [0.7, 0.3, 0.1, 0.1, 0.2, 0.9],
        [0.2, 0.8, 0.3, 0.9, 0.1, 0.1],
    ])
    asked = []
    moves = destination_rule("least-familiar")(selected, lambda candidates: asked.append(candidates) or losses)
    np.testing.assert_array_equal(asked[0], [0, 1, 10, 11, 20, 21])  # every selected sample, shards in order
    destination = dict(zip(moves.indices.tolist(), moves.destinations.tolist(), strict=True))
    assert destination == {0: 1, 1: 2, 10: 0, 11: 2, 20: 0, 21: 1}
    shards = [np.arange(0, 10), np.arange(10, 20), np.arange(20, 30)]
    new = apply_moves(shards, moves, 30)
    assert [len(s) for s in new] == [10, 10, 10]
    assert 0 in new[1] and 10 in new[0] and 21 in new[1]


def test_least_familiar_keeps_sizes_when_everyone_prefers_one_shard():
    selected = [np.arange(0, 4), np.arange(10, 14), np.arange(20, 24)]
    losses = np.tile(np.array([[0.1], [0.2], [0.9]]), (1, 12))  # proxy 2 knows everything least
    moves = least_familiar_destinations(selected, lambda candidates: losses)
    matrix = moves.matrix(3)
    assert matrix.sum(axis=0).tolist() == matrix.sum(axis=1).tolist()  # each receives what it sends
    assert np.all(moves.destinations != moves.sources)


def test_apply_moves_rejects_a_move_from_the_wrong_shard():
    shards = [np.array([0, 1]), np.array([2, 3])]
    bad = ring_destinations([np.array([2]), np.array([])], no_losses)  # claims shard 0 holds sample 2
    with pytest.raises(AssertionError, match="source shard"):
        apply_moves(shards, bad, 4)


def test_a_sender_resets_all_its_counts_and_moved_resets_the_moved_only():
    shards = [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([6, 7])]
    counts = np.array([5, 4, 3, 9, 8, 7, 6, 1])
    moves = Moves(np.array([0, 3]), np.array([0, 1]), np.array([1, 2]))  # shards 0 and 1 send, shard 2 does not
    sender = reset_skip_counts(counts, shards, moves, "sender")
    assert sender.tolist() == [0, 0, 0, 0, 0, 0, 6, 1]
    assert reset_skip_counts(counts, shards, moves, "moved").tolist() == [0, 4, 3, 0, 8, 7, 6, 1]
    assert counts.tolist() == [5, 4, 3, 9, 8, 7, 6, 1]  # the input is left as it was


def test_exchange_schedule():
    assert [is_exchange_round(r, "alternate") for r in range(1, 6)] == [True, False, True, False, True]
    assert all(is_exchange_round(r, "every") for r in range(1, 6))


def test_the_documented_rules_resolve_to_their_functions():
    # The README's two rules by name; a user's added rule (the README invites one) leaves this test passing.
    assert destination_rule("ring") is ring_destinations
    assert destination_rule("least-familiar") is least_familiar_destinations
    assert all(build_config(preset).msr.rule in DESTINATION_RULES for preset in ("tiny", "digits", "cifar32"))


@pytest.mark.parametrize("start", [destination_rule, lambda name: train(build_config("tiny", sets=[f"msr.rule={name}"]))])
def test_an_unknown_rule_is_a_one_line_error_naming_the_registered_rules(start, monkeypatch, tmp_path):
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(tmp_path))  # train() must fail before it creates an MLflow store or starts Ray
    with pytest.raises(MemshardError) as error:
        start("random")
    assert str(error.value) == f"msr.rule = 'random' is not a destination rule: choose one of {', '.join(DESTINATION_RULES)}"
    assert "ring" in DESTINATION_RULES and "least-familiar" in DESTINATION_RULES
    assert not any(tmp_path.iterdir())


def test_a_new_rule_is_one_function_and_one_registry_entry(monkeypatch):
    def stay_home_but_one(selected, proxy_losses):
        """Moves only shard 0's first selected sample, to the shard whose proxy knows it least."""
        losses = proxy_losses(selected[0][:1])
        return Moves(selected[0][:1], np.zeros(1, dtype=np.int64), np.argmax(losses, axis=0))

    monkeypatch.setitem(DESTINATION_RULES, "stay-home-but-one", stay_home_but_one)
    cfg = build_config("tiny", sets=["msr.rule=stay-home-but-one"])  # the config takes any registered name
    rule = destination_rule(cfg.msr.rule)
    shards = [np.arange(0, 4), np.arange(4, 8)]
    moves = rule([np.array([2, 3]), np.array([5])], lambda candidates: np.array([[0.1], [0.7]]))
    assert moves.indices.tolist() == [2] and moves.destinations.tolist() == [1]
    assert [s.tolist() for s in apply_moves(shards, moves, 8)] == [[0, 1, 3], [2, 4, 5, 6, 7]]
