"""FedAvg as a pure function: properties that hold by construction."""

import numpy as np
import pytest

from memshard.aggregation import AggregationError, weighted_average


def random_state(rng, scale=1.0):
    return {
        "conv.weight": (rng.normal(size=(4, 3, 3, 3)) * scale).astype(np.float32),
        "conv.bias": (rng.normal(size=4) * scale).astype(np.float32),
        "norm.num_batches": np.array(rng.integers(0, 100), dtype=np.int64),
    }


def test_average_of_identical_states_is_identity():
    state = random_state(np.random.default_rng(0))
    averaged = weighted_average([(state, 3), (state, 5), (state, 1)])
    for name in state:
        np.testing.assert_allclose(averaged[name], state[name], rtol=1e-6)
        assert averaged[name].dtype == state[name].dtype


def test_weights_are_normalized_and_sizes_weight_the_mean():
    rng = np.random.default_rng(1)
    a, b = random_state(rng), random_state(rng)
    averaged = weighted_average([(a, 30), (b, 10)])
    expected = 0.75 * a["conv.weight"].astype(np.float64) + 0.25 * b["conv.weight"]
    np.testing.assert_allclose(averaged["conv.weight"], expected, rtol=1e-6)
    scaled = weighted_average([(a, 3000), (b, 1000)])  # only the ratio matters
    np.testing.assert_array_equal(scaled["conv.weight"], averaged["conv.weight"])
    np.testing.assert_allclose(weighted_average([(a, 7)])["conv.bias"], a["conv.bias"])


def test_order_does_not_matter():
    rng = np.random.default_rng(2)
    pairs = [(random_state(rng), n) for n in (5, 9, 2, 7)]
    forward, backward = weighted_average(pairs), weighted_average(pairs[::-1])
    for name in forward:
        np.testing.assert_allclose(forward[name], backward[name], rtol=1e-6)


def test_zero_weight_state_does_not_count():
    rng = np.random.default_rng(3)
    a, b = random_state(rng), random_state(rng)
    np.testing.assert_allclose(weighted_average([(a, 4), (b, 0)])["conv.weight"], a["conv.weight"], rtol=1e-6)


def test_mismatches_and_bad_weights_raise():
    rng = np.random.default_rng(4)
    a = random_state(rng)
    missing = {k: v for k, v in a.items() if k != "conv.bias"}
    reshaped = {**a, "conv.bias": np.zeros(5, np.float32)}
    recast = {**a, "conv.bias": a["conv.bias"].astype(np.float64)}
    with pytest.raises(AggregationError, match="keys"):
        weighted_average([(a, 1), (missing, 1)])
    with pytest.raises(AggregationError, match="shape"):
        weighted_average([(a, 1), (reshaped, 1)])
    with pytest.raises(AggregationError, match="dtype"):
        weighted_average([(a, 1), (recast, 1)])
    with pytest.raises(AggregationError, match="weights"):
        weighted_average([(a, 0), (a, 0)])
    with pytest.raises(AggregationError, match="weights"):
        weighted_average([(a, -1), (a, 2)])
    with pytest.raises(AggregationError, match="nothing"):
        weighted_average([])

