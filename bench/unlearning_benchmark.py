"""Unlearning a planted memorized image: SISS against its baselines and retraining (issue 14).

One command builds everything from scratch, deterministically, and writes one JSON and one markdown
table:

    python bench/unlearning_benchmark.py                 # the benchmark (the digits preset)
    python bench/unlearning_benchmark.py --quick         # a smoke run on the tiny preset (minutes)
    python bench/unlearning_benchmark.py --reuse-models --methods siss siss:rho=0.05 siss:rho=0.05,seed=1
                                                         # more variants on the models of an earlier run

A method is a variant name, optionally with UnlearnSettings changes after ':' (`siss:rho=0.05,check_every=10`).
`--reuse-models` takes the trained and the retrained model (and their training seconds) from the
earlier run in the same --out (its models.json) instead of training them again: the same data and
config give the same models, so only the unlearning is new.

1. Data: the 1,797 bundled digits plus one of them (row 0) planted PLANT_COPIES more times, written
   as a labelled .npz and prepared by memshard.data like any user's data (--quick: the first 200).
2. Model: `memshard train --method ddpm` of the default preset (`digits`, 4,000 optimizer steps;
   --quick: `tiny`, 300 steps) through orchestrator.train on a local Ray instance. The run is void
   unless the model reproduces the planted image; the script says so and exits 1.
3. Forget set: every row holding the planted image. Each method runs in this process from the same
   weights with the library defaults (`UnlearnSettings`: stop when the forget checks find the image
   no longer reproduced, cap max_steps): siss (relative c_t = rho·‖g_x‖), siss with the absolute c = 5,
   naive, neggrad, erasediff. Then retrain: the same training run on the kept rows only.
4. Every model, before and after, is measured with the unlearning audit (`unlearning.audit.measure`,
   one seed for all): generations reproducing the planted image (mean squared pixel distance below
   0.01, pixels in [0, 1]) among --generations (≥ 500; DDPM, --sampling-steps), keep-set loss at
   fixed seeded (t, ε), quality in the training set's own classifier space (Fréchet and class
   coverage, with the real reference: held-out digits against the rest), and compute as a fraction
   of the retrain's optimizer steps and seconds (the forget checks included).

Target (issue 14), checked for every method and printed: 0 reproductions of the planted image,
keep-set loss within +5% and Fréchet within +10% of the model before unlearning, in ≤ 5% of
retraining's optimizer steps and seconds. Timings hold only for the machine they were taken on;
record them in BENCHMARKS.md with the device, date and command.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from memshard.commands.unlearn import parse_unlearn_sets  # the CLI's --set reading and checks
from memshard.config import build_config, to_dict
from memshard.data import load_dataset, resolve_dataset
from memshard.errors import MemshardError
from memshard.evaluation.classifier_space import ClassifierSpace
from memshard.model import build_scheduler, state_to_numpy
from memshard.orchestrator.train import train
from memshard.pipeline import build_pipeline, load_pipeline
from memshard.unlearning.audit import AuditMeasures, AuditSettings, measure
from memshard.unlearning.forget_set import ForgetSet
from memshard.unlearning.methods import unlearn
from memshard.unlearning.runner import training_steps, write_subset

PLANT_COPIES = 100  # extra copies of the planted digit (it appears PLANT_COPIES + 1 times)
PLANTED_ROW = 0  # which bundled digit is planted
QUICK_DIGITS = 200  # --quick: a third of the data is the planted image, so the tiny model copies it in 300 steps
TARGET = {"keep_loss": 0.05, "frechet": 0.10, "compute": 0.05}  # relative to before; fraction of retraining
VARIANTS = {  # name -> (method, settings changes from the library defaults)
    "siss": ("siss", {}),
    "siss-absolute-c5": ("siss", {"forget_scale_mode": "absolute", "c": 5.0}),
    "naive": ("naive", {}),
    "neggrad": ("neggrad", {}),
    "erasediff": ("erasediff", {}),
}


def planted_digits(out: Path, count: int | None = None) -> Path:
    """The first `count` digits (None: all 1,797) plus PLANT_COPIES more copies of digit PLANTED_ROW,
    with labels, as a .npz."""
    digits = load_digits()
    images = np.rint(digits.images[:count] * 255 / 16).astype(np.uint8)
    targets = digits.target[:count]
    planted = np.concatenate([images, np.repeat(images[PLANTED_ROW:PLANTED_ROW + 1], PLANT_COPIES, axis=0)])
    labels = np.concatenate([targets, np.repeat(targets[PLANTED_ROW:PLANTED_ROW + 1], PLANT_COPIES)])
    path = out / "digits-planted.npz"
    np.savez(path, images=planted, labels=labels.astype(np.int64))
    return path


def parse_variant(text: str) -> tuple[str, str, dict]:
    """`siss` or `siss:rho=0.05,seed=1` -> (label, method, settings changes), checked like unlearn's --set."""
    name, _, changes = text.partition(":")
    if name not in VARIANTS:
        raise MemshardError(f"method {name!r}: choose one of {', '.join(VARIANTS)} (optionally NAME:field=value,...)")
    method, preset_changes = VARIANTS[name]
    sets = [item.strip() for item in changes.split(",") if item.strip()]
    if any("." in item.partition("=")[0] for item in sets):
        raise MemshardError(f"method {text!r}: only UnlearnSettings fields (rho=0.05, seed=1, ...) after ':'")
    chosen = {key: value for key, value in parse_unlearn_sets(sets).settings.__dict__.items()
              if any(item.partition("=")[0].strip() == key for item in sets)}
    return text, method, {**preset_changes, **chosen}


