"""`memshard evaluate` and `memshard compare`: how often a model copies its training images, its FID.

evaluate: MODEL (an MLflow model URI or a local pipeline directory) -> its training run and data ->
M seeded generations -> k-nearest training images of each (`evaluation.nearest_neighbors`) ->
memorization metrics and FID -> one MLflow run in the training run's experiment, tagged
`memshard.source_run_id`, with the metrics, the r histogram, the most-copied images beside their
closest generations, `report.json` and `copies_per_sample.parquet`. Everything is computed before
the run is opened, so a failure leaves no half-logged run.

compare: evaluation runs (or training runs, through their latest evaluation) side by side.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import yaml
from diffusers import DDIMScheduler
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from memshard.evaluation.fid import fid, feature_space
from memshard.evaluation.figures import most_copied, r_histogram
from memshard.evaluation.memorization import (
    DEFAULT_COPY_THRESHOLD,
    NN_RATIO_THRESHOLD,
    R_NEIGHBORS,
    THRESHOLDS,
    MemorizationReport,
    memorization_report,
)
from memshard.evaluation.nearest_neighbors import nearest_neighbors
from memshard.model import resolve_device
from memshard.config import DataConfig, MLflowConfig
from memshard.data import ImageDataset, is_prepared_dataset, load_dataset, resolve_dataset
from memshard.errors import MemshardError
from memshard.pipeline import find_pipeline_dir, generate_images, image_grid, load_pipeline
from memshard.orchestrator.tracking import connect_mlflow, log_table, resolve_tracking_uri, with_retries

SAMPLERS = ("ddpm", "ddim")
DDIM_DEFAULT_STEPS = 100
KIND_TAG, SOURCE_TAG = "memshard.kind", "memshard.source_run_id"
PUBLISHED_NUM_IMAGES = 65_536
SAMPLE_GRID_IMAGES = 64
COPY_DEFINITION = ("a generation copies its nearest training image when r < copy_threshold, with "
                   "r = d1^2 / mean(d1^2..dk^2) over its k nearest training images (squared L2, pixels in [0, 1])")


@dataclass(frozen=True)
class EvaluateSettings:
    num_images: int = PUBLISHED_NUM_IMAGES  # published protocol; on a CPU use a few hundred to thousands
    sampler: str = "ddpm"
    sampling_steps: int | None = None  # None: the training timesteps for ddpm (published), 100 for ddim
    batch_size: int = 256
    seed: int = 0
    feature_space: str | None = "inception-v3"  # None: no FID
    inception_weights: str | None = None
    copy_threshold: float = DEFAULT_COPY_THRESHOLD
    device: str = "auto"


@dataclass(frozen=True)
class ResolvedModel:
    pipeline_dir: Path
    source_run: Run | None


@dataclass(frozen=True)
class EvaluationResult:
    run_id: str
    source_run_id: str | None
    tracking_uri: str
    metrics: dict[str, float]
    report: dict = field(repr=False)


def evaluate(model: str, settings: EvaluateSettings = EvaluateSettings(), data: str | None = None,
             tracking_uri: str | None = None, experiment: str = MLflowConfig.experiment,
             show_progress: bool = True) -> EvaluationResult:
    """Evaluate `model` and log one MLflow run; see the module notes."""
    _check_settings(settings)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    device = resolve_device(settings.device)
    # Fail fast, before minutes of sampling: the feature space (weights, library) and the data.
    space = feature_space(settings.feature_space, device, settings.inception_weights) if settings.feature_space else None
    with tempfile.TemporaryDirectory(prefix="memshard-eval-") as tmp:
        resolved = resolve_model(model, client, Path(tmp))
        pipeline = load_pipeline(resolved.pipeline_dir, device=str(device))
        resolution, channels = int(pipeline.unet.config.sample_size), int(pipeline.unet.config.in_channels)
        dataset, matches = training_data(resolved.source_run, data, resolution, channels, model)
        if resolved.source_run is not None:
            experiment = client.get_experiment(resolved.source_run.info.experiment_id).name
        experiment_id = connect_mlflow(tracking_uri, experiment)
        steps = _sampling_steps(settings, pipeline)
        if settings.sampler == "ddim":
            pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)

        seconds = {}
        start = time.perf_counter()
        generated = _generate(pipeline, settings, steps, show_progress)  # (M, C, H, W) uint8
        seconds["generate"] = time.perf_counter() - start

        start = time.perf_counter()
        k = min(R_NEIGHBORS, len(dataset))
        neighbors = nearest_neighbors(generated, dataset.images, k, scale=1 / 255, device=device)
        report = memorization_report(neighbors.sq_distances, neighbors.indices, len(dataset), settings.copy_threshold)
        seconds["nearest_neighbors"] = time.perf_counter() - start

        metrics = report.metrics()
        fid_value = None
        if space is not None:
            start = time.perf_counter()
            fid_value = fid(generated, dataset.images, space)
            metrics[f"fid.{space.name}"] = fid_value
            seconds["fid"] = time.perf_counter() - start

    source = resolved.source_run
    label = (source.info.run_name or source.info.run_id) if source else Path(model).name
    summary = _report(model, source, dataset, matches, settings, steps, str(device), report, metrics,
                      fid_value, space.name if space else None, seconds)
    params = {"model": model, "sampler": settings.sampler, "sampling_steps": steps,
              "num_images": settings.num_images, "batch_size": settings.batch_size, "seed": settings.seed,
              "feature_space": space.name if space else "none", "copy_threshold": settings.copy_threshold,
              "r_neighbors": report.k, "device": str(device), "dataset.path": dataset.path,
              "dataset.fingerprint": dataset.fingerprint, "dataset.count": len(dataset),
              "dataset.matches_training_run": "unknown" if matches is None else str(matches).lower()}
    tags = {KIND_TAG: "evaluation", "memshard.model_uri": model, "memshard.version": version("memshard")}
    if source is not None:
        tags[SOURCE_TAG] = source.info.run_id
        tags["memshard.source_method"] = source.data.params.get("method", "")
    title = f"{label}: {settings.num_images} generations, {settings.sampler} {steps} steps, seed {settings.seed}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"evaluate {label}", tags=tags) as run:
        with_retries(mlflow.log_params, params)
        with_retries(mlflow.log_metrics, metrics)
        with_retries(mlflow.log_dict, summary, "report.json")
        with_retries(log_table, _copies_table(report, dataset), "copies_per_sample.parquet")
        _log_png(r_histogram(report, title), "r_histogram.png")
        _log_png(most_copied(report, dataset.images, dataset.sample_ids, generated, title), "most_copied.png")
        with_retries(mlflow.log_image, image_grid(generated[:SAMPLE_GRID_IMAGES].transpose(0, 2, 3, 1)),
                     "samples.png")
    return EvaluationResult(run.info.run_id, source.info.run_id if source else None, tracking_uri, metrics, summary)


def _check_settings(s: EvaluateSettings) -> None:
    if s.num_images < 2 or s.batch_size < 1:
        raise MemshardError(f"--num-images {s.num_images} / --batch {s.batch_size}: need at least 2 images "
                            "(FID and r need two) and a batch of at least 1")
    if s.sampler not in SAMPLERS:
        raise MemshardError(f"unknown sampler {s.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if not 0.0 < s.copy_threshold <= 1.0:
        raise MemshardError(f"--copy-threshold {s.copy_threshold} must be in (0, 1] (r lies in [0, 1]; default 0.5)")


def _sampling_steps(settings: EvaluateSettings, pipeline) -> int:
    timesteps = int(pipeline.scheduler.config.num_train_timesteps)
    steps = settings.sampling_steps or (timesteps if settings.sampler == "ddpm" else min(DDIM_DEFAULT_STEPS, timesteps))
    if not 1 <= steps <= timesteps:
        raise MemshardError(f"--sampling-steps {steps}: the model was trained with {timesteps} timesteps, "
                            f"choose 1 to {timesteps}")
    return steps


# ------------------------------------------------------------------ which model, which run, which data


def resolve_model(model: str, client: MlflowClient, tmp: Path) -> ResolvedModel:
    """A local pipeline directory or an MLflow model URI -> the pipeline directory and its training run."""
    local = Path(model)
    if local.exists():
        pipeline_dir = find_pipeline_dir(local, model)
        return ResolvedModel(pipeline_dir, _local_source_run(local, pipeline_dir, client))
    if "://" not in model and not model.startswith(("models:/", "runs:/")):
        raise MemshardError(f"model {model!r} is neither an existing pipeline directory nor an MLflow model URI: "
                            "give models:/NAME/VERSION, runs:/RUN_ID/model or a directory")
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=model, dst_path=str(tmp / "model"), tracking_uri=client.tracking_uri))
    except Exception as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise MemshardError(f"model {model} could not be fetched from {client.tracking_uri} ({reason}): "
                            "check the URI (memshard train prints it) and --tracking-uri") from None
    pipeline_dir = find_pipeline_dir(downloaded, model)
    run_id = _mlmodel_run_id(downloaded) or _registry_run_id(model, client)
    return ResolvedModel(pipeline_dir, _get_run(client, run_id) if run_id else None)


def _mlmodel_run_id(root: Path) -> str | None:
    """The run an MLflow model was logged in, from its MLmodel file."""
    candidates = [root / "MLmodel"] if (root / "MLmodel").is_file() else sorted(root.rglob("MLmodel"))
    for file in candidates[:1]:
        meta = yaml.safe_load(file.read_text()) or {}
        if meta.get("run_id"):
            return str(meta["run_id"])
    return None


def _registry_run_id(model: str, client: MlflowClient) -> str | None:
    if model.startswith("runs:/"):
        return model[len("runs:/"):].split("/", 1)[0]
    if model.startswith("models:/"):
        name, _, ref = model[len("models:/"):].partition("/")
        if ref.isdigit():
            return client.get_model_version(name, ref).run_id
    return None


def _local_source_run(given: Path, pipeline_dir: Path, client: MlflowClient) -> Run | None:
    """A downloaded MLflow model names its run (MLmodel); a training checkpoint dir is named after it."""
    run_id = _mlmodel_run_id(given) if given.is_dir() else None
    if run_id is None and pipeline_dir.name == "pipeline":  # .memshard/checkpoints/RUN_ID/pipeline
        run_id = pipeline_dir.parent.name
    if run_id is None:
        return None
    try:
        return client.get_run(run_id)
    except Exception:  # not a run of this store: evaluate without lineage (--data is then required)
        return None


def _get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except Exception:
        raise MemshardError(f"run {run_id} is not in the tracking store {client.tracking_uri}: "
                            "check --tracking-uri (or MLFLOW_TRACKING_URI)") from None


def training_data(source: Run | None, data: str | None, resolution: int, channels: int,
                  model: str) -> tuple[ImageDataset, bool | None]:
    """The dataset to scan, and whether it is the one the training run recorded (None: no run)."""
    recorded = source.data.params if source is not None else {}
    if data is None:
        if source is None:
            raise MemshardError(f"{model} has no MLflow training run to read its training data from: pass --data")
        path = recorded.get("dataset.path")
        if not path or not is_prepared_dataset(path):
            raise MemshardError(f"run {source.info.run_id} was trained on {path}, which is no longer there: "
                                "pass --data with the same images")
        dataset = load_dataset(path)
        if dataset.fingerprint != recorded.get("dataset.fingerprint"):
            raise MemshardError(f"the dataset at {path} changed since run {source.info.run_id} trained on it "
                                "(fingerprint differs): pass --data to evaluate against it anyway")
    else:
        dataset = load_dataset(resolve_dataset(data, resolution, channels, DataConfig.cache_dir))
    if dataset.images.shape[1:] != (channels, resolution, resolution):
        raise MemshardError(f"{dataset.path} holds {dataset.images.shape[1:]} images but the model makes "
                            f"{(channels, resolution, resolution)}: pass the data it was trained on")
    matches = None if source is None else dataset.fingerprint == recorded.get("dataset.fingerprint")
    return dataset, matches


# ------------------------------------------------------------------ generation and reporting


def _generate(pipeline, settings: EvaluateSettings, steps: int, show_progress: bool) -> np.ndarray:
    """M images as (M, C, H, W) uint8. Batch b is seeded from SeedSequence(seed) child b, so the images
    depend on (seed, batch size) only, and batches could be spread over devices without changing them."""
    seeds = np.random.SeedSequence(settings.seed).generate_state(-(-settings.num_images // settings.batch_size), np.uint64)
    batches = []
    bar = tqdm(total=settings.num_images, desc="generating", unit="img", disable=not show_progress, file=sys.stderr)
    for b, start in enumerate(range(0, settings.num_images, settings.batch_size)):
        count = min(settings.batch_size, settings.num_images - start)
        batch = generate_images(pipeline, count, seed=int(seeds[b] >> np.uint64(1)), num_inference_steps=steps,
                                batch_size=count)
        batches.append(batch.transpose(0, 3, 1, 2))
        bar.update(count)
    bar.close()
    return np.ascontiguousarray(np.concatenate(batches))


def _report(model, source, dataset, matches, settings, steps, device, report: MemorizationReport, metrics,
            fid_value, space_name, seconds) -> dict:
    counts, edges = report.histogram()
    top = report.most_copied(20)
    return {
        "model": model,
        "source_run_id": source.info.run_id if source else None,
        "source_method": source.data.params.get("method") if source else None,
        "dataset": {"path": dataset.path, "fingerprint": dataset.fingerprint, "count": len(dataset),
                    "matches_training_run": matches},
        "generation": {"num_images": settings.num_images, "sampler": settings.sampler, "sampling_steps": steps,
                       "batch_size": settings.batch_size, "seed": settings.seed, "device": device,
                       "precision": "bf16 autocast" if device.startswith("cuda") else "float32"},
        "definitions": {
            "distance": "squared L2 between images with pixels in [0, 1]",
            "r": f"d1^2 / mean(d1^2..d{report.k}^2) over the {report.k} nearest training images",
            "mq": f"count of generations with r < t, t in {list(THRESHOLDS)}",
            "nn_ratio_copy": f"d1 / d2 < {NN_RATIO_THRESHOLD:.4f} (d = L2 distance)",
            "copy": COPY_DEFINITION.replace("copy_threshold", str(settings.copy_threshold)),
        },
        "metrics": metrics,
        "fid": {"value": fid_value, "feature_space": space_name,
                "against": f"all {len(dataset)} training images"} if space_name else None,
        "r_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "most_copied": [{"sample_id": str(dataset.sample_ids[row]), "copies": int(report.copies[row]),
                         "min_r": float(report.min_r[row]),
                         "closest_generations": report.closest_generations(row, 6)} for row in top],
        "seconds": seconds,
    }


def _copies_table(report: MemorizationReport, dataset: ImageDataset) -> pa.Table:
    min_r = np.where(np.isfinite(report.min_r), report.min_r, np.nan)
    return pa.table({
        "sample_id": pa.array(dataset.sample_ids.astype(str)),
        "copies": pa.array(report.copies.astype(np.int64)),
        "min_r": pa.array(min_r, mask=~np.isfinite(report.min_r)),  # null: no generation's nearest image
    })


def _log_png(png: bytes, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(png)
        with_retries(mlflow.log_artifact, str(path))


# ------------------------------------------------------------------ compare


@dataclass(frozen=True)
class CompareResult:
    run_id: str
    rows: list[dict]
    text: str  # the terminal table
    markdown: str


def compare(run_ids: list[str], tracking_uri: str | None = None) -> CompareResult:
    """Evaluation runs side by side (a training run stands for its latest FINISHED evaluation); the
    table is printed by the CLI and logged as compare.md / compare.json in a new `compare` run."""
    if not run_ids:
        raise MemshardError("compare needs at least one run id: give evaluation or training runs")
    tracking_uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    evaluations = [_evaluation_run(client, run_id) for run_id in run_ids]
    rows = [_compare_row(client, run) for run in evaluations]
    spaces = sorted({row["feature_space"] for row in rows if row["feature_space"] != "none"})
    columns = ["method", "train run", "train steps", "eval run", "M", "sampler", "seed",
               *[f"MQ@{t}" for t in THRESHOLDS], "NN1/NN2<1/3", "copied train imgs", *[f"FID [{s}]" for s in spaces]]
    cells = [[_cell(row, column) for column in columns] for row in rows]
    notes = _comparability_notes(rows)
    text = _terminal_table(columns, cells, notes)
    markdown = _markdown_table(columns, cells, notes)
    experiment = client.get_experiment(evaluations[0].info.experiment_id).name
    experiment_id = connect_mlflow(tracking_uri, experiment)
    tags = {KIND_TAG: "compare", "memshard.compared_runs": ",".join(r.info.run_id for r in evaluations)}
    with mlflow.start_run(experiment_id=experiment_id, run_name="compare", tags=tags) as run:
        with_retries(mlflow.log_text, markdown, "compare.md")
        with_retries(mlflow.log_dict, {"rows": rows, "notes": notes}, "compare.json")
    return CompareResult(run.info.run_id, rows, text, markdown)


def _evaluation_run(client: MlflowClient, run_id: str) -> Run:
    run = _get_run(client, run_id)
    if run.data.tags.get(KIND_TAG) == "evaluation":
        return run
    found = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`{SOURCE_TAG}` = '{run_id}' and tags.`{KIND_TAG}` = 'evaluation' "
                      "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise MemshardError(f"run {run_id} is neither an evaluation run nor a training run with one: "
                            f"run `memshard evaluate runs:/{run_id}/model` first")
    return found[0]


def _compare_row(client: MlflowClient, run: Run) -> dict:
    params, metrics = run.data.params, run.data.metrics
    source_id = run.data.tags.get(SOURCE_TAG)
    train_params = _get_run(client, source_id).data.params if source_id else {}
    steps = [train_params.get(f"iet.{key}") for key in ("shards", "rounds", "local_steps")]
    space = params.get("feature_space", "none")
    return {
        "eval_run_id": run.info.run_id,
        "source_run_id": source_id,
        "method": train_params.get("method", run.data.tags.get("memshard.source_method", "?")),
        # optimizer steps over all proxies: K x rounds x local steps (ddpm: 1 x rounds x K*S)
        "train_steps": int(np.prod([int(s) for s in steps])) if all(steps) else None,
        "num_images": int(params["num_images"]),
        "sampler": f"{params['sampler']} {params['sampling_steps']}",
        "seed": int(params["seed"]),
        "copy_threshold": float(params["copy_threshold"]),
        "dataset_fingerprint": params.get("dataset.fingerprint"),
        "feature_space": space,
        "fid": metrics.get(f"fid.{space}"),
        "metrics": {key: value for key, value in metrics.items() if not key.startswith("fid.")},
    }


def _cell(row: dict, column: str) -> str:
    m = row["metrics"]
    if column.startswith("MQ@"):
        t = column[3:]
        return f"{int(m[f'mq_{t}_count'])} ({100 * m[f'mq_{t}_fraction']:.2f}%)"
    if column.startswith("FID ["):
        return f"{row['fid']:.2f}" if column == f"FID [{row['feature_space']}]" and row["fid"] is not None else "-"
    return {
        "method": row["method"],
        "train run": (row["source_run_id"] or "-")[:8],
        "train steps": "-" if row["train_steps"] is None else f"{row['train_steps']:,}",
        "eval run": row["eval_run_id"][:8],
        "M": f"{row['num_images']:,}",
        "sampler": row["sampler"],
        "seed": str(row["seed"]),
        "NN1/NN2<1/3": f"{int(m['nn_ratio_copy_count'])} ({100 * m['nn_ratio_copy_fraction']:.2f}%)",
        "copied train imgs": str(int(m["copied_training_samples"])),
    }[column]


def _comparability_notes(rows: list[dict]) -> list[str]:
    notes = [f"MQ@t: generations with r < t, r = d1^2 / mean(d1^2..d50^2) to the training set, pixels in [0, 1]; "
             f"NN1/NN2<1/3: nearest / second-nearest distance ratio; copied train imgs: training images "
             f"that some generation with r < {rows[0]['copy_threshold']} has as its nearest."]
    for key, what in (("num_images", "number of generations"), ("sampler", "sampler/steps"), ("seed", "seed"),
                      ("dataset_fingerprint", "training data"), ("train_steps", "training compute"),
                      ("copy_threshold", "copy threshold")):
        if len({str(row[key]) for row in rows}) > 1:
            notes.append(f"not like for like: the {what} differs between these runs")
    if len({row["feature_space"] for row in rows}) > 1:
        notes.append("FIDs in different feature spaces are in separate columns: they are not comparable")
    return notes


def _terminal_table(columns: list[str], cells: list[list[str]], notes: list[str]) -> str:
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells), "", *notes])


def _markdown_table(columns: list[str], cells: list[list[str]], notes: list[str]) -> str:
    rows = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    rows += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(["# memshard compare", "", *rows, "", *[f"- {note}" for note in notes], ""])


# ------------------------------------------------------------------ command line


def run_evaluation_command(args) -> int:
    """`memshard evaluate` / `memshard compare` (parsed by memshard.cli)."""
    from memshard.orchestrator.tracking import ui_command

    if args.command == "compare":
        result = compare(args.runs, args.tracking_uri)
        print(result.text)
        if args.out:
            Path(args.out).write_text(result.markdown)
            print(f"markdown: {args.out}")
        print(f"compare run id: {result.run_id} (compare.md, compare.json)")
        return 0
    space = None if args.feature_space == "none" else args.feature_space
    settings = EvaluateSettings(num_images=args.num_images, sampler=args.sampler, sampling_steps=args.sampling_steps,
                                batch_size=args.batch, seed=args.seed, feature_space=space,
                                inception_weights=args.inception_weights, copy_threshold=args.copy_threshold,
                                device=args.device)
    result = evaluate(args.model, settings, data=args.data, tracking_uri=args.tracking_uri,
                      experiment=args.experiment, show_progress=not args.no_progress)
    m = result.metrics
    print(f"evaluation run id: {result.run_id} (source run: {result.source_run_id or 'none'})")
    for t in THRESHOLDS:
        print(f"MQ@{t}: {int(m[f'mq_{t}_count'])} of {settings.num_images} ({100 * m[f'mq_{t}_fraction']:.2f}%)")
    print(f"NN1/NN2 < 1/3: {int(m['nn_ratio_copy_count'])} ({100 * m['nn_ratio_copy_fraction']:.2f}%)")
    print(f"training images copied (r < {settings.copy_threshold}): {int(m['copied_training_samples'])}")
    for key, value in m.items():
        if key.startswith("fid."):
            print(f"FID [{key[4:]}]: {value:.3f}")
    print(f"open the MLflow UI: {ui_command(result.tracking_uri)}")
    return 0
