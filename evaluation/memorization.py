"""Memorization metrics from each generation's nearest training images (method.md §5).

Input: for M generations, the squared L2 distances (pixels in [0, 1]) to their k nearest training
images, ascending, and those images' rows (`evaluation.nearest_neighbors`).

- relative distance (IET protocol): r = d²₁ / mean(d²₁ … d²ₖ), k = 50. r ≤ 1 always; an exact copy
  of one training image has r = 0. MQ@t counts generations with r < t, for t in THRESHOLDS.
- nearest-neighbour ratio (Gu et al., "On memorization in diffusion models", 2023): d₁ / d₂ with
  d = √d²; a generation with d₁ / d₂ < 1/3 counts as an NN-ratio copy (`nn_ratio_copy_*`).
- r-copies per training sample: a generation is an R-COPY of its nearest training image when r < the
  r-copy threshold (default 0.5, the loosest MQ threshold); per training row, how many generations
  are r-copies of it and the smallest r among the generations whose nearest image it is.
- near copies, calibrated on real images (`near_copies`, `near_copies_per_sample`): a generation
  nearer to its nearest training image than all but NEAR_COPY_QUANTILE of real images are to their
  nearest other training image (leave-one-out, `evaluate.near_copy_threshold`). What `memshard tune`
  minimizes and `unlearn --forget evaluation:RUN` forgets by default. A model that draws fresh images from the data's
  distribution scores about NEAR_COPY_QUANTILE; r and d1/d2 need no reference but, on a small set of
  similar images (8x8 digits), count ordinary neighbours: there most real unseen digits have r < 0.5.

Where the denominators vanish (the generation equals all k neighbours, or its two nearest), the
generation is counted as an r-copy and an NN-ratio copy: r = 0 and the ratio = 0.

(The unlearning checks and audit count a third measure, pixel matches: `unlearning.forget_check`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memshard.errors import MemshardError

THRESHOLDS = (0.15, 0.2, 0.3, 0.4, 0.5)
NN_RATIO_THRESHOLD = 1.0 / 3.0
DEFAULT_R_COPY_THRESHOLD = 0.5
R_NEIGHBORS = 50  # published IET protocol
HISTOGRAM_BINS = 50


def _check(sq_distances: np.ndarray, columns: int) -> np.ndarray:
    sq = np.asarray(sq_distances, dtype=np.float64)
    if sq.ndim != 2 or sq.shape[0] == 0 or sq.shape[1] < columns:
        raise MemshardError(
            f"nearest-neighbour distances must be (generations, k >= {columns}), got shape {sq.shape}: "
            "scan with more neighbours"
        )
    return sq


def relative_distance(sq_distances: np.ndarray) -> np.ndarray:
    """r = d²₁ / mean(d²₁ … d²ₖ) per row of ascending squared distances; 0 where all k are 0."""
    sq = _check(sq_distances, 1)
    mean = sq.mean(axis=1)
    return np.divide(sq[:, 0], mean, out=np.zeros(len(sq)), where=mean > 0)


def nn_ratio(sq_distances: np.ndarray) -> np.ndarray:
    """d₁ / d₂ (distances, not squared) per row; 0 where both are 0."""
    sq = _check(sq_distances, 2)
    d1, d2 = np.sqrt(sq[:, 0]), np.sqrt(sq[:, 1])
    return np.divide(d1, d2, out=np.zeros(len(sq)), where=d2 > 0)


def r_copies_per_sample(nearest: np.ndarray, r: np.ndarray, num_samples: int,
                        r_copy_threshold: float = DEFAULT_R_COPY_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """(r_copies, min_r) per training row: generations with r < threshold whose nearest it is; the
    smallest r among all generations whose nearest it is (inf where it is nobody's nearest)."""
    nearest, r = np.asarray(nearest, dtype=np.int64), np.asarray(r, dtype=np.float64)
    if nearest.shape != r.shape or nearest.ndim != 1:
        raise MemshardError(f"nearest rows {nearest.shape} and r {r.shape} must be two vectors of one length")
    if len(nearest) and (nearest.min() < 0 or nearest.max() >= num_samples):
        raise MemshardError(f"nearest rows must lie in [0, {num_samples}): scan against the same training set")
    r_copies = np.bincount(nearest[r < r_copy_threshold], minlength=num_samples)
    min_r = np.full(num_samples, np.inf)
    np.minimum.at(min_r, nearest, r)
    return r_copies, min_r


@dataclass(frozen=True)
class MemorizationReport:
    r: np.ndarray  # (M,) relative distance per generation
    ratio: np.ndarray  # (M,) d1 / d2 per generation
    nearest: np.ndarray  # (M,) training row nearest to each generation
    k: int  # neighbours in the mean of r
    r_copy_threshold: float
    r_copies: np.ndarray  # (N,) generations that are r-copies of each training row
    min_r: np.ndarray  # (N,) smallest r of a generation whose nearest is that row (inf: none)
    nearest_sq_distance: np.ndarray  # (M,) d1²: squared L2 to the nearest training image, pixels in [0, 1]

    @property
    def num_generations(self) -> int:
        return len(self.r)

    def mq_counts(self) -> dict[float, int]:
        return {t: int((self.r < t).sum()) for t in THRESHOLDS}

    def nn_ratio_copies(self) -> int:
        return int((self.ratio < NN_RATIO_THRESHOLD).sum())

    def histogram(self, bins: int = HISTOGRAM_BINS) -> tuple[np.ndarray, np.ndarray]:
        """Counts of r over `bins` equal bins of [0, 1] (r never exceeds 1)."""
        return np.histogram(np.clip(self.r, 0.0, 1.0), bins=bins, range=(0.0, 1.0))

    def metrics(self) -> dict[str, float]:
        """Flat numbers: mq_T_count / mq_T_fraction, nn_ratio_copy_count / _fraction, r-copied samples."""
        m = self.num_generations
        out: dict[str, float] = {}
        for t, count in self.mq_counts().items():
            out[f"mq_{t}_count"] = count
            out[f"mq_{t}_fraction"] = count / m
        out["nn_ratio_copy_count"] = self.nn_ratio_copies()
        out["nn_ratio_copy_fraction"] = self.nn_ratio_copies() / m
        out["r_copied_training_samples"] = int((self.r_copies > 0).sum())
        out["r_median"] = float(np.median(self.r))
        return out

    def most_r_copied(self, top: int) -> list[int]:
        """Training rows, most r-copies first (ties: smaller min_r); rows with none come last,
        ordered by min_r, so the list always shows the closest pairs even without r-copies."""
        order = np.lexsort((self.min_r, -self.r_copies))
        return [int(i) for i in order[:top] if np.isfinite(self.min_r[i])]

    def closest_generations(self, row: int, count: int) -> list[int]:
        """The generations whose nearest training image is `row`, smallest r first."""
        mine = np.flatnonzero(self.nearest == row)
        return [int(i) for i in mine[np.argsort(self.r[mine], kind="stable")][:count]]


def memorization_report(sq_distances: np.ndarray, indices: np.ndarray, num_samples: int,
                        r_copy_threshold: float = DEFAULT_R_COPY_THRESHOLD) -> MemorizationReport:
    """All memorization metrics from a nearest-neighbour scan (ascending distances, their rows)."""
    if not 0.0 < r_copy_threshold <= 1.0:
        raise MemshardError(f"r-copy threshold {r_copy_threshold} must be in (0, 1]: r lies in [0, 1] (default 0.5)")
    sq = _check(sq_distances, 2)
    indices = np.asarray(indices)
    if indices.shape != sq.shape:
        raise MemshardError(f"neighbour rows {indices.shape} and distances {sq.shape} must have one shape")
    r = relative_distance(sq)
    nearest = indices[:, 0].astype(np.int64)
    r_copies, min_r = r_copies_per_sample(nearest, r, num_samples, r_copy_threshold)
    return MemorizationReport(r=r, ratio=nn_ratio(sq), nearest=nearest, k=sq.shape[1], r_copy_threshold=r_copy_threshold,
                              r_copies=r_copies, min_r=min_r, nearest_sq_distance=sq[:, 0])


def near_copies_per_sample(report: MemorizationReport, threshold: float) -> np.ndarray:
    """(N,) per training row: the generations with d1² below `threshold` (the real images'
    NEAR_COPY_QUANTILE quantile) whose nearest it is -- its near copies."""
    near = report.nearest_sq_distance < threshold
    return np.bincount(report.nearest[near], minlength=len(report.r_copies))


def near_copies(report: MemorizationReport, threshold: float) -> dict[str, float]:
    """Near copies (`near_copies_per_sample`): count, fraction of the generations, and the distinct
    training images they are nearest to."""
    per_sample = near_copies_per_sample(report, threshold)
    count = int(per_sample.sum())
    return {"near_copy_count": count, "near_copy_fraction": count / report.num_generations,
            "near_copied_training_samples": int((per_sample > 0).sum()), "near_copy_sq_distance": float(threshold)}