def trained_models(cfg, retrain_cfg, out: Path, reuse: bool) -> dict:
    """The model before unlearning and the retrained one: trained here (and recorded in models.json),
    or, with reuse, the ones an earlier run in `out` recorded."""
    record = out / "models.json"
    if reuse:
        if not record.exists():
            raise MemshardError(f"--reuse-models: {record} does not exist; run once without --reuse-models")
        models = json.loads(record.read_text())
        print(f"reusing the models of the earlier run ({record})", file=sys.stderr)
        return models
    print("training the ddpm model on the planted digits ...", file=sys.stderr)
    before_dir, train_seconds = timed_train(cfg)
    print("retraining without the planted image ...", file=sys.stderr)
    retrain_dir, retrain_seconds = timed_train(retrain_cfg)
    models = {"before_dir": str(before_dir), "train_seconds": train_seconds,
              "retrain_dir": str(retrain_dir), "retrain_seconds": retrain_seconds}
    record.write_text(json.dumps(models, indent=2))
    return models


def train_config(args, data: str, out: Path, name: str):
    tracking = f"sqlite:///{out / 'mlflow.db'}"
    common = {"data.path": data, "iet.method": "ddpm", "mlflow.tracking_uri": tracking,
              "mlflow.register_as": name, "mlflow.checkpoint_dir": str(out / "checkpoints"),
              "data.cache_dir": str(out / "data"), "mlflow.sample_grid_every": 0}
    if args.quick:  # the test suite's planted-image recipe: a tiny model that memorizes in seconds
        return build_config("tiny", overrides={**common, "iet.shards": 1, "iet.rounds": 1, "iet.local_steps": 300},
                            sets=["training.batch_size=32", "training.learning_rate=0.001", "training.warmup_steps=10"])
    return build_config("digits", overrides=common)


def timed_train(cfg) -> tuple[Path, float]:
    started = time.perf_counter()
    result = train(cfg, show_progress=False)
    return result.local_pipeline, time.perf_counter() - started


def figures(measures: AuditMeasures) -> dict:
    quality = measures.quality
    return {"reproductions": measures.pixel_matches, "generations": measures.generations,
            "nearest_mse": measures.per_image[0].nearest_mse, "keep_loss": measures.keep_loss,
            "forget_loss": measures.forget_loss, "frechet": quality.generated.frechet,
            "coverage": quality.generated.coverage, "mean_confidence": quality.generated.mean_confidence}


def shortfalls(row: dict, before: dict) -> list[str]:
    """Which targets a method misses (empty: all met)."""
    misses = []
    if row["reproductions"] > 0:
        misses.append(f"still reproduces the image ({row['reproductions']}/{row['generations']})")
    keep = row["keep_loss"] / before["keep_loss"] - 1
    if keep > TARGET["keep_loss"]:
        misses.append(f"keep loss {100 * keep:+.0f}% (> +{100 * TARGET['keep_loss']:.0f}%)")
    frechet = row["frechet"] / before["frechet"] - 1
    if frechet > TARGET["frechet"]:
        misses.append(f"Fréchet {100 * frechet:+.0f}% (> +{100 * TARGET['frechet']:.0f}%)")
    for key in ("steps_fraction", "seconds_fraction"):
        if row.get(key) is not None and row[key] > TARGET["compute"]:
            misses.append(f"{key.split('_')[0]} {100 * row[key]:.1f}% of retraining (> {100 * TARGET['compute']:.0f}%)")
    return misses


