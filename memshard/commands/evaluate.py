"""`memshard evaluate` and `memshard compare`: settings in, numbers out, one MLflow run each.

evaluate: MODEL -> its pipeline, training run and data (`orchestrator.registry`) -> the quality
space (`evaluation.evaluate.choose_quality_space`) -> the sampling plan sized to the cluster
(`evaluation.evaluate.sampling_plan`) -> generations on Ray workers (`orchestrator.generation`) ->
nearest training images, memorization metrics and quality beside its real reference, here in the
driver (`evaluation.evaluate`) -> one MLflow run in the training run's experiment, tagged
`memshard.source_run_id`, with the metrics, the r histogram, the most-copied images beside their
closest generations, `report.json` and `copies_per_sample.parquet`. Everything is computed before
the run is opened, so a failure leaves no half-logged run; every setting and the tracking store are
checked before any model is fetched. The choices (protocol, quality space, workers, estimate) are
printed as they are made.

With a guard (`--guard`, else the model's own guard section) the workers make every generation plain
and guarded; the run holds both sets of figures (the guarded ones as `guarded.*`, what the guard did
as `guard.*` metrics, its settings as `guard.*` params) and the terminal prints them side by side.

compare: evaluation runs (or training runs, through their latest evaluation) side by side
(`evaluation.compare`), printed and logged as compare.md / compare.json in a `compare` run.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from memshard.config import NEAR_COPY_QUANTILE, DataConfig, MLflowConfig, redact_uri
from memshard.data import ImageDataset, load_dataset, resolve_dataset
from memshard.errors import MemshardError
from memshard.evaluation.compare import CompareRow, CompareTable, compare_row, compare_table
from memshard.evaluation.evaluate import (
    COPIES_TABLE,
    GUARDED_PREFIX,
    REAL_PREFIX,
    REAL_REFERENCE_WHAT,
    EvaluateSettings,
    EvaluationReport,
    Generation,
    GuardedGeneration,
    check_image_shape,
    choose_quality_space,
    evaluate,
    evaluation_guard,
    sampling_plan,
)
from memshard.evaluation.figures import most_r_copied, r_histogram
from memshard.evaluation.memorization import THRESHOLDS
from memshard.files import check_writable_target, replace_file
from memshard.orchestrator.cluster import ray_session
from memshard.orchestrator.generation import cluster_has_gpu, generate_on_ray, plan_workers
from memshard.orchestrator.registry import (
    KIND_TAG,
    SOURCE_RUN_TAG,
    ResolvedModel,
    get_run,
    latest_evaluation,
    load_model,
    recorded_dataset,
    resolve_model,
)
from memshard.orchestrator.tracking import (
    check_tracking_store,
    connect_mlflow,
    resolve_tracking_uri,
    tracker,
    ui_command,
)
from memshard.pipeline import SamplingPlan, image_grid, image_shape

SAMPLE_GRID_IMAGES = 64


@dataclass(frozen=True)
class EvaluationResult:
    run_id: str
    source_run_id: str | None
    tracking_uri: str
    report: EvaluationReport = field(repr=False)

    @property
    def metrics(self) -> dict[str, float]:
        return self.report.metrics()


def evaluate_model(model: str, settings: EvaluateSettings | None = None, data: str | None = None,
                   tracking_uri: str | None = None, experiment: str = MLflowConfig.experiment,
                   show_progress: bool = True, say: Callable[[str], None] = print,
                   ray_address: str | None = None) -> EvaluationResult:
    """Evaluate `model` and log one MLflow run; see the module notes. `say` gets the choice lines;
    `ray_address` (--ray-address) beats RAY_ADDRESS (`cluster.resolve_ray_address`)."""
    settings = settings or EvaluateSettings()
    settings.check()
    tracking_uri = resolve_tracking_uri(tracking_uri)
    client = check_tracking_store(tracking_uri)
    # Fail fast, before minutes of sampling: the model, the data, the quality space, the workers.
    resolved = resolve_model(model, client)
    loaded = load_model(resolved, client, "cpu")
    pipeline = loaded.pipeline  # shipped to the generation workers
    guard_settings = settings.guard_settings(loaded.guard)
    dataset, matches = _training_data(resolved, data, image_shape(pipeline))
    check_image_shape(dataset, pipeline)
    source = resolved.source_run
    if source is not None:
        experiment = client.get_experiment(source.info.experiment_id).name
    experiment_id = connect_mlflow(tracking_uri, experiment)
    device = "cuda" if settings.device != "cpu" and torch.cuda.is_available() else "cpu"  # this process's
    space = choose_quality_space(settings, dataset, device)
    say(f"quality: {space.reason}")
    guard = evaluation_guard(guard_settings, dataset, settings.seed, device)
    if guard is not None:
        chosen = "--guard" if settings.guard else "the model's guard section"
        say(f"guard: {guard.mode} ({chosen}), a near copy is d1^2 < {guard.threshold:.4g} (quantile "
            f"{guard.settings.quantile} of real images' distance to their nearest other training image): every "
            "generation is made unguarded and guarded, and both are measured")
    with ray_session(ray_address):
        choice = sampling_plan(settings, int(pipeline.scheduler.config.num_train_timesteps),
                               cluster_has_gpu(settings.device))
        say(choice.note)
        workers = plan_workers(settings.workers, settings.device, len(choice.plan.batches()))
        say(f"generating on {workers.describe()}")

        def generate(plan: SamplingPlan) -> Generation:
            made = generate_on_ray(pipeline, plan, workers, batch_timeout_s=settings.batch_timeout_s,
                                   show_progress=show_progress, guard=guard)
            guarded = None if guard is None else GuardedGeneration(
                made.guarded, made.guard_log, guard.describe(),
                {"plain_batches": made.plain_batch_seconds, "guarded_batches": made.guard_seconds})
            return Generation(made.images, made.workers.device, made.details(), guarded)

        report = evaluate(choice, dataset, generate, settings, space, device)
    run_id = _log_evaluation(model, source, dataset, matches, report, experiment_id)
    return EvaluationResult(run_id, resolved.source_run_id, tracking_uri, report)


def _training_data(resolved: ResolvedModel, data: str | None,
                   shape: tuple[int, int, int]) -> tuple[ImageDataset, bool | None]:
    """The dataset to scan, and whether it is the one the training run recorded (None: no run)."""
    source = resolved.source_run
    if data is not None:
        channels, resolution, _ = shape
        dataset = load_dataset(resolve_dataset(data, resolution, channels, DataConfig.cache_dir))
    elif source is None:
        raise MemshardError(f"{resolved.given} has no MLflow training run to read its training data from: pass --data")
    else:
        dataset = recorded_dataset(source, fix="pass --data with the images to evaluate against")
    matches = None if source is None else dataset.fingerprint == source.data.params.get("dataset.fingerprint")
    return dataset, matches


def _log_evaluation(model: str, source: Run | None, dataset: ImageDataset, matches: bool | None,
                    report: EvaluationReport, experiment_id: str) -> str:
    plan = report.plan
    label = (source.info.run_name or source.info.run_id) if source else Path(model).name
    params = {"model": model, **report.params(), "dataset.path": dataset.path,
              "dataset.fingerprint": dataset.fingerprint, "dataset.count": len(dataset),
              "dataset.matches_training_run": "unknown" if matches is None else str(matches).lower()}
    tags = {KIND_TAG: "evaluation", "memshard.model_uri": model, "memshard.version": version("memshard")}
    if source is not None:
        tags[SOURCE_RUN_TAG] = source.info.run_id
        tags["memshard.source_method"] = source.data.params.get("method", "")
    summary = {"model": model, "source_run_id": source.info.run_id if source else None,
               "source_method": source.data.params.get("method") if source else None,
               "dataset": {"path": dataset.path, "fingerprint": dataset.fingerprint, "count": len(dataset),
                           "matches_training_run": matches},
               **report.summary(dataset)}
    title = f"{label}: {plan.num_images} generations, {plan.sampler} {plan.steps} steps, seed {plan.seed}"
    generated = report.generated
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"evaluate {label}", tags=tags) as run:
        tracker.log_params(params)
        tracker.log_metrics(report.metrics())
        tracker.log_dict(summary, "report.json")
        tracker.log_table(report.copies_table(dataset), COPIES_TABLE)
        _log_png(r_histogram(report.memorization, title), "r_histogram.png")
        _log_png(most_r_copied(report.memorization, dataset.images, dataset.sample_ids, generated, title),
                 "most_r_copied.png")
        tracker.log_image(image_grid(generated[:SAMPLE_GRID_IMAGES].transpose(0, 2, 3, 1)), "samples.png")
        if report.guarded is not None:
            guarded = report.guarded.generation.images
            tracker.log_image(image_grid(guarded[:SAMPLE_GRID_IMAGES].transpose(0, 2, 3, 1)), "guarded_samples.png")
    return run.info.run_id


def _log_png(png: bytes, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(png)
        tracker.log_artifact(path)


@dataclass(frozen=True)
class CompareResult:
    run_id: str
    table: CompareTable


def compare_runs(run_ids: list[str], tracking_uri: str | None = None) -> CompareResult:
    """Evaluation runs side by side (a training run stands for its latest FINISHED evaluation), logged
    as compare.md / compare.json in a new `compare` run of the first evaluation's experiment."""
    if not run_ids:
        raise MemshardError("compare needs at least one run id: give evaluation or training runs")
    tracking_uri = resolve_tracking_uri(tracking_uri)
    client = check_tracking_store(tracking_uri)
    evaluations = [latest_evaluation(client, run_id) for run_id in run_ids]
    table = compare_table([_compare_row(client, run) for run in evaluations])
    experiment_id = connect_mlflow(tracking_uri, client.get_experiment(evaluations[0].info.experiment_id).name)
    tags = {KIND_TAG: "compare", "memshard.compared_runs": ",".join(r.info.run_id for r in evaluations)}
    with mlflow.start_run(experiment_id=experiment_id, run_name="compare", tags=tags) as run:
        tracker.log_text(table.markdown(), "compare.md")
        tracker.log_dict(table.to_json(), "compare.json")
    return CompareResult(run.info.run_id, table)


