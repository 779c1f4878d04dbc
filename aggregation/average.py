"""FedAvg as a small pure function over `{name: np.ndarray}` state dicts.

A state dict here is what a shard worker hands back: parameter and buffer names mapped to CPU numpy
arrays. Results keep each array's dtype (float arrays are accumulated in float64 and cast back;
integer buffers such as step counters take the weighted result rounded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

StateDict = Mapping[str, np.ndarray]


class AggregationError(ValueError):
    """The state dicts cannot be combined: different keys, shapes or dtypes, or bad weights."""


def weighted_average(results: Sequence[tuple[StateDict, float]]) -> dict[str, np.ndarray]:
    """θ = Σ_k (n_k / Σ n) θ_k over `(state_dict, n_k)` pairs, n_k the shard's size this round."""
    if not results:
        raise AggregationError("nothing to average: pass at least one (state_dict, weight) pair")
    weights = np.asarray([n for _, n in results], dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise AggregationError(f"weights must be finite, >= 0 and not all zero; got {weights.tolist()}")
    weights /= weights.sum()
    reference = results[0][0]
    for index, (state, _) in enumerate(results[1:], start=1):
        check_compatible(reference, state, f"state dict {index}")
    averaged = {}
    for name, first in reference.items():
        total = np.zeros(first.shape, dtype=np.float64)
        for (state, _), weight in zip(results, weights, strict=True):
            total += weight * state[name]
        averaged[name] = _cast_like(total, first.dtype)
    return averaged


def check_compatible(reference: StateDict, other: StateDict, label: str) -> None:
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    if missing or extra:
        raise AggregationError(f"{label} has different keys: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, array in reference.items():
        if other[name].shape != array.shape:
            raise AggregationError(f"{label}: {name} has shape {other[name].shape}, expected {array.shape}")
        if other[name].dtype != array.dtype:
            raise AggregationError(f"{label}: {name} has dtype {other[name].dtype}, expected {array.dtype}")


def _cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        return np.rint(values).astype(dtype)
    if dtype == np.bool_:
        return values >= 0.5
    return values.astype(dtype)
