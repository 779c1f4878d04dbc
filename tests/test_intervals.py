"""Confidence intervals (`evaluation.intervals`, issue 24): one point's bootstrap over its generations,
and the t-interval over seeds. Pure numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from memshard.errors import MemshardError
from memshard.evaluation.curve_point import copying_figures, interval_keys
from memshard.evaluation.fid import frechet_distance, gaussian_stats
from memshard.evaluation.intervals import fraction_interval, frechet_interval, t_interval, t_quantile
from memshard.evaluation.memorization import memorization_report


def test_the_near_copy_interval_holds_the_fraction_and_narrows_with_more_generations():
    rng = np.random.default_rng(0)
    widths = []
    for generations in (100, 400, 1600):
        indicator = rng.random(generations) < 0.1
        low, high = fraction_interval(indicator, seed=3)
        assert low < indicator.mean() < high
        assert fraction_interval(indicator, seed=3) == (low, high)  # seeded
        widths.append(high - low)
    assert widths[0] > 1.5 * widths[1] > 2.25 * widths[2]  # about 1 / sqrt(M): halves per 4x generations
    # the binomial standard error: 95% of the mass within about 1.96 of them either side
    assert widths[0] == pytest.approx(2 * 1.96 * math.sqrt(0.1 * 0.9 / 100), rel=0.35)
    with pytest.raises(MemshardError, match="at least 2 generations"):
        fraction_interval(np.array([True]))


def test_a_points_copying_figures_carry_the_near_copy_interval():
    rng = np.random.default_rng(1)
    sq = np.sort(rng.uniform(0.5, 2.0, size=(300, 3)), axis=1)
    sq[:30, 0] = 0.01  # 30 generations far nearer their nearest image than real images are
    figures = copying_figures(memorization_report(sq, rng.integers(0, 50, size=(300, 3)), 50), near_copy_threshold=0.1)
    low, high = (figures[key] for key in interval_keys("generations_near_copies"))
    assert figures["generations_near_copies"] == pytest.approx(0.1) and low < 0.1 < high
    uncalibrated = copying_figures(memorization_report(sq, rng.integers(0, 50, size=(300, 3)), 50), None)
    assert all(uncalibrated[key] is None for key in interval_keys("generations_near_copies"))


def test_the_frechet_bootstrap_is_seeded_and_holds_the_estimate():
    rng = np.random.default_rng(2)
    reference = gaussian_stats(rng.normal(size=(2000, 16)))
    generated = rng.normal(loc=0.3, scale=1.2, size=(500, 16))
    estimate = frechet_distance(*gaussian_stats(generated), *reference)
    low, high = frechet_interval(generated, reference, seed=5, resamples=100)
    assert low < estimate < high
    assert frechet_interval(generated, reference, seed=5, resamples=100) == (low, high)
    assert frechet_interval(generated, reference, seed=6, resamples=100) != (low, high)
    # a quarter of the generations: a wider interval
    small_low, small_high = frechet_interval(generated[:125], reference, seed=5, resamples=100)
    assert small_high - small_low > 1.5 * (high - low)


def test_the_t_interval_over_seeds():
    assert [round(t_quantile(df), 3) for df in (1, 2, 4, 30)] == [12.706, 4.303, 2.776, 2.042]  # the t tables
    assert t_quantile(1000) == pytest.approx(1.96, abs=0.005)
    low, high = t_interval([0.1, 0.2, 0.3])
    half = 4.303 * 0.1 / math.sqrt(3)  # t(2) at 97.5% x s / sqrt(n)
    assert low == pytest.approx(0.2 - half, abs=1e-4) and high == pytest.approx(0.2 + half, abs=1e-4)
    assert t_interval([0.4]) is None and t_interval([0.4, None]) is None  # one seed: no interval
    with pytest.raises(MemshardError, match="at least 1 degree of freedom"):
        t_quantile(0)
