"""`memshard train`: data → shards → Ray actors → rounds → DDPMPipeline in MLflow, registered.

The driver alone talks to MLflow; actors only return numbers. A failure anywhere inside the run
leaves it FAILED (mlflow.start_run's context does that) and registers nothing.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from orchestrator.checkpoint import save_checkpoint
from orchestrator.cluster import connect_ray, place_shard_actors, release
from orchestrator.config import Config, flatten, to_dict
from orchestrator.data import ImageDataset, load_dataset, resolve_dataset
from orchestrator.errors import MemshardError
from orchestrator.pipeline_model import build_pipeline, generate_images, image_grid, log_pipeline_model, save_pipeline
from orchestrator.rounds import IETDriver, RoundReport
from orchestrator.sharding import split_into_shards
from orchestrator.tracking import connect_mlflow, log_table, resolve_tracking_uri
from shard_worker.actor import ShardWorker

log = logging.getLogger("memshard.train")


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    tracking_uri: str
    model_uri: str
    registered_name: str
    registered_version: str
    local_pipeline: Path


def train(cfg: Config, show_progress: bool = True) -> TrainResult:
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    experiment_id = connect_mlflow(tracking_uri, cfg.mlflow.experiment)
    dataset = load_dataset(resolve_dataset(cfg.data.path, cfg.data.resolution, cfg.data.channels, cfg.data.cache_dir))
    shards = initial_shards(cfg, dataset)
    started_ray = connect_ray(cfg.ray.address)
    try:
        with mlflow.start_run(experiment_id=experiment_id) as run:
            return _train_in_run(cfg, dataset, shards, run.info.run_id, tracking_uri, show_progress)
    finally:
        if started_ray:
            ray.shutdown()


def initial_shards(cfg: Config, dataset: ImageDataset) -> list[np.ndarray]:
    labels = None
    if cfg.data.balanced_by_label:
        if np.all(dataset.labels < 0):
            raise MemshardError(f"data.balanced_by_label is set but {dataset.path} has no labels: drop the setting")
        labels = dataset.labels
    return split_into_shards(len(dataset), cfg.iet.shards, cfg.training.seed, labels)


def _train_in_run(cfg: Config, dataset: ImageDataset, shards: list[np.ndarray], run_id: str,
                  tracking_uri: str, show_progress: bool) -> TrainResult:
    num_shards = cfg.iet.shards
    mlflow.log_params({
        **flatten(cfg),
        "dataset.path": dataset.path,
        "dataset.fingerprint": dataset.fingerprint,
        "dataset.count": len(dataset),
        "shards": num_shards,
        "method": cfg.iet.method,
    })
    mlflow.log_dict(to_dict(cfg), "config.json")  # lineage: evaluate/unlearn/retrain read it back
    mlflow.set_tags({"memshard.version": version("memshard"), "ray.address": ray.get_runtime_context().gcs_address})

    # The dataset goes into the object store once; every actor reads it by reference.
    images_ref, ids_ref = ray.put(dataset.images), ray.put(dataset.sample_ids)
    actors, group = [], None
    try:
        actors, group, resources = place_shard_actors(
            cfg, num_shards, ShardWorker,
            lambda k, resources: (cfg, images_ref, ids_ref, k, max(1, int(resources.cpus))),
        )
        placement = ray.get([actor.describe.remote() for actor in actors])
        mlflow.set_tags({
            "devices": ",".join(sorted({p["device"] for p in placement})),
            "nodes": len({p["node_id"] for p in placement}),
            "actor.resources": str(resources.bundle()),
        })
        weights, ema_weights = ray.get(actors[0].get_weights.remote())  # all proxies start equal
        driver = IETDriver(cfg, actors, shards, len(dataset), weights, ema_weights)
        history = [_assignment_rows(dataset, driver.shards, 0)]
        rounds = tqdm(range(1, cfg.iet.rounds + 1), desc="rounds", disable=not show_progress, file=sys.stderr)
        for round_index in rounds:
            report = driver.run_round(round_index, is_last=round_index == cfg.iet.rounds)
            history.append(_assignment_rows(dataset, driver.shards, round_index))
            _log_round(report, num_shards)
            rounds.set_postfix_str(" ".join(f"s{r.shard}:{r.images_per_second:.0f}img/s" for r in report.results))
            tqdm.write(_round_line(report, cfg.iet.rounds), file=sys.stderr)
            if cfg.mlflow.sample_grid_every and round_index % cfg.mlflow.sample_grid_every == 0:
                _log_sample_grid(cfg, dataset, driver.weights, round_index)
            if round_index % cfg.mlflow.checkpoint_every == 0 or round_index == cfg.iet.rounds:
                save_checkpoint(Path(cfg.mlflow.checkpoint_dir) / run_id, driver.state())
        rounds.close()

        # The final model is written locally first, then logged and registered.
        pipeline = build_pipeline(cfg, dataset.channels, driver.weights)
        local_pipeline = save_pipeline(pipeline, Path(cfg.mlflow.checkpoint_dir) / run_id / "pipeline")
        log_table(pa.concat_tables(history), "shard_assignments.parquet")
        log_table(_memorization_scores(dataset, driver), "memorization_scores.parquet")
        info = log_pipeline_model(local_pipeline, cfg.mlflow.register_as)
        return TrainResult(run_id, tracking_uri, info.model_uri, cfg.mlflow.register_as,
                           str(info.registered_model_version), local_pipeline)
    finally:
        release(actors, group)


def _log_round(report: RoundReport, num_shards: int) -> None:
    step = report.round_index
    metrics = {
        "loss": report.mean_loss,
        "agc_kept_fraction": report.kept_fraction,
        "samples_moved": report.samples_moved,
        "images_per_second": report.images_per_second,
        **{f"time_{phase}_s": seconds for phase, seconds in report.seconds.items()},
    }
    for result in report.results:
        metrics[f"shard_{result.shard}_loss"] = result.mean_loss_all
        metrics[f"shard_{result.shard}_images_per_second"] = result.images_per_second
        metrics[f"shard_{result.shard}_size"] = len(result.indices)
    mlflow.log_metrics(metrics, step=step)
    if report.moves is not None:
        mlflow.log_dict(
            {"round": step, "from_rows_to_columns": report.moves.matrix(num_shards).tolist()},
            f"moves/round_{step:04d}.json",
        )


def _round_line(report: RoundReport, total_rounds: int) -> str:
    phases = " ".join(f"{phase} {seconds:.2f}s" for phase, seconds in report.seconds.items())
    return (f"round {report.round_index}/{total_rounds}: loss {report.mean_loss:.4f}, kept {report.kept_fraction:.3f}, "
            f"moved {report.samples_moved}, {report.images_per_second:.0f} img/s ({phases})")


def _log_sample_grid(cfg: Config, dataset: ImageDataset, weights: dict, round_index: int) -> None:
    pipeline = build_pipeline(cfg, dataset.channels, weights)
    images = generate_images(pipeline, cfg.mlflow.sample_grid_images, seed=cfg.training.seed,
                             num_inference_steps=cfg.mlflow.sample_grid_steps)
    mlflow.log_image(image_grid(images), key="samples", step=round_index)


def _assignment_rows(dataset: ImageDataset, shards: list[np.ndarray], round_index: int) -> pa.Table:
    indices = np.concatenate(shards)
    owners = np.concatenate([np.full(len(s), k, dtype=np.int32) for k, s in enumerate(shards)])
    return pa.table({
        "sample_id": pa.array(dataset.sample_ids[indices].astype(str)),
        "round": pa.array(np.full(len(indices), round_index, dtype=np.int32)),
        "shard": pa.array(owners),
    })


def _memorization_scores(dataset: ImageDataset, driver: IETDriver) -> pa.Table:
    owner = np.empty(len(dataset), dtype=np.int32)
    for k, shard in enumerate(driver.shards):
        owner[shard] = k
    return pa.table({
        "sample_id": pa.array(dataset.sample_ids.astype(str)),
        "agc_skips": pa.array(driver.skips_total),
        "last_loss": pa.array(driver.last_loss),
        "final_shard": pa.array(owner),
    })
