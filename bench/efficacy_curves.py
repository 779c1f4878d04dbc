"""Efficacy curves (issue 12, method.md §7): copying against quality along training, one curve per method.

    python bench/efficacy_curves.py --out bench-results/efficacy-digits \\
        [--methods ddpm iet iet-agc iet-agc-plus 'iet-agc-plus+fedavgm:aggregation.server_optimizer=fedavgm']
        [--seeds 0 1] [--preset digits] [--rounds 40] [--baseline-rounds 20] [--eval-every 2] [--subset N]
        [--num-images 500] [--sampler ddim] [--sampling-steps 50] [--tracking-uri URI]

For every method and seed it trains in this process with `memshard train`'s own `train()`
(`orchestrator.train`, on a local Ray instance, its run nested under the bench's, its model logged but
not registered) and, every `--eval-every` rounds, in train's after-round hook, evaluates the model the
run delivers: the pipeline (`pipeline.build_pipeline`)
makes `--num-images` seeded generations here, between rounds, while the shard actors wait
(`pipeline.use_sampler` / `generate_batch`, the batches `SamplingPlan` seeds); `evaluation.evaluate`
scans them against the training images (MQ@0.5: the fraction of generations with r < 0.5; the number
of distinct training images copied, r < 0.5) and `evaluation.quality.quality_report` measures
their quality in the training set's own CNN classifier (Fréchet, mean confidence, class coverage),
beside the same figures for real held-out images.

A method is a name from memshard.config.METHODS, or a variant `LABEL:section.key=value,...` whose
label starts with the method (`iet-agc-plus+fedavgm:aggregation.server_optimizer=fedavgm`) or whose
settings name `iet.method`. `--set` applies to every method. ddpm trains one model with the K-shard
run's compute (`config.fold_baseline_to_equal_compute`), so round r of every method has spent the same
optimizer steps; each point also records the sequential steps (what one model has been updated).

Every method trains `--rounds` rounds (default 4x the preset's), the ddpm baseline `--baseline-rounds`
(default half that): its curve needs to pass its reference model and show early stopping, while the
averaged models need more rounds to reach the same quality.

`--subset N` is the small-data regime: the first N images of the data (written as a prepared dataset
with `unlearning.runner.write_subset`); train longer there (more `--rounds`). Copying is measured
against the N training images; quality against the whole dataset (the distribution the N are drawn
from), in the whole dataset's classifier, so both regimes share one quality scale.

Writes to `--out`: results.json (environment: command line, load average at start and end, device,
versions; settings; every point; the summary), points.csv, curves.png (copying against Fréchet, one
curve per method, the mean over seeds with their range, ddpm drawn as the baseline) and summary.md;
all of it is also logged to one MLflow run (experiment memshard-efficacy) with a nested run per
method and seed whose metrics are stepped by round. results.json and points.csv are rewritten after
every point, so a stopped run keeps what it measured; `--from-results results.json` redraws the plot
and the summary from them without training. `--from-results a.json b.json` merges the points of
several runs of one regime (settings from the first): a variant trained later, for one seed, is
compared with the baseline curves of an earlier run without training them again; `--only LABEL ...`
keeps some methods, and a point two runs both hold is refused (the mean would count it twice).

The summary (`memshard.tuning.curves`, as are the method names above and the merge) is the issue's
target check: at the quality of ddpm's final model (`--reference-round`;
default the preset's rounds on the whole data, ddpm's last round with `--subset`) — classifier Fréchet
at most 10% above it and class coverage no worse — each method's copying, interpolated linearly in
Fréchet where its mean curve first reaches that bar, and the reduction against ddpm's final model and
against ddpm stopped early at the same bar. `--baseline LABEL` compares with another ddpm curve instead
(a variant such as `ddpm+ema:training.ema=true`; every ddpm variant trains `--baseline-rounds`).
Each point keeps its round's AGC kept fraction and bootstrap intervals over its generations (near-copy
fraction, Fréchet); the summary adds, per method, its near copies against the baseline's at matched
Fréchet levels, "below" only where the 95% t-intervals over seeds separate (run 3 seeds or more).

Full size on a quiet 2-core CPU (estimated from BENCHMARKS.md's throughput, 540-680 training img/s,
and about 20 s per evaluation of 500 DDIM-50 generations; not measured end to end):

    python bench/efficacy_curves.py --out bench-results/efficacy-digits                 # about 4 h
    python bench/efficacy_curves.py --out bench-results/efficacy-digits-300 --subset 300  # about 4 h

i.e. ddpm 2 seeds x 20 rounds (~47 s each), three averaged methods 2 seeds x 40 rounds (~38 s each),
140 evaluations; each extra method (a server-optimizer variant) adds about 1.1 h.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import torch

from memshard.commands.cli import quiet_terminal
from memshard.config import DEFAULT_MAX_QUALITY_LOSS, Config, build_config
from memshard.data import ImageDataset, load_dataset, prepare_dataset, resolve_dataset
from memshard.errors import MemshardError
from memshard.evaluation.classifier_space import ClassifierSpace
from memshard.evaluation.curve_point import (
    COPYING,
    NEAR_COPYING,
    QUALITY,
    STRICT_COPYING,
    Data,
    copying_figures,
    evaluation_rounds,
    interval_keys,
    measure,
)
from memshard.evaluation.evaluate import EvaluateSettings, scan_for_copies
from memshard.files import in_workspace
from memshard.guard import distinct_rows, near_copy_threshold
from memshard.model import resolve_device
from memshard.neighbors import nearest_neighbors
from memshard.orchestrator.cluster import ray_session
from memshard.orchestrator.tracking import connect_mlflow, resolve_tracking_uri, tracker
from memshard.orchestrator.train import RoundEnd, RunHooks, train
from memshard.pipeline import SAMPLERS
from memshard.tuning.curves import (
    AGC_KEPT,
    BASELINE,
    Method,
    mean_curve,
    merge_results,
    method_config,
    more_copying,
    parse_method,
    real_reference_of,
    summarize,
    summary_markdown,
)
from memshard.unlearning.runner import write_subset

# Regime (b) of issue 24, duplicated images: duplicates cause most of the copying found in deployed
# models (Carlini et al., "Extracting Training Data from Diffusion Models", 2023). The whole data plus,
# for each planted row, copies until it appears `times` times: exact copies, or copies shifted by one
# pixel (near-duplicates that no content hash deduplicates). Rows 10-13 are one image each of 0, 1, 2, 3.
DUPLICATED = "duplicated"


@dataclass(frozen=True)
class Plant:
    row: int  # in the whole data
    times: int  # how often the image appears in the training set, the original included
    shifted: bool  # copies shifted by one pixel (cycling down, right, up, left) instead of exact

    @property
    def name(self) -> str:
        return f"{'shifted' if self.shifted else 'exact'}_{self.times}x"


PLANTS = (Plant(10, 10, False), Plant(11, 100, False), Plant(12, 10, True), Plant(13, 100, True))
SHIFTS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # (rows, columns)
PLANTED_FIELDS = tuple(f"reproduced_{plant.name}" for plant in PLANTS)

EXPERIMENT = "memshard-efficacy"
OUTPUTS = ("results.json", "points.csv", "curves.png", "summary.md")
RAW_SUFFIX = "-raw"  # a method with training.ema is also measured on its raw weights, as LABEL-raw
CSV_FIELDS = ("regime", "method", "seed", "round", "optimizer_steps_total", "optimizer_steps_sequential",
              "train_seconds", "eval_seconds", "wall_seconds", "loss", AGC_KEPT, *COPYING, "mq_0.5_count",
              *STRICT_COPYING, *NEAR_COPYING, *interval_keys(NEAR_COPYING[0]), "near_copy_sq_distance",
              "nn_ratio_copy_fraction", "r_median", "real_r_below_0.5", "real_r_below_0.15", *QUALITY,
              *interval_keys("frechet"), "real_frechet", "real_mean_confidence", "real_coverage", *PLANTED_FIELDS)


# ---------------------------------------------------------------- data


def load_data(cfg: Config, subset: int | None, duplicates: bool = False) -> Data:
    full = load_dataset(resolve_dataset(cfg.data.path, cfg.data.resolution, cfg.data.channels, cfg.data.cache_dir))
    if duplicates:
        return Data(load_dataset(write_duplicated(full, in_workspace(cfg.data.cache_dir))), full, DUPLICATED)
    if subset is None:
        return Data(full, full, "full")
    if not 2 <= subset < len(full):
        raise MemshardError(f"--subset {subset}: give 2 to {len(full) - 1} (the data holds {len(full)} images)")
    where = in_workspace(cfg.data.cache_dir) / f"first-{subset}-of-{full.fingerprint[:12]}"  # a setting: under the root
    return Data(load_dataset(write_subset(full, np.arange(subset), where)), full, f"first-{subset}")


def shift_one_pixel(image: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """A C×H×W image moved by (rows, columns) pixels, the uncovered edge filled with 0 (the digits' background)."""
    moved = np.zeros_like(image)
    h, w = image.shape[1:]
    moved[:, max(rows, 0):h + min(rows, 0), max(columns, 0):w + min(columns, 0)] = \
        image[:, max(-rows, 0):h + min(-rows, 0), max(-columns, 0):w + min(-columns, 0)]
    return moved


def plant_variants(plant: Plant, full: ImageDataset) -> list[np.ndarray]:
    """The planted image and its copies, in training-set order."""
    original = full.images[plant.row]
    copies = [shift_one_pixel(original, *SHIFTS[k % len(SHIFTS)]) if plant.shifted else original
              for k in range(plant.times - 1)]
    return [original, *copies]


def write_duplicated(full: ImageDataset, cache: Path) -> Path:
    """The whole data followed by the planted copies, as a prepared dataset (`memshard data prepare` of an
    .npz: ids from content hashes, a repeat of the same content gets "-k")."""
    where = cache / f"{DUPLICATED}-of-{full.fingerprint[:12]}"
    if (where / "images.parquet").exists():
        return where
    extra = [(image, full.labels[p.row]) for p in PLANTS for image in plant_variants(p, full)[1:]]
    images = np.concatenate([full.images, np.stack([image for image, _ in extra])])
    labels = np.concatenate([full.labels, np.array([label for _, label in extra])])
    channels = images.shape[1]
    arrays = cache / f".{DUPLICATED}-{full.fingerprint[:12]}.npz"
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(arrays, images=images[:, 0] if channels == 1 else images.transpose(0, 2, 3, 1), labels=labels)
    prepare_dataset(str(arrays), where, resolution=full.resolution, channels=channels)
    arrays.unlink()
    return where


def planted_rows(train: ImageDataset, full: ImageDataset) -> dict[str, np.ndarray]:
    """Per plant, the training rows that hold it or one of its copies."""
    flat = train.images.reshape(len(train), -1)
    groups = {}
    for plant in PLANTS:
        variants = np.stack([v.reshape(-1) for v in plant_variants(plant, full)])
        groups[plant.name] = np.nonzero((flat[:, None, :] == variants[None]).all(axis=2).any(axis=1))[0]
    return groups


def planted_reproductions(generated: np.ndarray, train: ImageDataset, groups: dict[str, np.ndarray],
                          threshold: float, device: str) -> dict[str, int]:
    """Per plant, the generations that are near copies (squared distance to the nearest training image
    below the calibrated threshold, the same test as every near copy) of the plant or one of its copies."""
    nearest = nearest_neighbors(generated, train.images, 1, scale=1 / 255, device=device)
    near = nearest.sq_distances[:, 0] < threshold
    return {f"reproduced_{name}": int((near & np.isin(nearest.indices[:, 0], rows)).sum())
            for name, rows in groups.items()}


# ---------------------------------------------------------------- one curve


def curve(cfg: Config, method: Method, seed: int, data: Data, eval_rounds: set[int], settings: EvaluateSettings,
          space: ClassifierSpace, device: str, record: Callable[[dict], None], parent_run_id: str,
          tracking_uri: str, experiment: str, keep_generations: Path | None = None) -> None:
    """Train one method with one seed (`train()`, its run nested under `parent_run_id`); after each round
    in `eval_rounds`, inside that run, `record` a point. With `training.ema` two: the EMA (the model the
    run delivers) and, as LABEL-raw, the raw averaged weights of the same round -- the EMA's effect,
    paired, at no extra training."""
    total_steps = sequential_steps = 0
    train_seconds = 0.0
    started = time.perf_counter()
    planted = planted_rows(data.train, data.quality) if data.regime == DUPLICATED else None

    def after_round(end: RoundEnd) -> None:
        nonlocal total_steps, sequential_steps, train_seconds
        train_seconds += end.train_seconds
        total_steps += end.optimizer_steps_total
        sequential_steps += end.optimizer_steps_sequential
        if end.round_index not in eval_rounds:
            return
        models = [(method.label, end.model_weights)]
        if end.raw_weights is not None:
            models.append((method.label + RAW_SUFFIX, end.raw_weights))
        for label, weights in models:
            start = time.perf_counter()
            measured = measure(cfg, weights, data, settings, space, device)
            reproduced = {} if planted is None else planted_reproductions(
                measured.generated, data.train, planted, measured.figures["near_copy_sq_distance"], device)
            if keep_generations is not None:  # to measure them again later, in another way, without training
                keep_generations.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(generations_file(keep_generations, label, seed, end.round_index),
                                    images=measured.generated)
            record({"regime": data.regime, "method": label, "seed": seed, "round": end.round_index,
                    "optimizer_steps_total": total_steps, "optimizer_steps_sequential": sequential_steps,
                    "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - start,
                    "wall_seconds": time.perf_counter() - started, "loss": end.report.mean_loss,
                    AGC_KEPT: end.report.kept_fraction, **measured.figures, **reproduced,
                    "eval_phase_seconds": measured.seconds})

    run_cfg = copy.deepcopy(cfg)
    run_cfg.data.path = str(data.train.path)  # the --subset data, where it is one
    run_cfg.mlflow.tracking_uri, run_cfg.mlflow.experiment = tracking_uri, experiment
    run_cfg.mlflow.sample_grid_every = 0  # the bench measures its own generations
    tags = {"method": method.label, "seed": str(seed), "regime": data.regime, "sets": json.dumps(method.sets),
            "mlflow.runName": f"{method.label} seed {seed}"}
    with tempfile.TemporaryDirectory(prefix="memshard-efficacy-") as checkpoints:  # the model is in MLflow after
        run_cfg.mlflow.checkpoint_dir = checkpoints
        train(run_cfg, show_progress=False,
              hooks=RunHooks(parent_run_id=parent_run_id, tags=tags, register=False, after_round=after_round))


# ---------------------------------------------------------------- the plot


def plot(points: list[dict], summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("generations_r_below_0.5", 100.0, "generations with r < 0.5 (%)"),
              ("copied_training_images", 1.0, "training images copied (r < 0.5)")]
    for name, (fraction, images) in more_copying(points).items():
        panels += [(fraction, 100.0, f"generations: {name} (%)"), (images, 1.0, f"training images copied ({name})")]
    figure, grid = plt.subplots(len(panels) // 2, 2, figsize=(13, 5.2 * len(panels) // 2), squeeze=False)
    axes = grid.ravel()
    methods = list(dict.fromkeys(p["method"] for p in points))
    colours = iter(plt.cm.tab10.colors)
    for method in methods:
        mean = mean_curve(points, method)
        baseline = method == summary.get("baseline", BASELINE)
        style = {"color": "black", "linewidth": 2.4, "zorder": 5} if baseline else {"color": next(colours), "linewidth": 1.4}
        for axis, (key, scale, _) in zip(axes, panels, strict=True):
            x = np.array([p["frechet"] for p in mean])
            y = np.array([p[key] for p in mean]) * scale
            xerr = np.array([[p["frechet"] - p["frechet_min"], p["frechet_max"] - p["frechet"]] for p in mean]).T
            yerr = np.array([[p[key] - p[f"{key}_min"], p[f"{key}_max"] - p[key]] for p in mean]).T * scale
            axis.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", markersize=3.5, capsize=2, elinewidth=0.7,
                          label=f"{method} (baseline)" if baseline else method, **style)
            for p, xi, yi in ((mean[0], x[0], y[0]), (mean[-1], x[-1], y[-1])):
                axis.annotate(f"r{p['round']}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points",
                              color=style["color"])
    reference = summary.get("reference")
    for axis, (key, scale, label) in zip(axes, panels, strict=True):
        real = real_reference_of(key, points)
        if real is not None:
            axis.axhline(100.0 * real, color="green", linestyle="-.", linewidth=1, label="real images no model saw")
        if reference:
            axis.plot(reference["frechet"], reference[key] * scale, marker="*", markersize=16, color="black",
                      linestyle="none", label=f"{summary['baseline']} reference (round {reference['round']})", zorder=6)
            axis.axvline(summary["quality_bar"]["frechet_max"], color="grey", linestyle="--", linewidth=1,
                         label=f"quality bar (Fréchet +{DEFAULT_MAX_QUALITY_LOSS:.0%})")
        axis.axvline(float(np.mean([p["real_frechet"] for p in points])), color="green", linestyle=":", linewidth=1,
                     label="real held-out images")
        axis.set_xscale("log")
        axis.set_xlabel("classifier-space Fréchet distance (lower is better)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


# ---------------------------------------------------------------- writing and logging


def write_outputs(out: Path, results: dict, title: str) -> None:
    points = results["points"]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    with open(out / "points.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)
    if points and "summary" in results:
        (out / "summary.md").write_text(summary_markdown(results["summary"]))
        plot(points, results["summary"], out / "curves.png", title)


def metric_key(text: str) -> str:
    """MLflow metric keys allow letters, digits, _ - . space : /."""
    return re.sub(r"[^\w\-. :/]", "_", text)


def environment(argv: list[str]) -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu: {platform.processor() or platform.machine()}"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {"command": shlex.join([sys.executable, *argv]), "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "load_average_at_start": os.getloadavg(), "cpu_count": os.cpu_count(), "device": device,
            "git_commit": commit, "python": platform.python_version(),
            "versions": {name: version(name) for name in ("torch", "diffusers", "ray", "memshard")}}


def generations_file(folder: Path, method: str, seed: int, round_index: int) -> Path:
    """Where --keep-generations saves one point's generations."""
    return folder / f"{method}-seed{seed}-round{round_index}.npz"


def remeasure_copying(points: list[dict], generations: list[Path], data: Data, eval_seed: int, device: str) -> int:
    """Measure the saved generations of each point (--keep-generations) again with today's copying
    measures, in place; the r < 0.5 figures must come out as recorded. Returns how many were found."""
    threshold = near_copy_threshold(data.train, eval_seed, device)
    rows = distinct_rows(data.train)
    found = 0
    for point in points:
        saved = [generations_file(folder, point["method"], point["seed"], point["round"]) for folder in generations]
        path = next((path for path in saved if path.exists()), None)
        if path is None:
            continue
        figures = copying_figures(scan_for_copies(np.load(path)["images"], data.train, rows, 0.5, device), threshold)
        if figures["copied_training_images"] != point["copied_training_images"]:
            raise MemshardError(f"{path}: {figures['copied_training_images']} images copied, the run recorded "
                                f"{point['copied_training_images']}: not the generations of that point, or not the same data")
        point.update(figures)
        found += 1
    return found


def title_of(results: dict) -> str:
    s = results["settings"]
    return (f"{s['preset']} ({s['regime']}): copying against quality along training, mean of seeds {s['seeds']} "
            f"with their range; {s['num_images']} generations, {s['sampler']} {s['sampling_steps']} steps")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", required=True, help="folder for results.json, points.csv, curves.png, summary.md")
    parser.add_argument("--methods", nargs="+", default=["ddpm", "iet", "iet-agc", "iet-agc-plus"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per curve (default: 4x the preset's)")
    parser.add_argument("--baseline-rounds", type=int, default=None, help="rounds of the ddpm curves (default: --rounds / 2)")
    parser.add_argument("--eval-every", type=int, default=2, help="evaluate every E rounds (and after the last)")
    parser.add_argument("--subset", type=int, default=None, help="small-data regime: the first N images")
    parser.add_argument("--duplicates", action="store_true",
                        help="duplicated-image regime: the whole data with four images repeated 10x and 100x, "
                             "exactly and shifted by a pixel; each point counts their reproductions")
    parser.add_argument("--reference-round", type=int, default=None,
                        help="ddpm's 'final model' for the target check (default: the preset's rounds; the last with --subset)")
    parser.add_argument("--baseline", default=BASELINE,
                        help="the method whose model the target check compares with (e.g. a variant ddpm+ema)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting for every method (e.g. iet.local_steps=50)")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--eval-batch", type=int, default=250)
    parser.add_argument("--eval-seed", type=int, default=0, help="generation seed, the same for every point")
    parser.add_argument("--device", default="auto", help="where evaluation runs: auto, cpu, cuda")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else memshard's default)")
    parser.add_argument("--experiment", default=EXPERIMENT)
    parser.add_argument("--from-results", nargs="+", default=None,
                        help="redraw the plot and summary from results.json files (several: their points merged)")
    parser.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                        help="with --from-results: keep only these methods' points")
    parser.add_argument("--remeasure", action="store_true",
                        help="with --from-results: measure the copying of the saved generations again (--keep-generations)")
    parser.add_argument("--keep-generations", action="store_true",
                        help="save every point's generations under OUT/generations (uint8 .npz, ~0.1 MB each at 16x16)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs (Ray, MLflow, diffusers)")
    args = parser.parse_args(argv)
    quiet_terminal(args.verbose)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.from_results:
        results = merge_results([json.loads(Path(path).read_text()) for path in args.from_results], args.only)
        if args.remeasure:
            s = results["settings"]
            subset = int(s["regime"].split("-")[1]) if s["regime"].startswith("first-") else None
            data = load_data(build_config(s["preset"], sets=s.get("common_sets", [])), subset, s["regime"] == DUPLICATED)
            folders = [Path(path).parent / "generations" for path in args.from_results]
            found = remeasure_copying(results["points"], folders, data, s["eval_seed"], str(resolve_device(args.device)))
            print(f"measured again: {found} of {len(results['points'])} points (generations in {', '.join(map(str, folders))})")
        if args.reference_round:  # read the same curves against another ddpm checkpoint
            results["settings"]["reference_round"] = args.reference_round
        results["summary"] = summarize(results["points"], results["settings"]["reference_round"], args.baseline)
        write_outputs(out, results, title_of(results))
        print(summary_markdown(results["summary"]))
        return

    preset_rounds = build_config(args.preset, sets=args.set).iet.rounds
    rounds = args.rounds or 4 * preset_rounds
    baseline_rounds = args.baseline_rounds or max(1, rounds // 2)
    reference_round = args.reference_round or (baseline_rounds if args.subset else preset_rounds)
    if args.subset and args.duplicates:
        raise MemshardError("--subset and --duplicates are two regimes: run them one at a time")
    if args.eval_every < 1 or not 1 <= reference_round <= baseline_rounds:
        raise MemshardError(f"--eval-every {args.eval_every} / --reference-round {reference_round}: need an eval "
                            f"interval >= 1 and a reference round within ddpm's {baseline_rounds} (--baseline-rounds)")
    methods = [parse_method(text) for text in args.methods]
    configs = {(m.label, seed): method_config(args.preset, m, seed, baseline_rounds if m.base == "ddpm" else rounds,
                                              args.set) for seed in args.seeds for m in methods}  # seed-major: a stopped run holds whole comparisons
    settings = EvaluateSettings(protocol="quick", num_images=args.num_images, sampler=args.sampler,
                                sampling_steps=args.sampling_steps, batch_size=args.eval_batch, seed=args.eval_seed,
                                feature_space=None, r_copy_threshold=0.5, device=args.device)
    settings.check()
    device = str(resolve_device(args.device))
    data = load_data(next(iter(configs.values())), args.subset, args.duplicates)
    space = ClassifierSpace(data.quality)
    args.tracking_uri = resolve_tracking_uri(args.tracking_uri)
    experiment_id = connect_mlflow(args.tracking_uri, args.experiment)  # the store answers before any training
    results = {"environment": environment([sys.argv[0], *argv]),
               "settings": {"preset": args.preset, "regime": data.regime, "methods": {m.label: list(m.sets) for m in methods},
                            "seeds": args.seeds, "rounds": rounds, "baseline_rounds": baseline_rounds,
                            "eval_every": args.eval_every,
                            "reference_round": reference_round, "common_sets": args.set,
                            "num_images": args.num_images, "sampler": args.sampler, "sampling_steps": args.sampling_steps,
                            "eval_seed": args.eval_seed, "eval_device": device, "training_images": len(data.train),
                            "quality_space": space.name, "quality_against": f"all {len(data.quality)} images of {data.quality.path}",
                            "copying_against": f"the {len(data.train)} training images"},
               "points": []}
    print(f"{results['environment']['command']}\nload average at start: {results['environment']['load_average_at_start']}",
          file=sys.stderr)
    torch.set_num_threads(os.cpu_count() or 1)  # evaluation runs here while the actors wait
    started = time.perf_counter()
    total_rounds = sum(cfg.iet.rounds for cfg in configs.values())
    rounds_done = 0

    def record(point: dict, rounds: int) -> None:
        results["points"].append(point)
        prefix = "raw." if point["method"].endswith(RAW_SUFFIX) else ""  # the same run's raw weights
        tracker.log_metrics({prefix + key: float(value) for key, value in point.items()  # train logs the loss
                             if key in CSV_FIELDS and key != "loss" and isinstance(value, (int, float))},
                            step=point["round"])
        write_outputs(out, results, title_of(results))
        elapsed = time.perf_counter() - started
        done = rounds_done + point["round"]
        print(f"[{point['method']} seed {point['seed']}] round {point['round']}/{rounds}: steps {point['optimizer_steps_total']:,} "
              f"(sequential {point['optimizer_steps_sequential']:,}), r<0.5 "
              f"{100 * point['generations_r_below_0.5']:.1f}%, copied {point['copied_training_images']}, "
              f"Fréchet {point['frechet']:.3f} (real {point['real_frechet']:.3f}), conf "
              f"{point['mean_confidence']:.2f}, coverage {point['coverage']:.2f}; {elapsed / 60:.1f} min, "
              f"about {elapsed / done * (total_rounds - done) / 60:.0f} min left", file=sys.stderr, flush=True)

    with ray_session(None):  # RAY_ADDRESS, else a local instance
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"efficacy {args.preset} {data.regime}") as parent:
            tracker.log_params({"command": results["environment"]["command"][:6000], **{
                key: json.dumps(value)[:6000] for key, value in results["settings"].items()}})
            for (label, seed), cfg in configs.items():
                method = next(m for m in methods if m.label == label)
                when = evaluation_rounds(cfg.iet.rounds, args.eval_every, reference_round if method.base == "ddpm" else None)
                curve(cfg, method, seed, data, when, settings, space, device,
                      functools.partial(record, rounds=cfg.iet.rounds), parent.info.run_id, args.tracking_uri,
                      args.experiment, out / "generations" if args.keep_generations else None)
                rounds_done += cfg.iet.rounds
            results["environment"]["load_average_at_end"] = os.getloadavg()
            results["environment"]["seconds"] = time.perf_counter() - started
            results["summary"] = summarize(results["points"], reference_round, args.baseline)
            write_outputs(out, results, title_of(results))
            for method, entry in results["summary"].get("methods", {}).items():
                for against in ("reduction_vs_final", "reduction_vs_early_stopped"):
                    tracker.log_metrics({metric_key(f"{against}/{method}/{key}"): value
                                         for key, value in (entry.get(against) or {}).items() if value is not None})
            for name in OUTPUTS:  # these files only: --out may also hold the tracking store
                if (out / name).exists():
                    tracker.log_artifact(out / name)
            print(f"MLflow run {parent.info.run_id} in experiment {args.experiment} ({args.tracking_uri})")
    print(summary_markdown(results["summary"]))
    print(f"load average at end: {results['environment']['load_average_at_end']}; "
          f"{results['environment']['seconds'] / 3600:.2f} h")
    print(f"wrote {out}/results.json, points.csv, curves.png, summary.md")


if __name__ == "__main__":
    try:
        main()
    except MemshardError as error:
        sys.exit(f"error: {error}")