def markdown(result: dict) -> str:
    before, rows, retrain = result["before"], result["methods"], result["retrain"]
    n = before["generations"]
    lines = [f"Planted image reproduced in {before['reproductions']} of {n} generations before unlearning "
             f"(forget set: {result['forget_size']} rows of one image; {result['keep_size']} kept). Quality in "
             f"{result['quality_space']}; real reference: Fréchet {result['real_reference']['frechet']:.3f}, "
             f"coverage {result['real_reference']['coverage']:.2f} ({result['real_reference']['what']}).", "",
             f"| model | reproductions (of {n}) | keep loss | Fréchet | coverage | steps | % of retrain steps | "
             "seconds | % of retrain seconds | stopped | misses |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| before unlearning | {before['reproductions']} | {before['keep_loss']:.4f} | {before['frechet']:.3f} | "
             f"{before['coverage']:.2f} | {result['training']['steps']} (training) | | "
             f"{result['training']['seconds']:.0f} (training) | | | |"]

    def change(row, key):
        return f"{row[key]:.4f} ({100 * (row[key] / before[key] - 1):+.1f}%)" if key == "keep_loss" else \
            f"{row[key]:.3f} ({100 * (row[key] / before[key] - 1):+.1f}%)"

    for name, row in rows.items():
        misses = "; ".join(row["misses"]) or "none: meets the target"
        lines.append(f"| {name} | {before['reproductions']} → {row['reproductions']} | {change(row, 'keep_loss')} | "
                     f"{change(row, 'frechet')} | {row['coverage']:.2f} | {row['steps']} | "
                     f"{100 * row['steps_fraction']:.1f}% | {row['seconds']:.1f} | {100 * row['seconds_fraction']:.1f}% | "
                     f"{row['stopped']} | {misses} |")
    lines.append(f"| retrain (exact) | {before['reproductions']} → {retrain['reproductions']} | "
                 f"{change(retrain, 'keep_loss')} | {change(retrain, 'frechet')} | {retrain['coverage']:.2f} | "
                 f"{retrain['steps']} | 100% | {retrain['seconds']:.0f} | 100% | | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, few generations: a smoke run")
    parser.add_argument("--out", default=".memshard/bench/unlearning", help="work folder; results.json/.md land here")
    parser.add_argument("--generations", type=int, help="generations per model (default 500; --quick 64)")
    parser.add_argument("--sampling-steps", type=int, default=50, help="DDPM steps per generation (default 50)")
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), metavar="NAME[:field=value,...]",
                        help=f"variants: {', '.join(VARIANTS)}, each optionally with UnlearnSettings changes")
    parser.add_argument("--reuse-models", action="store_true",
                        help="take the trained and retrained models from the earlier run in --out (models.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an UnlearnSettings field for every method (e.g. rho=0.2, max_steps=200)")
    args = parser.parse_args()
    if any("." in item.partition("=")[0] for item in args.set):
        parser.error("--set takes UnlearnSettings fields only (rho=0.2, max_steps=200, ...); the audit here is fixed")
    quick = ["max_steps=100", "check_every=10", "batch_size=32"] if args.quick else []
    try:
        base = parse_unlearn_sets(quick + args.set).settings  # a later --set wins
    except MemshardError as error:
        parser.error(str(error))
    try:
        variants = [parse_variant(text) for text in args.methods]
    except MemshardError as error:
        parser.error(str(error))
    generations = args.generations or (64 if args.quick else 500)
    if generations < 2 or args.sampling_steps < 1:
        parser.error("--generations needs at least 2 and --sampling-steps at least 1")
    out = Path(args.out).absolute() / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    load_at_start = os.getloadavg()
    os.chdir(out)  # the classifier cache and Ray's temp files stay in the work folder

    # 1-2. Data and the model that reproduces the planted image.
    data = planted_digits(out, QUICK_DIGITS if args.quick else None)
    cfg = train_config(args, str(data), out, "unlearning-bench")
    dataset = load_dataset(resolve_dataset(cfg.data.path, cfg.data.resolution, cfg.data.channels, cfg.data.cache_dir))
    hashes, counts = np.unique(dataset.content_hashes, return_counts=True)
    planted_hash = hashes[counts == PLANT_COPIES + 1]
    assert len(planted_hash) == 1, "the planted image should be the one image repeated PLANT_COPIES + 1 times"
    rows = np.flatnonzero(dataset.content_hashes == planted_hash[0])
    forget = ForgetSet(rows, np.setdiff1d(np.arange(len(dataset)), rows), tuple(dataset.sample_ids[rows].astype(str)))
    audit = AuditSettings(num_images=generations, sampling_steps=args.sampling_steps, keep_samples=512)
    space = ClassifierSpace(dataset)
    retrain_cfg = copy.deepcopy(cfg)
    retrain_cfg.data.path = str(write_subset(dataset, forget.keep_rows, out / "kept"))
    retrain_cfg.mlflow.register_as = "unlearning-bench-retrain"
    try:
        models = trained_models(cfg, retrain_cfg, out, args.reuse_models)
    except MemshardError as error:
        parser.error(str(error))
    before_dir, train_seconds = Path(models["before_dir"]), models["train_seconds"]
    before_pipeline = load_pipeline(before_dir, "cpu")
    print("measuring the model before unlearning ...", file=sys.stderr)
    before_measures = measure(before_pipeline, dataset, forget, audit, space)
    before = figures(before_measures)
    if before["reproductions"] == 0:
        print(f"VOID: the trained model does not reproduce the planted image in {generations} generations "
              "(nearest generation at mean squared distance "
              f"{before['nearest_mse']:.4f}); train longer or plant more copies", file=sys.stderr)
        return 1

    # 3. Retrain (the exact reference and the compute scale), then every approximate method.
    retrain_dir, retrain_seconds = Path(models["retrain_dir"]), models["retrain_seconds"]
    retrain_steps = training_steps(retrain_cfg)
    retrain = {**figures(measure(load_pipeline(retrain_dir, "cpu"), dataset, forget, audit, space)),
               "steps": retrain_steps, "seconds": retrain_seconds}

    scheduler = build_scheduler(cfg)
    keep_images, forget_images = dataset.images[forget.keep_rows], dataset.images[forget.rows]
    methods = {}
    for name, method, changes in variants:
        settings = dataclasses.replace(base, **changes)
        unet = load_pipeline(before_dir, "cpu").unet
        print(f"unlearning: {name} ...", file=sys.stderr)
        stats = unlearn(method, unet, scheduler, keep_images, forget_images, settings, audit.pixel_match_threshold)
        after = build_pipeline(cfg, dataset.channels, state_to_numpy(unet))
        row = {**figures(measure(after, dataset, forget, audit, space)), "steps": stats.steps,
               "seconds": stats.seconds, "check_seconds": stats.check_seconds, "stopped": stats.stopped,
               "steps_fraction": stats.steps / retrain_steps, "seconds_fraction": stats.seconds / retrain_seconds,
               "settings": dataclasses.asdict(settings),
               "trajectory": [dataclasses.asdict(p) for p in stats.trajectory]}
        row["misses"] = shortfalls(row, before)
        methods[name] = row

    # 4. The results.
    real = before_measures.quality.real
    device = (f"cuda: {torch.cuda.get_device_name()}" if torch.cuda.is_available()
              else f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    result = {
        "command": " ".join(["python", "bench/unlearning_benchmark.py", *sys.argv[1:]]),
        "models": {**models, "reused": args.reuse_models},
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
        "preset": "tiny" if args.quick else "digits", "config": to_dict(cfg),
        "training": {"steps": training_steps(cfg), "seconds": train_seconds},
        "planted": {"row": PLANTED_ROW, "duplicates_in_dataset": int(len(rows))},
        "forget_size": int(len(forget.rows)), "keep_size": int(len(forget.keep_rows)),
        "audit": dataclasses.asdict(audit), "quality_space": space.name,
        "real_reference": {"frechet": real.frechet, "coverage": real.coverage,
                           "mean_confidence": real.mean_confidence, "what": before_measures.quality.real_reference},
        "target": TARGET, "before": before, "methods": methods, "retrain": retrain,
        "siss_meets_target": not methods.get("siss", {"misses": ["not run"]})["misses"],
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "results.md").write_text(table + "\n")
    print(f"device: {device}; torch {torch.__version__}; {result['command']}")
    print(table)
    print(f"\nresults: {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
