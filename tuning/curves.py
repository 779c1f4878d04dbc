"""Copying-against-quality curves (method.md §7, issue 12): what a curve trains (a method or a variant),
the means over seeds, the point where a curve first reaches a quality bar, the reductions in copying
against a reference, and the merge of several runs' points. Pure: no Ray, no MLflow, no training.

The summary is the issue's target check: at the quality of the baseline's (ddpm's) model at a reference
round — the quality budget of `choice` (Fréchet within +10%, coverage no worse) — each method's copying,
interpolated linearly in Fréchet where its mean curve first reaches that bar, and the reduction against
the reference model and against the baseline stopped early at the same bar. Unlike the sweep's choice
(the best point within the budget, over every trial's points), a curve is read where it *first* reaches
the bar: the copying a method has when its training is stopped there.

The statistics (issue 24): each mean curve carries a t-interval over its seeds (`mean_curve`;
`evaluation.intervals`), read at the bar as the copying is, and `compare_curves` calls a method "below"
the baseline in near copies at a Fréchet level only where its interval lies wholly under the
baseline's; the summary holds that comparison at COMPARISON_LEVELS and the AGC kept fraction.

The efficacy bench (bench/efficacy_curves.py) trains the curves, measures their points
(`measure.measure`) and writes what this module computes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from memshard.config import DEFAULT_MAX_QUALITY_LOSS, METHODS, NEAR_COPY_QUANTILE, Config, build_config
from memshard.errors import MemshardError
from memshard.evaluation.curve_point import BOOTSTRAPPED, COPYING, NEAR_COPYING, QUALITY, STRICT_COPYING, interval_keys
from memshard.evaluation.intervals import CONFIDENCE, t_interval
from memshard.orchestrator.settings import check
from memshard.tuning.choice import meets_quality, quality_bar
from memshard.tuning.space import REFERENCE_METHOD

BASELINE = REFERENCE_METHOD  # the curve whose model at the reference round sets the quality bar
TARGET_REDUCTION = 0.80  # the target: >= 80% less copying on both measures, within the quality budget
# Copying measured two more ways where the points have them (older points lack them): the issue's
# target checked in each. name -> (fraction of generations, distinct training images).
MORE_COPYING = {"r < 0.15": STRICT_COPYING, "near copies": NEAR_COPYING}
# The real held-out images' value of a copying fraction, as the points carry it; near copies have
# none: real images score NEAR_COPY_QUANTILE by construction.
# The round's share of drawn samples AGC kept, as points carry it (the RoundReport's; 1.0 without AGC).
AGC_KEPT = "agc_kept_fraction"
# The Fréchet levels, as multiples of the reference model's, at which every method's near copies are
# compared with the baseline's (`compare_curves`); 1.1 is the quality bar.
COMPARISON_LEVELS = (1.0, 1 + DEFAULT_MAX_QUALITY_LOSS, 1.25, 1.5, 2.0, 3.0)
REAL_REFERENCE = {"generations_r_below_0.5": "real_r_below_0.5", "generations_r_below_0.15": "real_r_below_0.15"}


# ---------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    label: str  # how results name it
    sets: tuple[str, ...]  # `section.key=value` settings, iet.method first

    @property
    def base(self) -> str:
        """The memshard method it trains (`iet.method`): ddpm variants train `--baseline-rounds`."""
        return next(item.split("=", 1)[1].strip() for item in self.sets if item.startswith("iet.method="))


def parse_method(text: str) -> Method:
    """`ddpm`, or `LABEL:section.key=value,...` (a value may hold commas: `model.block_out_channels=32,64`)."""
    label, _, rest = text.partition(":")
    label = label.strip()
    sets = tuple(item.strip() for item in re.split(r",(?=\s*[\w-]+\.[\w-]+\s*=)", rest) if item.strip())
    if not label:
        raise MemshardError(f"method {text!r} has no name: write e.g. iet-agc-plus+fedavgm:aggregation.server_optimizer=fedavgm")
    if not any(item.startswith("iet.method=") for item in sets):
        base = label.split("+", 1)[0]
        if base not in METHODS:
            raise MemshardError(f"method {label!r}: start its name with one of {', '.join(METHODS)} "
                                "(e.g. iet-agc-plus+fedavgm), or set iet.method after ':'")
        sets = (f"iet.method={base}", *sets)
    return Method(label, sets)


def method_config(preset: str, method: Method, seed: int, rounds: int, common_sets: list[str]) -> Config:
    """The training config of one curve; checked as `memshard train` checks it, before any work."""
    cfg = build_config(preset, sets=[*common_sets, *method.sets, f"training.seed={seed}", f"iet.rounds={rounds}"])
    check(cfg)
    return cfg


# ---------------------------------------------------------------- the summary (the target check)


def real_reference_of(fraction_key: str, points: list[dict]) -> float | None:
    """The real images' value of a copying fraction: the held-out reference the points carry, or the
    near-copy quantile (real images score it by construction); None for counts and unknown keys."""
    if fraction_key == NEAR_COPYING[0]:
        return NEAR_COPY_QUANTILE
    real_key = REAL_REFERENCE.get(fraction_key)
    values = [p[real_key] for p in points if real_key and p.get(real_key) is not None]
    return float(np.mean(values)) if values else None


def more_copying(points: list[dict]) -> dict[str, tuple]:
    """The MORE_COPYING measures every point has."""
    return {name: keys for name, keys in MORE_COPYING.items() if all(p.get(key) is not None for key in keys for p in points)}


def copying_keys(points: list[dict]) -> tuple[str, ...]:
    """COPYING, and the MORE_COPYING measures every point has."""
    return COPYING + tuple(key for keys in more_copying(points).values() for key in keys)


def seed_interval_keys(key: str) -> tuple[str, str]:
    """Where a mean curve keeps the interval of `key` over seeds (`intervals.t_interval`)."""
    return f"{key}_seed_low", f"{key}_seed_high"


def mean_curve(points: list[dict], method: str, seed: int | None = None) -> list[dict]:
    """A method's points by round, the mean over seeds (or one seed's), with each measure's range and,
    from 2 seeds on, its CONFIDENCE t-interval over seeds (n - 1 degrees of freedom; `seed_interval_keys`).
    A round of one seed keeps that point's bootstrap intervals over its generations (`interval_keys`)."""
    rows = [p for p in points if p["method"] == method and (seed is None or p["seed"] == seed)]
    out = []
    for round_index in sorted({p["round"] for p in rows}):
        at = [p for p in rows if p["round"] == round_index]
        point = {"round": round_index, "seeds": len(at),
                 "optimizer_steps_total": float(np.mean([p["optimizer_steps_total"] for p in at])),
                 "optimizer_steps_sequential": float(np.mean([p["optimizer_steps_sequential"] for p in at]))}
        for key in copying_keys(at) + (*QUALITY, "real_frechet", "real_r_below_0.5", "real_r_below_0.15", AGC_KEPT):
            values = [p[key] for p in at if p.get(key) is not None]
            if not values:
                continue
            point[key], point[f"{key}_min"], point[f"{key}_max"] = float(np.mean(values)), min(values), max(values)
            interval = t_interval(values)
            if interval is not None:
                point.update(zip(seed_interval_keys(key), interval, strict=True))
        if len(at) == 1:
            point.update({k: at[0][k] for key in BOOTSTRAPPED for k in interval_keys(key) if at[0].get(k) is not None})
        out.append(point)
    return out


