"""Confidence intervals of measured figures (issue 24): how far a figure could move by chance alone.

- One point, no retraining: a percentile bootstrap over its generations. The near-copy fraction
  (`fraction_interval`: resample the per-generation indicator) and the Fréchet distance
  (`frechet_interval`: resample the generated features, against the fixed real statistics).
- Several independent runs (seeds) of one curve: a t-interval of their mean with n - 1 degrees of
  freedom (`t_interval`). With 3 seeds a bootstrap over seeds is degenerate (27 resamples, the interval
  at most the range); the t-interval is wide there, as it should be.

Every interval here is at CONFIDENCE, and every bootstrap is seeded: the same inputs give the same interval.
"""

from __future__ import annotations

import math

import numpy as np

from memshard.errors import MemshardError
from memshard.evaluation.fid import frechet_distance, gaussian_stats

CONFIDENCE = 0.95
FRACTION_RESAMPLES = 1000  # a mean of M bits per resample: cheap
FRECHET_RESAMPLES = 200  # two eigendecompositions of 128 x 128 per resample: about 10 ms each


def _percentiles(estimates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(estimates, [tail, 1.0 - tail])
    return float(low), float(high)


def _resampled_rows(count: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, count) row indices drawn with replacement."""
    if count < 2:
        raise MemshardError(f"a bootstrap needs at least 2 generations, got {count}: generate more images")
    return np.random.Generator(np.random.PCG64(seed)).integers(0, count, size=(resamples, count))


def fraction_interval(indicator: np.ndarray, seed: int = 0, resamples: int = FRACTION_RESAMPLES,
                      confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile-bootstrap interval of the fraction of true entries of a per-generation indicator."""
    indicator = np.asarray(indicator, dtype=bool).ravel()
    return _percentiles(indicator[_resampled_rows(len(indicator), resamples, seed)].mean(axis=1), confidence)


def frechet_interval(features: np.ndarray, reference_stats: tuple[np.ndarray, np.ndarray], seed: int = 0,
                     resamples: int = FRECHET_RESAMPLES, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Bootstrap interval of the Fréchet distance of (M, d) generated `features` to fixed reference
    statistics (mean, covariance): the spread of the resampled distances around their mean, placed at
    the estimate. Resampling with replacement repeats generations, and that alone raises the distance
    (fewer distinct rows, a noisier covariance: at M = 500, d = 128 by more than the spread), so the raw
    percentiles would sit above the estimate; the shift removes that resampling bias. The estimate's own
    finite-sample bias stays: every point measured on as many generations shares it."""
    features = np.asarray(features, dtype=np.float64)
    estimate = frechet_distance(*gaussian_stats(features), *reference_stats)
    distances = np.array([frechet_distance(*gaussian_stats(features[rows]), *reference_stats)
                          for rows in _resampled_rows(len(features), resamples, seed)])
    low, high = _percentiles(distances - distances.mean(), confidence)
    return max(0.0, estimate + low), estimate + high


# ---------------------------------------------------------------- across seeds


def _t_two_sided_probability(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df (Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):  # cos θ (1 + 2/3 cos² θ + 2·4/(3·5) cos⁴ θ + ...), ν - 2 powers in all
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return (2.0 / math.pi) * (theta + s * total)
    term, total = 1.0, 0.0
    for k in range(1, df // 2 + 1):  # 1 + 1/2 cos² θ + 1·3/(2·4) cos⁴ θ + ..., up to cos^(ν-2) θ
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The t with P(|T| < t) = confidence for Student's t with `df` degrees of freedom (bisection)."""
    if df < 1:
        raise MemshardError(f"a t-interval needs at least 1 degree of freedom (2 values), got {df}")
    low, high = 0.0, 1.0
    while _t_two_sided_probability(high, df) < confidence:
        high *= 2.0
    for _ in range(100):
        middle = (low + high) / 2.0
        low, high = (middle, high) if _t_two_sided_probability(middle, df) < confidence else (low, middle)
    return (low + high) / 2.0


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """mean ± t(n - 1) · s / √n of independent values (one per seed); None for fewer than 2."""
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(values) < 2:
        return None
    half = t_quantile(len(values) - 1, confidence) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)