def _compare_row(client: MlflowClient, run: Run) -> CompareRow:
    source_id = run.data.tags.get(SOURCE_RUN_TAG)
    train_params = get_run(client, source_id).data.params if source_id else {}
    return compare_row(run.info.run_id, run.data.params, run.data.metrics, source_id,
                       run.data.tags.get("memshard.source_method"), train_params)


def evaluate_settings(args: argparse.Namespace) -> EvaluateSettings:
    """`memshard evaluate`'s flags as settings (nothing checked yet: `EvaluateSettings.check`)."""
    patience = {} if args.batch_timeout is None else {"batch_timeout_s": args.batch_timeout}
    return EvaluateSettings(protocol=args.protocol, num_images=args.num_images, sampler=args.sampler,
                            sampling_steps=args.sampling_steps, batch_size=args.batch, seed=args.seed,
                            feature_space=None if args.feature_space == "none" else args.feature_space,
                            inception_weights=args.inception_weights, r_copy_threshold=args.r_copy_threshold,
                            device=args.device, workers=args.workers, guard=args.guard,
                            guard_quantile=args.guard_quantile, guard_scale=args.guard_scale, **patience)


def quality_lines(report: EvaluationReport) -> list[str]:
    """The quality figures, each with its space and the same figure for real images beside it."""
    quality = report.quality
    if quality is None:
        return [f"quality: {report.quality_note}"]
    gen, real, space = quality.generated, quality.real, quality.space
    lines = [f"FID [{space}]: {gen.frechet:.3f} (real images: {real.frechet:.3f})"]
    if gen.mean_confidence is not None:
        lines += [f"mean classifier confidence [{space}]: {gen.mean_confidence:.3f} (real images: {real.mean_confidence:.3f})",
                  f"classes predicted [{space}]: {gen.classes_predicted} of {quality.classes} (real images: "
                  f"{real.classes_predicted}); class-histogram TV distance {gen.tv_distance:.3f} (real images: "
                  f"{real.tv_distance:.3f})"]
    return lines + [f"real images [{space}]: {quality.real_reference}"]