def _intervals_of(point: dict) -> tuple[str, ...]:
    """The interval and AGC keys a mean-curve point carries (older points lack them)."""
    keys = [AGC_KEPT, *(k for key in BOOTSTRAPPED for k in interval_keys(key)),
            *(k for key in copying_keys([point]) + ("frechet", AGC_KEPT) for k in seed_interval_keys(key))]
    return tuple(key for key in keys if point.get(key) is not None)


def at_quality_bar(curve_points: list[dict], max_frechet: float, min_coverage: float | None) -> dict | None:
    """Copying where the curve (ascending rounds) first reaches Fréchet <= max_frechet with coverage
    >= min_coverage: linear in Fréchet between that point and the one before it when the one before
    lies above the bar; None when no point reaches it. The intervals and the AGC kept fraction the
    points carry are read the same way (an interval's bounds, each linear in Fréchet)."""
    previous = None
    for point in curve_points:
        if meets_quality(point["frechet"], point["coverage"], max_frechet, min_coverage):
            keys = (*copying_keys([point]), "frechet", "round", "optimizer_steps_total", "optimizer_steps_sequential",
                    *_intervals_of(point))
            if previous is None or previous["frechet"] <= max_frechet:
                return {**{key: point[key] for key in keys}, "interpolated": False}
            keys = tuple(key for key in keys if previous.get(key) is not None)
            w = (previous["frechet"] - max_frechet) / (previous["frechet"] - point["frechet"])
            return {**{key: previous[key] + w * (point[key] - previous[key]) for key in keys}, "interpolated": True}
        previous = point
    return None


