"""Server-side optimizers (method.md §8) against updates computed by hand."""

import io

import numpy as np
import pytest

from memshard.aggregation import (
    SERVER_OPTIMIZERS,
    AggregationError,
    ServerState,
    fedadam,
    fedavg,
    fedavgm,
    fedyogi,
    server_optimizer,
    server_update,
    weighted_average,
)


def vector(*values):
    return {"w": np.array(values, dtype=np.float64)}


def random_model(rng):
    return {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=4).astype(np.float32),
        "norm.running_mean": rng.normal(size=4).astype(np.float32),
        "norm.num_batches_tracked": np.array(rng.integers(0, 100), dtype=np.int64),
    }


def test_registry_names_every_optimizer():
    assert SERVER_OPTIMIZERS == {"fedavg": fedavg, "fedavgm": fedavgm, "fedadam": fedadam, "fedyogi": fedyogi}
    assert server_optimizer("fedyogi") is fedyogi
    with pytest.raises(AggregationError, match="server_optimizer = 'adam' is not a server optimizer: choose one of fedavg, fedavgm"):
        server_optimizer("adam")


def test_fedavgm_without_momentum_and_unit_rate_is_fedavg_round_after_round():
    rng = np.random.default_rng(0)
    plain = momentum = random_model(rng)
    plain_state = momentum_state = ServerState()
    for _ in range(3):
        proxies = [({k: v + rng.normal(size=v.shape).astype(v.dtype) if v.dtype == np.float32 else v + 5
                     for k, v in momentum.items()}, n) for n in (30, 10, 20)]
        plain, plain_state = server_update("fedavg", plain, proxies, plain_state)
        momentum, momentum_state = server_update(
            "fedavgm", momentum, proxies, momentum_state, {"server_momentum": 0.0, "server_learning_rate": 1.0})
        expected = weighted_average(proxies)
        for name in expected:
            np.testing.assert_array_equal(momentum[name], expected[name])
            np.testing.assert_array_equal(plain[name], expected[name])
            assert momentum[name].dtype == expected[name].dtype
    assert momentum_state.rounds == plain_state.rounds == 3
    assert set(momentum_state.m) == {"conv.weight", "conv.bias"} and not momentum_state.v  # no moments on buffers


def test_two_rounds_of_fedavgm_by_hand():
    theta, state = vector(1.0, 2.0), ServerState()
    # round 1: Δ = (1.5, 1.0) − (1, 2) = (0.5, −1); m = Δ; θ = θ + 2·m = (2, 0)
    theta, state = fedavgm(theta, vector(1.5, 1.0), state, server_learning_rate=2.0, server_momentum=0.5)
    np.testing.assert_allclose(state.m["w"], [0.5, -1.0])
    np.testing.assert_allclose(theta["w"], [2.0, 0.0])
    # round 2: Δ = (2.5, 0.5) − (2, 0) = (0.5, 0.5); m = 0.5·(0.5, −1) + Δ = (0.75, 0); θ = (2 + 1.5, 0)
    theta, state = fedavgm(theta, vector(2.5, 0.5), state, server_learning_rate=2.0, server_momentum=0.5)
    np.testing.assert_allclose(state.m["w"], [0.75, 0.0])
    np.testing.assert_allclose(theta["w"], [3.5, 0.0])
    assert state.rounds == 2