def run_evaluation_command(args: argparse.Namespace) -> int:
    """`memshard evaluate` / `memshard compare` (parsed by memshard.commands.cli)."""
    if args.command == "compare":
        out = check_writable_target(args.out, "--out") if args.out else None  # before the compare run is logged
        result = compare_runs(args.runs, args.tracking_uri)
        print(result.table.text())
        if out is not None:
            replace_file(out, lambda file: file.write(result.table.markdown().encode()))
            print(f"markdown: {args.out}")
        print(f"compare run id: {result.run_id} (compare.md, compare.json)")
        return 0
    settings = evaluate_settings(args)
    result = evaluate_model(args.model, settings, data=args.data, tracking_uri=args.tracking_uri,
                            experiment=args.experiment, show_progress=not args.no_progress, ray_address=args.ray_address)
    report, m = result.report, result.metrics
    print(f"evaluation run id: {result.run_id} (source run: {result.source_run_id or 'none'})")
    real = report.real_memorization

    def beside(key: str) -> str:  # the same measure for real images no model saw
        return "" if real is None else f"; real held-out images: {100 * m[f'{REAL_PREFIX}.{key}']:.2f}%"

    for t in THRESHOLDS:
        print(f"MQ@{t}: {int(m[f'mq_{t}_count'])} of {report.plan.num_images} ({100 * m[f'mq_{t}_fraction']:.2f}%"
              f"{beside(f'mq_{t}_fraction')})")
    print(f"NN1/NN2 < 1/3: {int(m['nn_ratio_copy_count'])} ({100 * m['nn_ratio_copy_fraction']:.2f}%"
          f"{beside('nn_ratio_copy_fraction')})")
    if real is not None:
        print(f"(real held-out images: {REAL_REFERENCE_WHAT}; {real.num_generations} images)")
    print(f"r-copies: training images some generation with r < {settings.r_copy_threshold} has as its nearest: "
          f"{int(m['r_copied_training_samples'])}")
    if "near_copy_fraction" in m:
        print(f"near copies (nearer to a training image than {1 - NEAR_COPY_QUANTILE:.0%} of real images are to "
              f"their nearest other one, d1^2 < {m['near_copy_sq_distance']:.3f}): {int(m['near_copy_count'])} "
              f"({100 * m['near_copy_fraction']:.2f}%; real images: about {NEAR_COPY_QUANTILE:.0%} by construction), "
              f"{int(m['near_copied_training_samples'])} training images")
    for line in quality_lines(report):
        print(line)
    for line in guard_lines(report):
        print(line)
    print(f"open the MLflow UI: {ui_command(redact_uri(result.tracking_uri))}")
    return 0