def compare_curves(points: list[dict], method: str, other: str, levels: list[float], min_coverage: float | None,
                   key: str = NEAR_COPYING[0]) -> list[dict]:
    """`method` against `other` in `key` at each Fréchet level that both mean curves cross (their first
    evaluated round lies at or above it and a later one reaches it, coverage >= min_coverage), read
    where each first reaches it (`at_quality_bar`). `method` is "below" `other` where its interval's
    upper bound over seeds lies under the other's lower bound, "above" the other way round, and "not
    separated" where the intervals overlap; "no interval" where a curve has fewer than 2 seeds there."""
    curves = {name: mean_curve(points, name) for name in (method, other)}
    low, high = seed_interval_keys(key)
    out = []
    for level in levels:
        found = {name: at_quality_bar(curve, level, min_coverage) for name, curve in curves.items()}
        if any(found[name] is None or not curves[name][0]["frechet"] >= level for name in found):
            continue
        mine, theirs = found[method], found[other]
        if any(f.get(low) is None for f in (mine, theirs)):
            verdict = "no interval"
        elif mine[high] < theirs[low]:
            verdict = "below"
        elif mine[low] > theirs[high]:
            verdict = "above"
        else:
            verdict = "not separated"
        out.append({"frechet": level, "verdict": verdict, **{
            f"{side}_{field}": found[name].get(k) for side, name in (("method", method), ("other", other))
            for field, k in (("round", "round"), ("value", key), ("low", low), ("high", high), ("agc_kept", AGC_KEPT))}})
    return out


def _reduction(value: float, reference: float) -> float | None:
    return None if reference <= 0 else 1.0 - value / reference


