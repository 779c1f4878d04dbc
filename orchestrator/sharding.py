"""Shards as lists of global dataset indices: the initial split and MSR (method.md §1, §3).

A shard is a sorted int64 array of row indices into the dataset; `shards[k]` is what proxy k trains
on. Every function here returns new arrays and checks the invariant that matters for privacy
requests: each sample lives in exactly one shard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from memshard.errors import MemshardError


def split_into_shards(num_samples: int, num_shards: int, seed: int, labels: np.ndarray | None = None) -> list[np.ndarray]:
    """Seeded random split into near-equal shards; with `labels`, each class is spread evenly."""
    if num_shards > num_samples:
        raise MemshardError(
            f"{num_shards} shards for {num_samples} samples leaves shards empty: use --shards {num_samples} or fewer"
        )
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(num_samples)
    else:
        # Deal each class's shuffled members round-robin, continuing where the previous class ended.
        order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    shards = [np.sort(order[k::num_shards]) for k in range(num_shards)]
    check_partition(shards, num_samples)
    return shards


def check_partition(shards: list[np.ndarray], num_samples: int) -> None:
    """Each of the `num_samples` indices is in exactly one shard, and no shard is empty."""
    merged = np.concatenate(shards) if shards else np.empty(0, dtype=np.int64)
    counts = np.bincount(merged, minlength=num_samples) if merged.size else np.zeros(num_samples, int)
    if merged.size and (merged.min() < 0 or merged.max() >= num_samples):
        raise AssertionError(f"shard assignment holds an index outside 0..{num_samples - 1}")
    if np.any(counts != 1):
        lost, duplicated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
        raise AssertionError(
            f"shard assignment broken: {len(lost)} samples in no shard, {len(duplicated)} in several "
            f"(e.g. {(lost.tolist() + duplicated.tolist())[:5]})"
        )
    if any(len(s) == 0 for s in shards):
        raise AssertionError("shard assignment left a shard empty")


@dataclass(frozen=True)
class Moves:
    """Samples leaving their shard this round: global index, source and destination shard."""

    indices: np.ndarray
    sources: np.ndarray
    destinations: np.ndarray

    def matrix(self, num_shards: int) -> np.ndarray:
        """K×K counts, row = from, column = to."""
        counts = np.zeros((num_shards, num_shards), dtype=np.int64)
        np.add.at(counts, (self.sources, self.destinations), 1)
        return counts


def select_memorized_samples(
    shards: list[np.ndarray], skip_counts: np.ndarray, mean_loss: np.ndarray, fraction: float
) -> list[np.ndarray]:
    """Per shard, its top `fraction` by skip count (ties: lower mean loss first), as global indices."""
    selected = []
    for shard in shards:
        take = int(round(fraction * len(shard)))
        take = min(take, len(shard) - 1)  # a shard never sends all its samples away
        loss = np.nan_to_num(mean_loss[shard], nan=np.inf)  # never-drawn samples rank last on ties
        order = np.lexsort((loss, -skip_counts[shard]))  # last key is primary
        selected.append(shard[order[:take]])
    return selected


ProxyLosses = Callable[[np.ndarray], np.ndarray]  # candidates' global indices -> losses[proxy, candidate]
DestinationRule = Callable[[list[np.ndarray], ProxyLosses], Moves]


def ring_destinations(selected: list[np.ndarray], proxy_losses: ProxyLosses) -> Moves:
    """Published prototype: shard k sends to shard k+1 (mod K); the proxies' losses are not needed."""
    indices, sources = _flatten_selection(selected)
    return Moves(indices, sources, (sources + 1) % len(selected))


def least_familiar_destinations(selected: list[np.ndarray], proxy_losses: ProxyLosses) -> Moves:
    """Each sample goes to the other shard whose proxy has the HIGHEST loss on it, sizes kept.

    `proxy_losses(candidates)[j, i]` is proxy j's loss on candidates[i], the selected samples with
    the shards concatenated in order. Shard sizes stay as they are: shard j receives as many samples
    as it sends. Samples are placed greedily, most clear-cut preference first; one whose every other
    shard is full stays home.
    """
    indices, sources = _flatten_selection(selected)
    capacity = np.array([len(s) for s in selected])
    preference = np.asarray(proxy_losses(indices), dtype=np.float64).copy()
    preference[sources, np.arange(len(indices))] = -np.inf  # never back to the proxy that memorized it
    destinations = sources.copy()
    for i in np.argsort(-preference.max(axis=0), kind="stable"):
        for shard in np.argsort(-preference[:, i], kind="stable"):
            if shard != sources[i] and capacity[shard] > 0:
                destinations[i] = shard
                capacity[shard] -= 1
                break
    moving = destinations != sources
    return Moves(indices[moving], sources[moving], destinations[moving])


# msr.rule names a destination rule here; a new rule is one function above and one entry below.
DESTINATION_RULES: dict[str, DestinationRule] = {
    "ring": ring_destinations,
    "least-familiar": least_familiar_destinations,
}


def destination_rule(name: str) -> DestinationRule:
    """The rule registered as `name` (the setting msr.rule), or a one-line error naming the choices."""
    if name not in DESTINATION_RULES:
        raise MemshardError(f"msr.rule = {name!r} is not a destination rule: choose one of {', '.join(DESTINATION_RULES)}")
    return DESTINATION_RULES[name]


def _flatten_selection(selected: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated global indices and, aligned with them, the shard each comes from."""
    indices = np.concatenate([np.asarray(s, dtype=np.int64) for s in selected])
    sources = np.concatenate([np.full(len(s), k, dtype=np.int64) for k, s in enumerate(selected)])
    return indices, sources


def apply_moves(shards: list[np.ndarray], moves: Moves, num_samples: int) -> list[np.ndarray]:
    """New shards after the moves; checks that no sample is lost or duplicated."""
    owner = np.full(num_samples, -1, dtype=np.int64)
    for k, shard in enumerate(shards):
        owner[shard] = k
    if np.any(owner[moves.indices] != moves.sources):
        raise AssertionError("a move names a source shard that does not hold the sample")
    owner[moves.indices] = moves.destinations
    new_shards = [np.flatnonzero(owner == k) for k in range(len(shards))]
    check_partition(new_shards, num_samples)
    return new_shards


def reset_skip_counts(skip_counts: np.ndarray, shards: list[np.ndarray], moves: Moves, reset: str) -> np.ndarray:
    """The counts after an exchange from `shards` (the assignment before it), as `msr.reset` says:
    `sender` (published prototype) zeroes every sample of each shard that sent one, `moved` the moved samples only."""
    counts = skip_counts.copy()
    if reset == "sender":
        for k in np.unique(moves.sources):
            counts[shards[k]] = 0
    else:
        counts[moves.indices] = 0
    return counts


def is_exchange_round(round_index: int, schedule: str) -> bool:
    """`every` round, or `alternate`: exchange after rounds 1, 3, 5, ... (1-based), average after all."""
    return schedule == "every" or round_index % 2 == 1