def guard_lines(report: EvaluationReport) -> list[str]:
    """With a guard: the same plan's figures unguarded and guarded, side by side, and what the guard did."""
    if report.guarded is None:
        return []
    m, n = report.metrics(), report.plan.num_images
    rows = [("near copies", "near_copy_count", "of generations"),
            ("training images nearly copied", "near_copied_training_samples", "count"),
            *((f"MQ@{t}", f"mq_{t}_count", "of generations") for t in THRESHOLDS),
            ("NN1/NN2 < 1/3", "nn_ratio_copy_count", "of generations"),
            ("r-copied training images", "r_copied_training_samples", "count")]
    if report.quality is not None:
        space = report.quality.space
        rows += [(f"FID [{space}]", f"fid.{space}", "value"),
                 *((f"{name} [{space}]", f"quality.{space}.{key}", "value")
                   for name, key in (("mean classifier confidence", "mean_confidence"), ("coverage", "coverage"))
                   if f"quality.{space}.{key}" in m)]

    def shown(key: str, kind: str) -> str:
        if key not in m:  # near copies with too few distinct images to calibrate them
            return "-"
        value = m[key]
        return {"of generations": f"{int(value)} ({100 * value / n:.2f}%)", "count": f"{int(value)}",
                "value": f"{value:.3f}"}[kind]

    table = [("measure", "unguarded", "guarded"),
             *((name, shown(key, kind), shown(f"{GUARDED_PREFIX}.{key}", kind)) for name, key, kind in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines = [f"guard {report.guarded.generation.log.mode}, {n} generations each:"]
    lines += ["  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))) for row in table]
    log, seconds = report.guarded.generation.log, report.guarded.generation.seconds
    did = (f"steered {log.steered} generations ({100 * log.steered / n:.1f}%)" if log.mode == "guidance" else
           f"redrew {log.redrawn} generations ({log.rejected_draws} draws rejected, {log.extra_images} extra images)")
    lines.append(f"the guard {did}; {log.unresolved} near copies left; worker time {seconds['guarded_batches']:.1f} s "
                 f"guarded after {seconds['plain_batches']:.1f} s unguarded")
    return lines
