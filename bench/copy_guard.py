"""The copy guard at generation (issue 28): near copies and quality of trained models with no guard,
with rejection, and with guidance at several scales, from the same seeded plan.

    python bench/copy_guard.py --out DIR --regime first-300 --models models:/NAME-s0/1 models:/NAME-s1/1 ... \
        [--guards reject guidance:2 reject:-:0.25 guidance:2:0.25]
    python bench/copy_guard.py --out DIR --from-results DIR0/results.json DIR1/results.json ...   # merge runs

Each model (one per training seed) is measured like a point of the efficacy bench
(`evaluation.curve_point.measure`: near copies against the training images with a bootstrap interval
over the generations, Fréchet in the training set's classifier space against the whole dataset with
its bootstrap interval, mean confidence, class coverage, the real images' reference beside them) once
per guard setting (MODE[:SCALE[:QUANTILE]]: a quantile above the calibration's 0.05 is a stricter guard). The guard is calibrated as the measurement is (the same seed), so its threshold is
the one near copies are counted at. In the duplicated regime each planted image's reproductions are
counted too. Per setting, the mean over models carries a t-interval over the seeds
(`evaluation.intervals.t_interval`). Sampling time per setting is measured in this process, one
setting after another on the same machine: reject's includes the plain draw it starts from.

Outputs: results.json (everything), points.csv (one row per model and setting), summary.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficacy_curves import DUPLICATED, load_data, planted_reproductions, planted_rows  # noqa: E402

from memshard.config import NEAR_COPY_QUANTILE, GuardConfig, build_config  # noqa: E402
from memshard.evaluation.classifier_space import ClassifierSpace  # noqa: E402
from memshard.evaluation.curve_point import GuardedGenerateHere, generate_here, measure  # noqa: E402
from memshard.evaluation.evaluate import EvaluateSettings, Generation  # noqa: E402
from memshard.evaluation.intervals import t_interval  # noqa: E402
from memshard.guard import build_guard, near_copy_threshold  # noqa: E402
from memshard.model import resolve_device, state_to_numpy  # noqa: E402
from memshard.neighbors import nearest_neighbors  # noqa: E402
from memshard.pipeline import SamplingPlan, find_pipeline_dir, load_pipeline  # noqa: E402

# A guard moves a copy just past the threshold; these count generations nearer than the closest 10% and
# 25% of real neighbours too, to show where the moved ones land.
STRICTER_QUANTILES = (0.10, 0.25)
FIELDS = ("model", "setting", "generations_near_copies", "generations_near_copies_ci_low",
          "generations_near_copies_ci_high", *(f"near_at_q{q:g}" for q in STRICTER_QUANTILES), "copied_near", "frechet", "frechet_ci_low", "frechet_ci_high",
          "mean_confidence", "coverage", "generate_seconds", "guard.steered_fraction", "guard.extra_image_fraction",
          "guard.unresolved_fraction", "guard.first_steered_step", "real_frechet", "near_copy_sq_distance")
SUMMARY_KEYS = ("generations_near_copies", *(f"near_at_q{q:g}" for q in STRICTER_QUANTILES), "copied_near",
                "frechet", "mean_confidence", "coverage", "generate_seconds")


def local_pipeline_dir(model: str) -> Path:
    """A pipeline folder, or an MLflow model (models:/NAME/VERSION, runs:/...) downloaded."""
    if Path(model).is_dir():
        return find_pipeline_dir(Path(model), model)
    import mlflow

    return find_pipeline_dir(Path(mlflow.artifacts.download_artifacts(artifact_uri=model)), model)


class Timed:
    """A generate callable, timed: `seconds` of its last call."""

    def __init__(self, generate):
        self.generate, self.seconds = generate, 0.0

    def __call__(self, plan: SamplingPlan) -> Generation:
        start = time.perf_counter()
        generation = self.generate(plan)
        self.seconds = time.perf_counter() - start
        return generation


def parse_guard(spec: str) -> GuardConfig:
    """MODE[:SCALE[:QUANTILE]], '-' for a default: guidance:2, reject:-:0.25."""
    mode, *rest = spec.split(":")
    names = ("scale", "quantile")
    return GuardConfig(mode=mode, **{name: float(value) for name, value in zip(names[:len(rest)], rest, strict=True)
                                     if value != "-"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="+", help="pipeline folders or MLflow model URIs, one per seed")
    parser.add_argument("--from-results", nargs="+", metavar="RESULTS_JSON",
                        help="merge these runs' points (one regime; one model per run, say, measured as each finished) "
                             "into OUT's results and summary, measuring nothing")
    parser.add_argument("--regime", choices=("first-300", DUPLICATED, "full"), default="first-300",
                        help="the first 300 digits, the duplicated digits (efficacy_curves), or all 1,797")
    parser.add_argument("--guards", nargs="+", default=["reject", "guidance:2", "reject:-:0.25", "guidance:2:0.25"],
                        help="guard settings besides none, each MODE[:SCALE[:QUANTILE]] ('-': the default)")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--eval-batch", type=int, default=250)
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (default: every CPU; 1 beside other work, so it does not spin against it)")
    args = parser.parse_args(argv)

    if bool(args.models) == bool(args.from_results):
        parser.error("give --models to measure, or --from-results to merge runs already measured")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        merged = merge_results([json.loads(Path(f).read_text()) for f in args.from_results])
        write_outputs(out, merged, merged["settings"]["guards_measured"])
        return
    device = str(resolve_device(args.device))
    cfg = build_config("digits")
    data = load_data(cfg, 300 if args.regime == "first-300" else None, args.regime == DUPLICATED)
    space = ClassifierSpace(data.quality)
    planted = planted_rows(data.train, data.quality) if data.regime == DUPLICATED else None
    settings = EvaluateSettings(protocol="quick", num_images=args.num_images, sampler=args.sampler,
                                sampling_steps=args.sampling_steps, batch_size=args.eval_batch, seed=args.eval_seed,
                                feature_space=None, r_copy_threshold=0.5, device=args.device)
    settings.check()
    torch.set_num_threads(args.threads)
    guard_settings = {"none": None, **{spec: parse_guard(spec) for spec in args.guards}}
    environment = {"command": " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "date": time.strftime("%Y-%m-%d %H:%M"),
                   "load_average_at_start": os.getloadavg(), "machine": platform.platform(), "cpus": os.cpu_count(),
                   "device": device, "torch_threads": torch.get_num_threads(),
                   "commit": subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short",
                                             "HEAD"], capture_output=True, text=True).stdout.strip()}  # from any cwd
    results = {"environment": environment, "settings": {**vars(args), "quality_space": space.name,
               "training_images": len(data.train), "quality_against": len(data.quality),
               "guards_measured": list(guard_settings)}, "points": []}
    print(environment["command"], f"load {environment['load_average_at_start']}", file=sys.stderr)

    thresholds = {q: near_copy_threshold(data.train, args.eval_seed, device, q) for q in STRICTER_QUANTILES}
    for model in args.models:
        pipeline = load_pipeline(local_pipeline_dir(model), device)
        weights = state_to_numpy(pipeline.unet)
        plain, plain_images = Timed(generate_here(pipeline)), None  # "none" is measured first
        for setting, guard_cfg in guard_settings.items():
            guard = None if guard_cfg is None else build_guard(guard_cfg, data.train, device, seed=args.eval_seed)
            guarded = None if guard is None else GuardedGenerateHere(
                pipeline, guard, plain_images if guard.mode == "reject" else None)  # reject starts from the plain draw
            generate = plain if guard is None else Timed(guarded)
            measured = measure(cfg, weights, data, settings, space, device, generate)
            if guard is None:
                plain_images = measured.generated
            seconds = generate.seconds + (plain.seconds if guard is not None and guard.mode == "reject" else 0.0)
            log = None if guarded is None else guarded.log
            reproduced = {} if planted is None else planted_reproductions(
                measured.generated, data.train, planted, measured.figures["near_copy_sq_distance"], device)
            nearest = nearest_neighbors(measured.generated, data.train.images, 1, scale=1 / 255, device=device)
            stricter = {f"near_at_q{q:g}": float((nearest.sq_distances[:, 0] < thresholds[q]).mean())
                        for q in STRICTER_QUANTILES}
            point = {"model": model, "setting": setting, **measured.figures, **reproduced, **stricter,
                     "generate_seconds": seconds, **(log.metrics() if log else {}),
                     "load_average": os.getloadavg()[0]}
            if guard is not None and guard.settings.quantile == NEAR_COPY_QUANTILE:  # the guard's line is the count's
                assert guard.threshold == measured.figures["near_copy_sq_distance"]
            results["points"].append(point)
            print(f"[{model}] {setting}: near copies {100 * point['generations_near_copies']:.1f}% "
                  f"({100 * point['generations_near_copies_ci_low']:.1f}-{100 * point['generations_near_copies_ci_high']:.1f}), "
                  f"Fréchet {point['frechet']:.1f} ({point['frechet_ci_low']:.1f}-{point['frechet_ci_high']:.1f}), "
                  f"{point['generate_seconds']:.1f} s, load {point['load_average']:.1f}"
                  + "".join(f", {k} {v}" for k, v in reproduced.items()), file=sys.stderr, flush=True)
            write_outputs(out, results, list(guard_settings))
    environment["load_average_at_end"] = os.getloadavg()
    write_outputs(out, results, list(guard_settings))


def merge_results(runs: list[dict]) -> dict:
    """The points of several runs of one regime and one measurement as one result: every run's environment
    kept, the models listed in run order. Runs that differ in what they measured, or share a model, are refused."""
    for run in runs:  # runs before --from-results listed their settings as --guards, "none" measured first
        run["settings"].setdefault("guards_measured", ["none", *run["settings"]["guards"]])
    same = ("regime", "num_images", "sampler", "sampling_steps", "eval_seed", "guards_measured")
    first = runs[0]["settings"]
    for run in runs[1:]:
        differing = [k for k in same if run["settings"].get(k) != first.get(k)]
        if differing:
            raise SystemExit(f"--from-results: the runs differ in {', '.join(differing)}: merge runs of one measurement")
    models = [m for run in runs for m in run["settings"]["models"]]
    if len(set(models)) < len(models):
        raise SystemExit("--from-results: a model is in two runs: its points would count twice")
    return {"environment": [run["environment"] for run in runs],
            "settings": {**first, "models": models, "from_results": True},
            "points": [p for run in runs for p in run["points"]]}


def summarize(points: list[dict], settings: list[str]) -> list[dict]:
    """Per setting: the mean over models of each figure, with its t-interval over them."""
    rows = []
    for setting in settings:
        mine = [p for p in points if p["setting"] == setting]
        if not mine:
            continue
        row = {"setting": setting, "models": len(mine)}
        keys = list(SUMMARY_KEYS) + sorted({k for p in mine for k in p if k.startswith("reproduced_")})
        for key in keys:
            values = [p[key] for p in mine if p.get(key) is not None]
            row[key] = float(np.mean(values)) if values else None
            row[key + "_seed_interval"] = t_interval(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def write_outputs(out: Path, results: dict, settings: list[str]) -> None:
    results["summary"] = summarize(results["points"], settings)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    with open(out / "points.csv", "w", newline="") as f:
        keys = list(FIELDS) + sorted({k for p in results["points"] for k in p if k.startswith("reproduced_")})
        writer = csv.DictWriter(f, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["points"])
    real = results["points"][0]["real_frechet"] if results["points"] else None
    planted = sorted({k for row in results["summary"] for k in row if k.startswith("reproduced_") and
                      not k.endswith("_seed_interval")})  # the duplicated regime: reproductions of each planted image
    lines = [f"# Copy guard, {results['settings']['regime']}: mean over {len(results['settings']['models'])} models "
             f"(t-interval over seeds)", "", f"Real held-out Fréchet: {real}; near copies of real images: 5% by "
             "construction.", "", "| setting | near copies % | nearer than 10% of real % | than 25% % | images nearly copied | Fréchet "
             "| confidence | coverage | sampling s |" + "".join(f" {k} |" for k in planted),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(planted)]

    def cell(row, key, scale=1.0, digits=1):
        if row.get(key) is None:
            return "-"
        interval = row.get(key + "_seed_interval")
        text = f"{scale * row[key]:.{digits}f}"
        return text + (f" ({scale * interval[0]:.{digits}f}-{scale * interval[1]:.{digits}f})" if interval else "")

    for row in results["summary"]:
        lines.append(f"| {row['setting']} | {cell(row, 'generations_near_copies', 100)} | "
                     f"{cell(row, 'near_at_q0.1', 100)} | {cell(row, 'near_at_q0.25', 100)} | {cell(row, 'copied_near')} | "
                     f"{cell(row, 'frechet')} | {cell(row, 'mean_confidence', 1, 3)} | {cell(row, 'coverage', 1, 2)} | "
                     f"{cell(row, 'generate_seconds')} |" + "".join(f" {cell(row, k)} |" for k in planted))
    (out / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
