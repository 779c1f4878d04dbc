"""The efficacy bench's target check (issue 12; `memshard.tuning.curves`) on constructed curves: the
curves themselves are a benchmark (bench/efficacy_curves.py), not a test, but the arithmetic that reads
them must be right."""

from __future__ import annotations

import pytest

from memshard.errors import MemshardError
from memshard.tuning import curves


def point(method, seed, round_index, frechet, copied_fraction, copied_images, coverage=1.0):
    return {"method": method, "seed": seed, "round": round_index, "optimizer_steps_total": 400 * round_index,
            "optimizer_steps_sequential": (400 if method == "ddpm" else 100) * round_index,
            "generations_r_below_0.5": copied_fraction, "copied_training_images": copied_images,
            "frechet": frechet, "mean_confidence": 0.9, "coverage": coverage, "tv_distance": 0.05, "real_frechet": 0.5}


def test_method_names_and_variants():
    assert curves.parse_method("iet-agc") == curves.Method("iet-agc", ("iet.method=iet-agc",))
    variant = curves.parse_method("iet-agc-plus+wide:aggregation.server_optimizer=fedavgm,model.block_out_channels=32,64")
    assert variant == curves.Method("iet-agc-plus+wide", ("iet.method=iet-agc-plus", "aggregation.server_optimizer=fedavgm",
                                                            "model.block_out_channels=32,64"))
    assert curves.parse_method("mine:iet.method=iet").sets == ("iet.method=iet",)
    assert [curves.parse_method(text).base for text in ("ddpm+ema:training.ema=true", "mine:iet.method=ddpm", "iet")] \
        == ["ddpm", "ddpm", "iet"]  # ddpm variants train --baseline-rounds
    with pytest.raises(MemshardError, match="start its name with one of ddpm"):
        curves.parse_method("magic:aggregation.eta=0.1")


def test_copying_is_interpolated_in_frechet_where_the_curve_first_reaches_the_bar():
    curve = [{"round": 2, "frechet": 12.0, "coverage": 1.0, "generations_r_below_0.5": 0.01, "copied_training_images": 2,
              "optimizer_steps_total": 800, "optimizer_steps_sequential": 200},
             {"round": 4, "frechet": 4.0, "coverage": 1.0, "generations_r_below_0.5": 0.05, "copied_training_images": 10,
              "optimizer_steps_total": 1600, "optimizer_steps_sequential": 400}]
    found = curves.at_quality_bar(curve, max_frechet=10.0, min_coverage=0.9)
    assert found["interpolated"] and found["round"] == pytest.approx(2.5)  # a quarter of the way from 12 to 4
    assert found["generations_r_below_0.5"] == pytest.approx(0.02) and found["copied_training_images"] == pytest.approx(4)
    assert curves.at_quality_bar(curve, 3.0, 0.9) is None
    assert curves.at_quality_bar(curve, 20.0, 0.9)["interpolated"] is False  # good enough from the first point
    assert curves.at_quality_bar(curve, 10.0, 1.1) is None  # coverage worse than the reference's


def test_summary_reads_reductions_against_ddpms_final_and_early_stopped_models():
    points = []
    for seed, shift in ((0, 0.0), (1, 0.2)):
        points += [point("ddpm", seed, 2, 3.0 + shift, 0.10, 40), point("ddpm", seed, 4, 2.0 + shift, 0.40, 180)]
        points += [point("iet", seed, 2, 8.0 + shift, 0.00, 0), point("iet", seed, 4, 2.0 + shift, 0.04, 10)]
        points += [point("slow", seed, 2, 9.0, 0.0, 0), point("slow", seed, 4, 5.0, 0.01, 1)]
    summary = curves.summarize(points, reference_round=4)
    reference = summary["reference"]
    assert reference["frechet"] == pytest.approx(2.1) and reference["copied_training_images"] == 180
    assert summary["quality_bar"]["frechet_max"] == pytest.approx(2.31)
    iet = summary["methods"]["iet"]
    # iet's mean curve goes from 8.1 to 2.1: the bar 2.31 is reached 5.79/6 of the way to round 4.
    w = (8.1 - 2.31) / 6.0
    assert iet["at_bar"]["copied_training_images"] == pytest.approx(10 * w)
    assert iet["reduction_vs_final"]["copied_training_images"] == pytest.approx(1 - 10 * w / 180)
    assert iet["reduction_vs_final"]["generations_r_below_0.5"] == pytest.approx(1 - 0.04 * w / 0.40)
    assert iet["target_met"]
    # ddpm stopped early at the bar: between 3.1 and 2.1, (3.1 - 2.31) / 1.0 of the way.
    ddpm_at_bar = 40 + (3.1 - 2.31) * (180 - 40)
    assert summary["baseline_at_bar"]["copied_training_images"] == pytest.approx(ddpm_at_bar)
    assert iet["reduction_vs_early_stopped"]["copied_training_images"] == pytest.approx(1 - 10 * w / ddpm_at_bar)
    assert len(iet["per_seed"]) == 2 and all(s["at_bar"] for s in iet["per_seed"])
    assert not summary["methods"]["slow"]["reached"]
    assert "| slow | not reached (best Fréchet 2.38 x the reference)" in curves.summary_markdown(summary)
    assert curves.summarize(points, reference_round=None)["reference"]["round"] == 4  # the last one evaluated
    assert "was not evaluated at round 3" in curves.summarize(points, reference_round=3)["note"]


