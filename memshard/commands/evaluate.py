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

from memshard.config import DataConfig, MLflowConfig, redact_uri
from memshard.data import ImageDataset, load_dataset, resolve_dataset
from memshard.errors import MemshardError
from memshard.evaluation.compare import CompareRow, CompareTable, compare_row, compare_table
from memshard.evaluation.evaluate import (
    COPIES_TABLE,
    REAL_PREFIX,
    REAL_REFERENCE_WHAT,
    EvaluateSettings,
    EvaluationReport,
    Generation,
    check_image_shape,
    choose_quality_space,
    evaluate,
    sampling_plan,
)
from memshard.evaluation.figures import most_r_copied, r_histogram
from memshard.evaluation.memorization import NEAR_COPY_QUANTILE, THRESHOLDS
from memshard.files import check_writable_target, replace_file
from memshard.orchestrator.cluster import ray_session
from memshard.orchestrator.generation import cluster_has_gpu, generate_on_ray, plan_workers
from memshard.orchestrator.registry import (
    KIND_TAG,
    SOURCE_RUN_TAG,
    ResolvedModel,
    get_run,
    latest_evaluation,
    load_model_pipeline,
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
    pipeline = load_model_pipeline(resolved, client, "cpu")  # shipped to the generation workers
    dataset, matches = _training_data(resolved, data, image_shape(pipeline))
    check_image_shape(dataset, pipeline)
    source = resolved.source_run
    if source is not None:
        experiment = client.get_experiment(source.info.experiment_id).name
    experiment_id = connect_mlflow(tracking_uri, experiment)
    device = "cuda" if settings.device != "cpu" and torch.cuda.is_available() else "cpu"  # this process's
    space = choose_quality_space(settings, dataset, device)
    say(f"quality: {space.reason}")
    with ray_session(ray_address):
        choice = sampling_plan(settings, int(pipeline.scheduler.config.num_train_timesteps),
                               cluster_has_gpu(settings.device))
        say(choice.note)
        workers = plan_workers(settings.workers, settings.device, len(choice.plan.batches()))
        say(f"generating on {workers.describe()}")

        def generate(plan: SamplingPlan) -> Generation:
            made = generate_on_ray(pipeline, plan, workers, batch_timeout_s=settings.batch_timeout_s,
                                   show_progress=show_progress)
            return Generation(made.images, made.workers.device, made.details())

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
                            device=args.device, workers=args.workers, **patience)


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
    print(f"open the MLflow UI: {ui_command(redact_uri(result.tracking_uri))}")
    return 0