def test_one_step_of_fedadam_by_hand():
    theta = vector(1.0, -1.0)
    # Δ = (0.2, −0.4); m = 0.1·Δ = (0.02, −0.04); v = 0.01·Δ² = (0.0004, 0.0016); √v = (0.02, 0.04)
    new, state = fedadam(theta, vector(1.2, -1.4), ServerState(), eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    np.testing.assert_allclose(state.m["w"], [0.02, -0.04])
    np.testing.assert_allclose(state.v["w"], [0.0004, 0.0016])
    np.testing.assert_allclose(new["w"], [1.0 + 0.1 * 0.02 / 0.021, -1.0 - 0.1 * 0.04 / 0.041])
    # a second step from that state: Δ = (0, 0) leaves m = 0.9·m, v = 0.99·v
    newer, state = fedadam(new, new, state, eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    np.testing.assert_allclose(state.m["w"], [0.018, -0.036])
    np.testing.assert_allclose(state.v["w"], [0.000396, 0.001584])
    np.testing.assert_allclose(newer["w"] - new["w"],
                               [0.1 * 0.018 / (np.sqrt(0.000396) + 1e-3), -0.1 * 0.036 / (np.sqrt(0.001584) + 1e-3)])


def test_one_step_of_fedyogi_by_hand_differs_from_adam_where_it_should():
    theta = vector(1.0, -1.0)
    state = ServerState(m={"w": np.zeros(2)}, v={"w": np.array([0.05, 0.0001])}, rounds=4)
    # Δ = (0.2, −0.4), Δ² = (0.04, 0.16); sign(v − Δ²) = (+1, −1)
    # v = v − 0.01·Δ²·sign = (0.05 − 0.0004, 0.0001 + 0.0016) = (0.0496, 0.0017); m = 0.1·Δ = (0.02, −0.04)
    new, after = fedyogi(theta, vector(1.2, -1.4), state, eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)
    np.testing.assert_allclose(after.v["w"], [0.0496, 0.0017])
    np.testing.assert_allclose(after.m["w"], [0.02, -0.04])
    np.testing.assert_allclose(new["w"], [1.0 + 0.01 * 0.02 / (np.sqrt(0.0496) + 1e-3),
                                          -1.0 - 0.01 * 0.04 / (np.sqrt(0.0017) + 1e-3)])
    assert after.rounds == 5
    _, adam = fedadam(theta, vector(1.2, -1.4), state, eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)
    np.testing.assert_allclose(adam.v["w"], [0.99 * 0.05 + 0.0004, 0.99 * 0.0001 + 0.0016])  # Adam: (0.0499, 0.001699)


def test_counters_and_running_statistics_are_averaged_and_copied_not_stepped():
    rng = np.random.default_rng(1)
    theta = random_model(rng)
    proxies = [(random_model(rng), 1), (random_model(rng), 3)]
    averaged = weighted_average(proxies)
    for name in SERVER_OPTIMIZERS:
        new, state = server_update(name, theta, proxies, ServerState())
        np.testing.assert_array_equal(new["norm.num_batches_tracked"], averaged["norm.num_batches_tracked"])
        np.testing.assert_array_equal(new["norm.running_mean"], averaged["norm.running_mean"])
        assert {key: array.dtype for key, array in new.items()} == {key: array.dtype for key, array in theta.items()}
        assert all(set(moments) <= {"conv.weight", "conv.bias"} for moments in (state.m, state.v))
    # a float buffer named by the caller is treated the same way
    new, state = fedadam(theta, averaged, ServerState(), buffers={"conv.bias"})
    np.testing.assert_array_equal(new["conv.bias"], averaged["conv.bias"])
    assert set(state.m) == set(state.v) == {"conv.weight"}


def test_inputs_are_not_modified():
    rng = np.random.default_rng(2)
    theta, averaged = random_model(rng), random_model(rng)
    copies = {k: v.copy() for k, v in theta.items()}, {k: v.copy() for k, v in averaged.items()}
    _, state = fedadam(theta, averaged, ServerState())
    saved = {k: v.copy() for k, v in state.m.items()}
    fedadam(theta, averaged, state)
    for original, copy in zip((theta, averaged), copies, strict=True):
        for name in original:
            np.testing.assert_array_equal(original[name], copy[name])
    for name in saved:
        np.testing.assert_array_equal(state.m[name], saved[name])


def test_server_state_round_trips_through_a_checkpoint_file():
    rng = np.random.default_rng(3)
    theta = random_model(rng)
    state = ServerState()
    for _ in range(2):
        theta, state = fedyogi(theta, random_model(rng), state)
    flat = state.to_checkpoint()
    assert all(isinstance(array, np.ndarray) for array in flat.values())
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    buffer.seek(0)
    with np.load(buffer) as loaded:
        restored = ServerState.from_checkpoint(dict(loaded))
    assert restored.rounds == 2 and set(restored.m) == set(state.m) and set(restored.v) == set(state.v)
    for name in state.m:
        np.testing.assert_array_equal(restored.m[name], state.m[name])
        np.testing.assert_array_equal(restored.v[name], state.v[name])
        assert restored.m[name].dtype == np.float32
    step = random_model(rng)
    (a, _), (b, _) = fedyogi(theta, step, state), fedyogi(theta, step, restored)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert ServerState.from_checkpoint(ServerState().to_checkpoint()) == ServerState()


@pytest.mark.parametrize("call, message", [
    (lambda t: server_update("fedadam", t, [(t, 1)], ServerState(), {"lr": 0.1}),
     "lr is not a setting of the server optimizer fedadam \\(it takes eta, beta_1, beta_2, tau\\)"),
    (lambda t: server_update("fedavgm", t, [(t, 1)], ServerState(), {"server_momentum": 1.0}),
     "server_momentum = 1.0: must be in \\[0, 1\\)"),
    (lambda t: fedavgm(t, t, ServerState(), server_momentum=1.0), "server_momentum = 1.0: must be in"),
    (lambda t: fedadam(t, t, ServerState(), tau=0.0), "tau = 0.0: must be > 0"),
    (lambda t: fedadam(t, t, ServerState(m={"conv.weight": np.zeros((4, 3, 3, 3))}, v={})),
     "server state m does not match the model: missing \\['conv.bias'\\]"),
    (lambda t: fedavgm(t, {**t, "extra": np.zeros(1)}, ServerState()), "different keys"),
    (lambda t: ServerState.from_checkpoint({"m/w": np.zeros(1)}), "no 'rounds' entry"),
])
def test_bad_inputs_are_one_line_errors(call, message):
    with pytest.raises(AggregationError, match=message) as error:
        call(random_model(np.random.default_rng(4)))
    assert "\n" not in str(error.value)