def test_the_strict_threshold_is_summarized_beside_the_loose_one_when_every_point_has_it():
    def strict(p, fraction, images, real_fraction=0.04):
        return {**p, "generations_r_below_0.15": fraction, "copied_r_below_0.15": images,
                "real_r_below_0.5": 0.8, "real_r_below_0.15": real_fraction}

    points = [strict(point("ddpm", 0, 2, 3.0, 0.10, 40), 0.02, 8), strict(point("ddpm", 0, 4, 2.0, 0.40, 180), 0.20, 60),
              strict(point("iet", 0, 2, 2.1, 0.30, 120), 0.01, 5), strict(point("iet", 0, 4, 1.5, 0.35, 150), 0.02, 6)]
    summary = curves.summarize(points, reference_round=4)
    renamed = [{**p, "method": "ddpm+ema" if p["method"] == "ddpm" else p["method"]} for p in points]
    assert curves.summarize(renamed, 4, baseline="ddpm+ema")["methods"]["iet"] == summary["methods"]["iet"]
    iet = summary["methods"]["iet"]
    assert iet["reduction_vs_final"]["generations_r_below_0.15"] == pytest.approx(1 - 0.01 / 0.20)
    assert iet["reduction_vs_final"]["copied_r_below_0.15"] == pytest.approx(1 - 5 / 60)
    assert iet["target_met_by"] == {"r < 0.15": True} and not iet["target_met"]  # 25% / 33% fewer at r < 0.5
    text = curves.summary_markdown(summary)
    assert "80.0% below r = 0.5, 4.0% below r = 0.15" in text  # the real reference beside the reference model
    # one seed and points without intervals or AGC figures (older results): "-" in their places
    assert "| iet | 1.0% | - | 5.0 | 95% (95% to 95%) | 92% (92% to 92%) | 94% / 90% | yes | - |" in text
    assert "The same in r < 0.15 (the reference model: 20.0% of generations, 60.0 images; real images: 4.0%)" in text
    # points measured before the strict figures existed: the summary keeps to r < 0.5
    old = curves.summarize([point("ddpm", 0, 4, 2.0, 0.4, 180), point("iet", 0, 4, 2.0, 0.1, 20)], reference_round=4)
    assert old["methods"]["iet"]["target_met_by"] == {} and "r < 0.15" not in curves.summary_markdown(old)


def test_results_of_one_regime_merge_and_of_another_are_refused():
    def run(regime, points, methods):
        return {"environment": {"command": regime}, "points": points,
                "settings": {"preset": "digits", "regime": regime, "num_images": 500, "sampler": "ddim",
                             "sampling_steps": 50, "eval_seed": 0, "seeds": [0, 1], "methods": methods,
                             "reference_round": 4}}

    baseline = run("first-300", [point("ddpm", 0, 4, 2.0, 0.4, 180), point("ddpm", 1, 4, 2.2, 0.4, 170)], {"ddpm": []})
    variant = run("first-300", [point("iet+fast", 0, 4, 2.1, 0.1, 20)], {"iet+fast": ["iet.method=iet"]})
    merged = curves.merge_results([baseline, variant])
    assert len(merged["points"]) == 3 and set(merged["settings"]["methods"]) == {"ddpm", "iet+fast"}
    assert curves.summarize(merged["points"], 4)["methods"]["iet+fast"]["reached"]
    with pytest.raises(MemshardError, match="differ in regime"):
        curves.merge_results([baseline, run("full", [], {})])
    with pytest.raises(MemshardError, match="ddpm seed 1 round 4 is in two of the runs"):
        curves.merge_results([baseline, run("first-300", [point("ddpm", 1, 4, 2.2, 0.4, 170)], {"ddpm": []})])
    kept = curves.merge_results([baseline, variant], only=["iet+fast"])
    assert [p["method"] for p in kept["points"]] == ["iet+fast"] and set(kept["settings"]["methods"]) == {"iet+fast"}
    with pytest.raises(MemshardError, match="--only iet: no such method"):
        curves.merge_results([baseline, variant], only=["iet"])


def near(p, fraction, kept=1.0):
    """A point with near copies and the round's AGC kept fraction, as the bench records them now."""
    return {**p, "generations_near_copies": fraction, "copied_near": 100 * fraction, "agc_kept_fraction": kept}


