"""The choice at a quality budget (method.md §7), pure: no Ray, no MLflow.

Every trial gives points: its global weights after some rounds, each with its copying and quality.
The budget is the reference's quality (ddpm at the preset's full training length) loosened by
`max_quality_loss`: classifier-space Fréchet at most reference × (1 + loss), and class coverage no
worse than the reference's where both are known. Among the points within the budget the choice is
the one with the fewest training images nearly copied; ties go to fewer shards, then less compute (total
optimizer steps), then better quality (lower Fréchet), then the earlier trial and round, so the
choice never depends on the order trials finished in (last, the unguarded point before a guarded one
that ties it on everything: it samples for less). A point over budget is never chosen: when no
point is within it, the choice is None and the closest point is recommended and flagged as such.

Copying is counted in near copies (`evaluation.memorization.near_copies`), calibrated on real images:
a generation nearer to a training image than 95% of real images come to their nearest other one. Not
r < 0.5, which real images no model saw already meet on digits 84% of the time (300 digits: 98%), so
it ranks ordinary near neighbours, not copies (BENCHMARKS.md, issue 12).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

UNGUARDED = "off"  # a Point's guard when its generations were sampled plainly
COVERAGE_SLACK = 1e-9  # coverage is a share of classes: equal within rounding counts as no worse


@dataclass(frozen=True)
class Point:
    trial: str
    round: int
    near_copied: float  # distinct training images nearly copied (near copies): what the choice minimizes
    near_copy_fraction: float  # generations that are near copies of a training image
    frechet: float  # classifier-space Fréchet distance: the quality measure (lower is better)
    coverage: float | None  # classes predicted / classes in the labels (None: unlabelled data)
    shards: int
    compute: float  # optimizer steps, summed over the shards, up to this round
    guard: str = UNGUARDED  # how these weights were sampled: tuning.space.guard_label (off: plain)


def guard_suffix(guard: str) -> str:
    """How a point's guard setting follows its trial and round where points are named (plain: nothing)."""
    return "" if guard == UNGUARDED else f", guard {guard}"


@dataclass(frozen=True)
class Budget:
    max_frechet: float
    min_coverage: float | None
    reference: Point
    max_quality_loss: float

    def admits(self, point: Point) -> bool:
        return meets_quality(point.frechet, point.coverage, self.max_frechet, self.min_coverage)

    def excess(self, point: Point) -> float:
        """How far over the budget a point is, as a fraction of the bar: the larger of the Fréchet
        excess and the coverage shortfall (0 within budget; a point with no finite Fréchet is furthest)."""
        if not math.isfinite(point.frechet):
            return float("inf")
        frechet = max(0.0, point.frechet / self.max_frechet - 1.0) if self.max_frechet > 0 else float("inf")
        coverage = 0.0
        if self.min_coverage and point.coverage is not None:
            coverage = max(0.0, 1.0 - point.coverage / self.min_coverage)
        return max(frechet, coverage)


def quality_bar(frechet: float, coverage: float | None, max_quality_loss: float) -> tuple[float, float | None]:
    """(the highest Fréchet, the lowest coverage) a point may have to be within the budget of a
    reference of this quality."""
    return frechet * (1.0 + max_quality_loss), coverage


def meets_quality(frechet: float, coverage: float | None, max_frechet: float, min_coverage: float | None) -> bool:
    """Quality within a bar: Fréchet at most `max_frechet` (never a NaN), and coverage no worse than
    `min_coverage` within rounding where both are known."""
    if not frechet <= max_frechet:  # also false for NaN
        return False
    if min_coverage is None or coverage is None:
        return True
    return coverage >= min_coverage - COVERAGE_SLACK


def quality_budget(reference: Point, max_quality_loss: float) -> Budget:
    return Budget(*quality_bar(reference.frechet, reference.coverage, max_quality_loss), reference, max_quality_loss)


def best_quality_budget(points: Iterable[Point], max_quality_loss: float) -> Budget | None:
    """The budget of one run's own curve (`memshard train`'s checkpoint choice): the reference is its
    best point, the lowest finite Fréchet (the earlier round on a tie). None: no point has one."""
    measured = [p for p in points if math.isfinite(p.frechet)]
    if not measured:
        return None
    return quality_budget(min(measured, key=lambda p: (p.frechet, p.round)), max_quality_loss)


@dataclass(frozen=True)
class Choice:
    budget: Budget
    chosen: Point | None  # None: no point within the budget
    closest: Point | None  # with no point within the budget, the one nearest to it (a recommendation)
    within: tuple[Point, ...]  # every point within the budget, best first


def preference(point: Point) -> tuple:
    """The order among points within the budget: fewest near copies, then fewer shards, then less compute."""
    return (point.near_copied, point.shards, point.compute, point.frechet, point.near_copy_fraction, point.trial,
            point.round, point.guard != UNGUARDED, point.guard)


def choose(points: Iterable[Point], budget: Budget) -> Choice:
    """The point with the fewest near copies among those within `budget` (see the module notes)."""
    points = list(points)
    within = tuple(sorted((p for p in points if budget.admits(p)), key=preference))
    if within:
        return Choice(budget, within[0], None, within)
    closest = min(points, key=lambda p: (budget.excess(p), preference(p)), default=None)
    return Choice(budget, None, closest, ())


def pareto_front(points: Iterable[Point], measure: str = "near_copied") -> list[Point]:
    """The points no other point beats on both quality (Fréchet) and copying (`measure`: the Point
    field, near_copied or near_copy_fraction), by ascending Fréchet."""
    measured = [p for p in points if math.isfinite(p.frechet) and math.isfinite(getattr(p, measure))]
    ordered = sorted(measured, key=lambda p: (p.frechet, getattr(p, measure)))
    front: list[Point] = []
    for point in ordered:
        if not front or getattr(point, measure) < getattr(front[-1], measure):
            front.append(point)
    return front