def summarize(points: list[dict], reference_round: int | None, baseline: str = BASELINE) -> dict:
    """The target check: each method's copying at the quality of `baseline`'s model at `reference_round`
    (None: its last evaluated round), and the reduction against that model and against `baseline`
    stopped early at the same quality bar; per seed too (against the seeds' mean bar)."""
    base = mean_curve(points, baseline)
    measures = copying_keys(points)
    if not base:
        return {"note": f"no {baseline} points: the target check needs the baseline among the methods"}
    rounds = [p["round"] for p in base]
    reference_round = rounds[-1] if reference_round is None else reference_round
    if reference_round not in rounds:
        return {"note": f"{baseline} was not evaluated at round {reference_round} (evaluated: {rounds})"}
    reference = next(p for p in base if p["round"] == reference_round)
    max_frechet, min_coverage = quality_bar(reference["frechet"], reference["coverage"], DEFAULT_MAX_QUALITY_LOSS)
    bar = {"frechet_max": max_frechet, "coverage_min": min_coverage}
    baseline_at_bar = at_quality_bar(base, bar["frechet_max"], bar["coverage_min"])
    compared = all(p.get(NEAR_COPYING[0]) is not None for p in points)  # older points lack near copies
    levels = [ratio * reference["frechet"] for ratio in COMPARISON_LEVELS]
    methods = {}
    for method in dict.fromkeys(p["method"] for p in points):
        found = at_quality_bar(mean_curve(points, method), bar["frechet_max"], bar["coverage_min"])
        per_seed = []
        for seed in sorted({p["seed"] for p in points if p["method"] == method}):
            mine = at_quality_bar(mean_curve(points, method, seed), bar["frechet_max"], bar["coverage_min"])
            per_seed.append({"seed": seed, "at_bar": mine, "reduction_vs_final": None if mine is None else {
                key: _reduction(mine[key], reference[key]) for key in measures}})
        mine = mean_curve(points, method)
        good_enough = [p["coverage"] for p in mine if p["frechet"] <= bar["frechet_max"]]
        entry = {"reached": found is not None, "at_bar": found, "per_seed": per_seed,
                 "best_frechet_ratio": min(p["frechet"] for p in mine) / reference["frechet"],
                 "best_coverage_within_frechet_bar": max(good_enough) if good_enough else None,
                 "versus_baseline": compare_curves(points, method, baseline, levels, min_coverage)
                 if compared and method != baseline else []}
        if found is not None:
            entry["reduction_vs_final"] = {key: _reduction(found[key], reference[key]) for key in measures}
            entry["reduction_vs_early_stopped"] = None if baseline_at_bar is None else {
                key: _reduction(found[key], baseline_at_bar[key]) for key in measures}
            entry["target_met"] = all(entry["reduction_vs_final"][key] is not None
                                      and entry["reduction_vs_final"][key] >= TARGET_REDUCTION for key in COPYING)
            entry["target_met_by"] = {name: all(entry["reduction_vs_final"][key] is not None
                                                and entry["reduction_vs_final"][key] >= TARGET_REDUCTION for key in keys)
                                      for name, keys in more_copying(points).items()}
            seeds_reduction = [s["reduction_vs_final"] for s in per_seed if s["reduction_vs_final"]]
            entry["reduction_vs_final_range"] = {key: [min(r[key] for r in seeds_reduction), max(r[key] for r in seeds_reduction)]
                                                 for key in measures if all(r[key] is not None for r in seeds_reduction)} \
                if seeds_reduction else {}
        methods[method] = entry
    return {"baseline": baseline, "reference": reference, "quality_bar": bar, "baseline_at_bar": baseline_at_bar,
            "target": (f"at Fréchet <= {1 + DEFAULT_MAX_QUALITY_LOSS:.2f} x and coverage >= {baseline}'s model at round "
                       f"{reference_round}: >= {TARGET_REDUCTION:.0%} fewer copied training images and "
                       f">= {TARGET_REDUCTION:.0%} fewer generations below r = 0.5"),
            "comparison": {"measure": NEAR_COPYING[0], "levels": levels, "confidence": CONFIDENCE,
                           "interval": "t-interval over seeds (n - 1 degrees of freedom), read where each mean "
                                       "curve first reaches the Fréchet level, as the copying at the quality bar"}
            if compared else None,
            "methods": methods}