def three_seeds(method, near_by_round, spread, kept=1.0):
    """Three seeds of a curve whose Fréchet goes 6, 3, 2 over rounds 2, 4, 6; near copies at each round
    its value -spread, +0, +spread over the seeds."""
    return [near(point(method, seed, round_index, frechet + 0.1 * (seed - 1), 0.1, 10), value + spread * (seed - 1), kept)
            for seed in range(3) for round_index, frechet, value in zip((2, 4, 6), (6.0, 3.0, 2.0), near_by_round, strict=True)]


def test_the_mean_curve_carries_a_t_interval_over_seeds():
    mean = curves.mean_curve(three_seeds("iet", (0.1, 0.2, 0.3), 0.05, kept=0.9), "iet")
    half = 4.303 * 0.05 / 3 ** 0.5  # t(2) x s / sqrt(3), s = 0.05
    low, high = (mean[1][key] for key in curves.seed_interval_keys("generations_near_copies"))
    assert mean[1]["seeds"] == 3 and mean[1]["generations_near_copies"] == pytest.approx(0.2)
    assert low == pytest.approx(0.2 - half, abs=1e-4) and high == pytest.approx(0.2 + half, abs=1e-4)
    assert mean[1]["agc_kept_fraction"] == pytest.approx(0.9)
    one = curves.mean_curve([{**p, "generations_near_copies_ci_low": 0.15, "generations_near_copies_ci_high": 0.25}
                             for p in three_seeds("iet", (0.1, 0.2, 0.3), 0.05)], "iet", seed=0)
    assert "generations_near_copies_seed_low" not in one[1]  # one seed: no interval over seeds,
    assert one[1]["generations_near_copies_ci_low"] == 0.15  # but its generations' bootstrap interval


def test_a_curve_is_below_another_only_where_the_intervals_separate():
    ddpm = three_seeds("ddpm", (0.10, 0.30, 0.40), 0.01)
    apart = three_seeds("iet-agc", (0.02, 0.05, 0.08), 0.01, kept=0.85)  # far under ddpm, little spread
    close = three_seeds("iet", (0.08, 0.26, 0.36), 0.05)  # lower means, but the intervals overlap
    worse = three_seeds("slow", (0.30, 0.50, 0.60), 0.01)
    points = ddpm + apart + close + worse
    levels = [6.0, 4.0, 2.5, 2.0, 1.0]  # 6.0: every curve's first point; 1.0: reached by none
    rows = curves.compare_curves(points, "iet-agc", "ddpm", levels, min_coverage=None)
    assert [row["frechet"] for row in rows] == [6.0, 4.0, 2.5, 2.0] and {row["verdict"] for row in rows} == {"below"}
    at_4 = rows[1]  # two thirds of the way from round 2 (Fréchet 6.0) to round 4 (3.0)
    assert at_4["method_round"] == pytest.approx(2 + 4 / 3) and at_4["method_value"] == pytest.approx(0.04)
    assert at_4["method_agc_kept"] == pytest.approx(0.85) and at_4["other_agc_kept"] == pytest.approx(1.0)
    assert at_4["method_high"] < at_4["other_low"]
    assert {row["verdict"] for row in curves.compare_curves(points, "iet", "ddpm", levels, None)} == {"not separated"}
    assert {row["verdict"] for row in curves.compare_curves(points, "slow", "ddpm", levels, None)} == {"above"}
    one_seed = [p for p in points if p["seed"] == 0]
    assert {row["verdict"] for row in curves.compare_curves(one_seed, "iet-agc", "ddpm", levels, None)} == {"no interval"}

    summary = curves.summarize(points, reference_round=6)  # ddpm's round 6: Fréchet 2.0
    assert [row["verdict"] for row in summary["methods"]["iet-agc"]["versus_baseline"]] == ["below"] * 6  # 1x to 3x
    assert summary["methods"]["ddpm"]["versus_baseline"] == []
    text = curves.summary_markdown(summary)
    assert "| iet-agc | 2.000 (1.00) | 8.0% (5.5 to 10.5%) at round 6.0 | 40.0% (37.5 to 42.5%) at round 6.0 | below " \
           "| 0.850 |" in text
    assert "| iet | 2.000 (1.00) |" in text and "| not separated |" in text and "| above |" in text
    assert "| iet-agc | 7.4% | 4.9% to 9.9% |" in text  # the near-copy table at the bar: the interval over seeds
    # older points (no near copies, no intervals, no AGC figure): no comparison, "-" where the intervals go
    old = [{key: value for key, value in p.items() if key not in ("generations_near_copies", "copied_near",
                                                                   "agc_kept_fraction")} for p in points]
    old_summary = curves.summarize(old, reference_round=6)
    assert old_summary["comparison"] is None and "Near copies against" not in curves.summary_markdown(old_summary)
    assert "| iet-agc | 5.6 (2,240; sequential 560) | 10.0% | 10.0 | 0% (0% to 0%) | 0% (0% to 0%) | 0% / 0% | no | - |" \
        in curves.summary_markdown(old_summary)
