"""Server-side optimizers for the averaged model (method.md §8): small pure functions over state dicts.

With θ the global weights before a round and θ̄ = Σ_k (n_k/n) θ_k the FedAvg of the proxies after it,
the pseudo-gradient is Δ = θ̄ − θ, and each optimizer is one step on it (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021, Algorithm 2; Hsu et al. 2019 for FedAvgM):

- `fedavg`:   θ ← θ + Δ (= θ̄)
- `fedavgm`:  m ← β·m + Δ;                     θ ← θ + η_s·m      (β = 0, η_s = 1 is FedAvg)
- `fedadam`:  m ← β₁m + (1−β₁)Δ;  v ← β₂v + (1−β₂)Δ²;                θ ← θ + η·m/(√v + τ)
- `fedyogi`:  m as fedadam;       v ← v − (1−β₂)Δ²·sign(v − Δ²);    θ ← θ + η·m/(√v + τ)

The moments start at zero and there is no bias correction, as in Reddi et al.'s Algorithm 2 and Flower's
FedAvgM and FedYogi. Flower's FedAdam differs: it scales η by Adam's bias correction,
√(1−β₂^(t+1)) / (1−β₁^(t+1)) at server round t, so its early steps are larger than `fedadam`'s here.
Defaults: fedadam's and fedyogi's hyperparameters are Flower's; fedavgm's momentum is method.md's 0.9
(Flower's FedAvgM defaults to 0, which is plain FedAvg).

Every function is `(global_state, averaged, server_state, **hyperparameters) -> (new_global, new_server_state)`
and touches none of its inputs. Only float parameters get the server step. Integer and bool entries
(step counters such as BatchNorm's `num_batches_tracked`) and running statistics (`running_mean`,
`running_var`, or any name passed in `buffers`) are not parameters: they take θ̄'s value, exactly as
FedAvg would, and have no moments. Arithmetic is float64; results keep each array's dtype and moments
are kept in at least float32.

`server_optimizer_settings(name, chosen)` is the one check of an optimizer's name and hyperparameters
(which it takes, and each one's range: a decay in [0, 1), a rate or τ > 0); the optimizers apply the
same range check when called directly. Its errors start with the setting's name, so a caller that
keeps the settings in a section (the config's `aggregation`) prefixes the section.

`ServerState` holds the moments between rounds; `to_checkpoint()` / `ServerState.from_checkpoint()`
turn it into a flat `{name: np.ndarray}` dict for the round checkpoint and back.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memshard.aggregation.average import AggregationError, StateDict, _cast_like, check_compatible, weighted_average
from memshard.errors import shown

# Buffers of torch.nn.BatchNorm*: averaged and copied like FedAvg, never given moments.
RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
_ROUNDS_KEY = "rounds"
_MOMENT_PREFIX = {"m": "m/", "v": "v/"}


@dataclass(frozen=True)
class ServerState:
    """The server optimizer's memory between rounds: first and second moments per float parameter.

    `m` / `v` are empty until the optimizer that uses them has taken a step; `rounds` counts server steps.
    """

    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)
    rounds: int = 0

    def to_checkpoint(self) -> dict[str, np.ndarray]:
        """A flat dict of numpy arrays: `rounds`, `m/<name>`, `v/<name>` (copies)."""
        flat = {_ROUNDS_KEY: np.asarray(self.rounds, dtype=np.int64)}
        for moment in ("m", "v"):
            flat.update({_MOMENT_PREFIX[moment] + name: np.array(array)
                         for name, array in getattr(self, moment).items()})
        return flat

    @classmethod
    def from_checkpoint(cls, flat: Mapping[str, np.ndarray]) -> ServerState:
        """The state `to_checkpoint` wrote (arrays copied: checkpoint arrays may be read-only)."""
        if _ROUNDS_KEY not in flat:
            raise AggregationError("not a server optimizer state: no 'rounds' entry")
        unknown = [key for key in flat if key != _ROUNDS_KEY and not key.startswith(("m/", "v/"))]
        if unknown:
            raise AggregationError(f"not a server optimizer state: unexpected entries {sorted(unknown)[:3]}")
        moments = {moment: {key[len(prefix):]: np.array(array) for key, array in flat.items()
                            if key.startswith(prefix)} for moment, prefix in _MOMENT_PREFIX.items()}
        return cls(m=moments["m"], v=moments["v"], rounds=int(np.asarray(flat[_ROUNDS_KEY])))


def is_parameter(name: str, array: np.ndarray, buffers: Collection[str] = ()) -> bool:
    """Whether the server step applies to this entry: float dtype, not a running statistic or buffer."""
    if not np.issubdtype(array.dtype, np.floating):
        return False
    return name not in buffers and name.rsplit(".", 1)[-1] not in RUNNING_STATISTICS


def fedavg(global_state: StateDict, averaged: StateDict, state: ServerState, *,
           buffers: Collection[str] = ()) -> tuple[dict[str, np.ndarray], ServerState]:
    """θ ← θ + Δ, i.e. θ̄ itself (copied); the server state only counts the round."""
    check_compatible(global_state, averaged, "averaged state dict")
    return {name: np.array(array) for name, array in averaged.items()}, _next(state, state.m, state.v)


def fedavgm(global_state: StateDict, averaged: StateDict, state: ServerState, *,
            server_learning_rate: float = 1.0, server_momentum: float = 0.9,
            buffers: Collection[str] = ()) -> tuple[dict[str, np.ndarray], ServerState]:
    """m ← β·m + Δ; θ ← θ + η_s·m (Hsu et al. 2019)."""
    _check_ranges(server_learning_rate=server_learning_rate, server_momentum=server_momentum)
    new, moments = _apply(global_state, averaged, state, buffers, ("m",),
                          lambda delta, m, v: _fedavgm_step(delta, m, server_learning_rate, server_momentum))
    return new, _next(state, moments["m"], state.v)


def fedadam(global_state: StateDict, averaged: StateDict, state: ServerState, *,
            eta: float = 1e-1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-9,
            buffers: Collection[str] = ()) -> tuple[dict[str, np.ndarray], ServerState]:
    """m ← β₁m + (1−β₁)Δ; v ← β₂v + (1−β₂)Δ²; θ ← θ + η·m/(√v + τ) (Reddi et al. 2021)."""
    return _adaptive(global_state, averaged, state, eta, beta_1, beta_2, tau, buffers,
                     lambda v, square: beta_2 * v + (1 - beta_2) * square)


def fedyogi(global_state: StateDict, averaged: StateDict, state: ServerState, *,
            eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3,
            buffers: Collection[str] = ()) -> tuple[dict[str, np.ndarray], ServerState]:
    """fedadam with v ← v − (1−β₂)Δ²·sign(v − Δ²): v grows only as fast as Δ² demands (Reddi et al. 2021)."""
    return _adaptive(global_state, averaged, state, eta, beta_1, beta_2, tau, buffers,
                     lambda v, square: v - (1 - beta_2) * square * np.sign(v - square))


ServerOptimizer = Callable[..., tuple[dict[str, np.ndarray], ServerState]]

SERVER_OPTIMIZERS: dict[str, ServerOptimizer] = {
    "fedavg": fedavg,
    "fedavgm": fedavgm,
    "fedadam": fedadam,
    "fedyogi": fedyogi,
}


# Each hyperparameter's range, decided here once: a decay (momentum, β) in [0, 1); a rate or τ > 0.
DECAYS = ("server_momentum", "beta_1", "beta_2")


def server_optimizer(name: str) -> ServerOptimizer:
    """The server optimizer called `name` (one of SERVER_OPTIMIZERS)."""
    try:
        return SERVER_OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise AggregationError(f"server_optimizer = {shown(name)} is not a server optimizer: choose one of "
                               f"{', '.join(SERVER_OPTIMIZERS)}") from None


def server_optimizer_settings(name: str, chosen: Mapping[str, float]) -> dict[str, float]:
    """The hyperparameters the optimizer `name` runs with: `chosen`, and the optimizer's own defaults
    (Flower's) for the rest. An unknown name, a setting `name` does not take or a value out of range
    is an AggregationError whose message starts with the setting's name."""
    defaults = {key: value for key, value in (server_optimizer(name).__kwdefaults__ or {}).items() if key != "buffers"}
    foreign = sorted(set(chosen) - set(defaults))
    if foreign:
        raise AggregationError(f"{foreign[0]} is not a setting of the server optimizer {name} "
                               f"(it takes {', '.join(defaults) or 'none'}): drop it, or choose the optimizer that uses it")
    _check_ranges(**chosen)
    return {**defaults, **chosen}


def server_update(name: str, global_state: StateDict, results: Sequence[tuple[StateDict, float]],
                  state: ServerState, hyperparameters: Mapping[str, Any] | None = None,
                  ) -> tuple[dict[str, np.ndarray], ServerState]:
    """One round on the server: θ̄ = weighted_average(results) (`(state_dict, n_k)` pairs), then the
    optimizer `name` with `hyperparameters` (checked by `server_optimizer_settings`)."""
    settings = server_optimizer_settings(name, hyperparameters or {})
    return server_optimizer(name)(global_state, weighted_average(results), state, **settings)


# ---------------------------------------------------------------- internals


def _adaptive(global_state, averaged, state, eta, beta_1, beta_2, tau, buffers, second_moment):
    """The FedAdam/FedYogi step; `second_moment(v, Δ²)` is the v update that tells them apart."""
    _check_ranges(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def step(delta, m, v):
        m = beta_1 * m + (1 - beta_1) * delta
        v = second_moment(v, delta**2)
        return eta * m / (np.sqrt(v) + tau), m, v

    new, moments = _apply(global_state, averaged, state, buffers, ("m", "v"), step)
    return new, _next(state, moments["m"], moments["v"])


def _fedavgm_step(delta, m, lr, momentum):
    m = momentum * m + delta
    return lr * m, m, None


def _apply(global_state: StateDict, averaged: StateDict, state: ServerState, buffers: Collection[str],
           moments: tuple[str, ...], step) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """θ ← θ + update for every parameter, θ̄ for everything else; `step(Δ, m, v) -> (update, m, v)` in float64."""
    check_compatible(global_state, averaged, "averaged state dict")
    previous = {moment: getattr(state, moment) for moment in moments}
    for moment, stored in previous.items():
        if stored:
            _check_moments(global_state, stored, moment, buffers)
    new: dict[str, np.ndarray] = {}
    kept: dict[str, dict[str, np.ndarray]] = {moment: {} for moment in moments}
    for name, theta in global_state.items():
        if not is_parameter(name, theta, buffers):
            new[name] = np.array(averaged[name])
            continue
        theta64 = theta.astype(np.float64)
        delta = averaged[name].astype(np.float64) - theta64
        m = previous["m"][name].astype(np.float64) if previous.get("m") else np.zeros_like(delta)
        v = previous["v"][name].astype(np.float64) if previous.get("v") else np.zeros_like(delta)
        update, m, v = step(delta, m, v)
        new[name] = _cast_like(theta64 + update, theta.dtype)
        moment_dtype = np.result_type(theta.dtype, np.float32)
        for moment, value in (("m", m), ("v", v)):
            if moment in kept:
                kept[moment][name] = value.astype(moment_dtype)
    return new, kept


def _check_moments(global_state: StateDict, stored: Mapping[str, np.ndarray], moment: str,
                   buffers: Collection[str]) -> None:
    expected = {name for name, array in global_state.items() if is_parameter(name, array, buffers)}
    if set(stored) != expected:
        missing, extra = sorted(expected - set(stored)), sorted(set(stored) - expected)
        raise AggregationError(f"server state {moment} does not match the model: missing {missing[:3]}, "
                               f"unexpected {extra[:3]}")
    for name in expected:
        if stored[name].shape != global_state[name].shape:
            raise AggregationError(f"server state {moment}: {name} has shape {stored[name].shape}, "
                                   f"expected {global_state[name].shape}")


def _next(state: ServerState, m: dict[str, np.ndarray], v: dict[str, np.ndarray]) -> ServerState:
    return ServerState(m=m, v=v, rounds=state.rounds + 1)


def _check_ranges(**hyperparameters: float) -> None:
    for key, value in hyperparameters.items():
        decay = key in DECAYS
        if not (np.isfinite(value) and (0.0 <= value < 1.0 if decay else value > 0)):
            raise AggregationError(f"{key} = {value}: must be {'in [0, 1)' if decay else '> 0'}")