def summary_markdown(summary: dict) -> str:
    if "methods" not in summary:
        return summary.get("note", "no summary") + "\n"
    ref, bar = summary["reference"], summary["quality_bar"]
    lines = [f"Reference: {summary['baseline']} at round {ref['round']} (mean of {ref['seeds']} seeds): Fréchet "
             f"{ref['frechet']:.3f} (real images {ref['real_frechet']:.3f}), coverage {ref['coverage']:.2f}, "
             f"{100 * ref['generations_r_below_0.5']:.1f}% of generations below r = 0.5, "
             f"{ref['copied_training_images']:.1f} training images copied."
             + ("" if ref.get("real_r_below_0.5") is None else
                f" Real held-out training images (never generated): {100 * ref['real_r_below_0.5']:.1f}% below r = 0.5, "
                f"{100 * ref.get('real_r_below_0.15', float('nan')):.1f}% below r = 0.15."),
             f"Quality bar: Fréchet <= {bar['frechet_max']:.3f}, coverage >= {bar['coverage_min']:.2f}; the reference's "
             f"Fréchet over seeds: {_interval_text(ref, 'frechet', 1.0, '', 3)}. Target: {summary['target']}.", "",
             "| method | reaches the bar at round (steps) | r < 0.5 | copied images | fewer r < 0.5 vs final ddpm "
             "| fewer copied vs final ddpm | same vs ddpm stopped at the bar | target | AGC kept |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.0f}%"

    for method, entry in summary["methods"].items():
        found = entry["at_bar"]
        if found is None:
            coverage = entry["best_coverage_within_frechet_bar"]
            why = (f"best Fréchet {entry['best_frechet_ratio']:.2f} x the reference" if coverage is None
                   else f"Fréchet within the bar, but coverage at most {coverage:.2f} there")
            lines.append(f"| {method} | not reached ({why}) | | | | | | no | |")
            continue
        final, early = entry["reduction_vs_final"], entry.get("reduction_vs_early_stopped") or {}
        spread = entry.get("reduction_vs_final_range", {})
        span = {key: f" ({pct(spread[key][0])} to {pct(spread[key][1])})" if key in spread else "" for key in COPYING}
        lines.append(
            f"| {method} | {found['round']:.1f} ({found['optimizer_steps_total']:,.0f}; sequential "
            f"{found['optimizer_steps_sequential']:,.0f}) | {100 * found['generations_r_below_0.5']:.1f}% | "
            f"{found['copied_training_images']:.1f} | {pct(final['generations_r_below_0.5'])}{span['generations_r_below_0.5']} | "
            f"{pct(final['copied_training_images'])}{span['copied_training_images']} | "
            f"{pct(early.get('generations_r_below_0.5'))} / {pct(early.get('copied_training_images'))} | "
            f"{'yes' if entry['target_met'] else 'no'} | {_kept_text(found)} |")
    for name, (fraction, images) in MORE_COPYING.items():
        rows = [(method, entry) for method, entry in summary["methods"].items()
                if entry["at_bar"] is not None and name in entry.get("target_met_by", {})]
        if not rows:
            continue
        real = REAL_REFERENCE.get(fraction)
        reference_real = f"{NEAR_COPY_QUANTILE:.0%} by construction" if real is None else f"{100 * ref[real]:.1f}%"
        lines += ["", f"The same in {name} (the reference model: {100 * ref[fraction]:.1f}% of generations, "
                      f"{ref[images]:.1f} images; real images: {reference_real}):", "",
                  f"| method | {name} | {CONFIDENCE:.0%} over seeds | images | fewer vs final ddpm | fewer images vs final "
                  f"ddpm | same vs ddpm stopped at the bar | target in {name} | AGC kept |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for method, entry in rows:
            found, final = entry["at_bar"], entry["reduction_vs_final"]
            early, spread = entry.get("reduction_vs_early_stopped") or {}, entry.get("reduction_vs_final_range", {})
            span = {key: f" ({pct(spread[key][0])} to {pct(spread[key][1])})" if key in spread else "" for key in (fraction, images)}
            lines.append(
                f"| {method} | {100 * found[fraction]:.1f}% | {_interval_text(found, fraction)} | {found[images]:.1f} | "
                f"{pct(final[fraction])}{span[fraction]} | {pct(final[images])}{span[images]} | "
                f"{pct(early.get(fraction))} / {pct(early.get(images))} | "
                f"{'yes' if entry['target_met_by'][name] else 'no'} | {_kept_text(found)} |")
    return "\n".join(lines + _comparison_lines(summary)) + "\n"


def _interval_text(point: dict, key: str, scale: float = 100.0, unit: str = "%", digits: int = 1) -> str:
    """`key`'s interval over seeds, or "-" where the point has none (one seed, or an older result)."""
    low, high = (point.get(k) for k in seed_interval_keys(key))
    return "-" if low is None else f"{scale * low:.{digits}f}{unit} to {scale * high:.{digits}f}{unit}"


def _kept_text(point: dict) -> str:
    return "-" if point.get(AGC_KEPT) is None else f"{point[AGC_KEPT]:.3f}"


def _comparison_lines(summary: dict) -> list[str]:
    """The table of `compare_curves` against the baseline, per method and Fréchet level."""
    comparison, baseline = summary.get("comparison"), summary["baseline"]
    rows = [(method, row) for method, entry in summary["methods"].items() for row in entry.get("versus_baseline", [])]
    if comparison is None or not rows:
        return []

    def value(row, side):
        interval = "-" if row[f"{side}_low"] is None else \
            f"{100 * row[f'{side}_low']:.1f} to {100 * row[f'{side}_high']:.1f}%"
        return f"{100 * row[f'{side}_value']:.1f}% ({interval}) at round {row[f'{side}_round']:.1f}"

    lines = ["", f"Near copies against {baseline} at the same quality: each curve read where it first reaches the Fréchet "
                 f"level, with its {comparison['confidence']:.0%} {comparison['interval'].split(',')[0]}; a method is "
                 f"below {baseline} only where its interval lies wholly under {baseline}'s:", "",
             f"| method | Fréchet level (x reference) | method's near copies | {baseline}'s near copies | verdict "
             "| AGC kept (method) |", "| --- | --- | --- | --- | --- | --- |"]
    reference = summary["reference"]["frechet"]
    for method, row in rows:
        kept = "-" if row["method_agc_kept"] is None else f"{row['method_agc_kept']:.3f}"
        lines.append(f"| {method} | {row['frechet']:.3f} ({row['frechet'] / reference:.2f}) | {value(row, 'method')} | "
                     f"{value(row, 'other')} | {row['verdict']} | {kept} |")
    return lines



def merge_results(runs: list[dict], only: list[str] | None = None) -> dict:
    """The first run's settings with every run's points (with `only`, those methods' points); runs of
    another regime or preset are refused (their copying is counted against other training images), and
    so is a point two runs both hold (the mean over seeds would count it twice)."""
    first = runs[0]
    for other in runs[1:]:
        for key in ("preset", "regime", "num_images", "sampler", "sampling_steps", "eval_seed"):
            if other["settings"][key] != first["settings"][key]:
                raise MemshardError(f"--from-results: the runs differ in {key} ({first['settings'][key]} and "
                                    f"{other['settings'][key]}): merge only runs of one regime and evaluation")
    merged = {**first, "points": [p for run in runs for p in run["points"] if only is None or p["method"] in only]}
    seen: set[tuple] = set()
    for p in merged["points"]:
        key = (p["method"], p["seed"], p["round"])
        if key in seen:
            raise MemshardError(f"--from-results: {key[0]} seed {key[1]} round {key[2]} is in two of the runs: "
                                "merge each curve once (--only LABEL ... keeps some methods)")
        seen.add(key)
    if only is not None:
        missing = sorted(set(only) - {p["method"] for p in merged["points"]})
        if missing:
            raise MemshardError(f"--only {' '.join(missing)}: no such method in the runs")
    if len(runs) > 1:
        merged["merged_from"] = [run["environment"] for run in runs]
        merged["settings"] = {**first["settings"], "seeds": sorted({p["seed"] for p in merged["points"]}),
                              "methods": {k: v for run in runs for k, v in run["settings"]["methods"].items()
                                          if only is None or k in only}}
    return merged

