"""Unlearning a trained model: its lineage, the forget set's evaluation source, an approximate method
on a Ray task, a retrain on X \\ A, and the audit of the result against the retrain when one exists.

The model's training run supplies the lineage: params `dataset.path` / `dataset.fingerprint` and the
artifact `config.json` (`orchestrator.registry`). Approximate methods (`unlearning.methods`) run as
one Ray task, on a GPU where the cluster has one; `retrain` reruns `orchestrator.train` on the kept
data with the source run's configuration (the exact gold standard). MLflow runs, artifacts and the
registered version are the command's (`memshard.commands.unlearn`), and so are the MLflow reads: the
evaluation run a forget set comes from, and the earlier retrain an audit compares with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from diffusers import DDPMPipeline

from memshard.config import Config, GuardConfig, from_dict, to_dict, with_default_places
from memshard.data import DATASET_FILE, ImageDataset, fingerprint_of
from memshard.errors import MemshardError
from memshard.evaluation.fid import GAUSSIAN_FIT_MIN_ROWS, FeatureSpace
from memshard.evaluation.quality import default_quality_space
from memshard.files import in_workspace
from memshard.model import state_to_numpy
from memshard.orchestrator.cluster import ray_session
from memshard.orchestrator.registry import ResolvedModel, recorded_dataset
from memshard.orchestrator.train import MIN_TRAINING_IMAGES, RunHooks, TrainResult, min_training_images, train
from memshard.unlearning.audit import (
    AuditReport,
    AuditSettings,
    RetrainReference,
    TrainingCompute,
    UnlearnCompute,
    measure,
)
from memshard.unlearning.forget_set import ForgetSet
from memshard.unlearning.methods import METHODS as APPROXIMATE_METHODS
from memshard.unlearning.methods import UnlearnSettings, UnlearnStats, unlearn

ALL_METHODS = (*APPROXIMATE_METHODS, "retrain")
METHOD_TAG, FORGET_HASH_TAG, STEPS_TAG = "memshard.unlearn_method", "memshard.forget_hash", "memshard.unlearn_steps"


@dataclass(frozen=True)
class UnlearnSource:
    """A model with the lineage unlearning needs: its training run, configuration and training data."""

    model: ResolvedModel
    run_id: str
    registered_name: str  # the new version goes here
    config: Config
    dataset: ImageDataset


@dataclass(frozen=True)
class UnlearnedWeights:
    weights: dict[str, np.ndarray]
    stats: UnlearnStats
    device: str


@dataclass(frozen=True)
class RetrainedModel:
    """An earlier registered retrain of the same source without the same forget set (found by the command)."""

    run_id: str
    model_uri: str
    steps: int
    seconds: float | None
    pipeline: DDPMPipeline


@dataclass(frozen=True)
class Retrained:
    result: TrainResult
    steps: int  # optimizer steps over all proxies
    seconds: float


def check_method(method: str) -> None:
    if method not in ALL_METHODS:
        raise MemshardError(f"unknown unlearning method {method!r}: choose one of {', '.join(ALL_METHODS)}")


def check_keep_set(source: UnlearnSource, forget: ForgetSet, method: str, audit: AuditSettings) -> None:
    """Before any work: the images left after forgetting (X \\ A) must be enough for the audit and, for
    `retrain`, for a training run; a one-line error naming both counts and the fix."""
    kept, total = len(forget.keep_rows), len(forget.keep_rows) + len(forget.rows)
    fits = "its pixel Fréchet reference and its quality measure's real reference (half the kept images)" \
        if audit.quality else "its pixel Fréchet reference"
    needs = [(audit.min_kept_images(), f"the audit needs at least {audit.min_kept_images()} (a Gaussian fit of "
              f"{GAUSSIAN_FIT_MIN_ROWS} images or more for {fits})")]
    if method == "retrain":
        cfg = source.config
        needs.append((min_training_images(cfg), f"retraining needs at least {min_training_images(cfg)} "
                      f"({MIN_TRAINING_IMAGES} to train, and one per shard: iet.shards = {cfg.iet.shards})"))
    short = [why for need, why in needs if kept < need]
    if short:
        lighter = f" (--set audit.quality=false lowers the audit's need to {GAUSSIAN_FIT_MIN_ROWS})" if audit.quality else ""
        raise MemshardError(f"forgetting {len(forget.rows)} of the {total} training images would keep {kept}, but "
                            f"{'; '.join(short)}: forget fewer images, or unlearn a model trained on more{lighter}")


def unlearn_source(resolved: ResolvedModel) -> UnlearnSource:
    """The resolved model's lineage, or a one-line error when it was not trained by memshard train."""
    run = resolved.source_run
    if run is None:
        raise MemshardError(f"model {resolved.given} has no training run in this tracking store: unlearning needs "
                            "a model trained by memshard train (and its store: --set mlflow.tracking_uri=...)")
    params = run.data.params
    if "dataset.path" not in params or "dataset.fingerprint" not in params:
        raise MemshardError(f"model {resolved.given} has no training lineage (its run {run.info.run_id} logged no "
                            "dataset.path / dataset.fingerprint): unlearning needs a model trained by memshard train")
    if resolved.config is None:
        raise MemshardError(f"model {resolved.given} has no training lineage (its run {run.info.run_id} has no "
                            "config.json): unlearning needs a model trained by memshard train")
    dataset = recorded_dataset(run, fix="restore the original data")
    name = resolved.registered_name or resolved.config.mlflow.register_as
    return UnlearnSource(resolved, run.info.run_id, name, resolved.config, dataset)


def training_steps(cfg: Config) -> int:
    """Optimizer steps of a training run with `cfg`, over all proxies (ddpm is folded to one shard)."""
    return cfg.iet.rounds * cfg.iet.local_steps * cfg.iet.shards


def training_compute(source: UnlearnSource) -> TrainingCompute:
    """The source run's optimizer steps (from its config) and wall time (from MLflow's start and end)."""
    info = source.model.source_run.info
    seconds = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    return TrainingCompute(source.run_id, training_steps(source.config), seconds)


@ray.remote
def _unlearn_task(method, weights, config_tree, channels, keep_images, forget_images, settings, pixel_match_threshold):
    from memshard.model import build_scheduler, build_unet, load_numpy_state, resolve_device

    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    torch.set_num_threads(max(1, cpus))
    cfg = from_dict(config_tree)
    device = resolve_device("auto")
    unet = build_unet(cfg, channels)
    load_numpy_state(unet, weights)
    unet.to(device)
    stats = unlearn(method, unet, build_scheduler(cfg), keep_images, forget_images, settings, pixel_match_threshold)
    return UnlearnedWeights(state_to_numpy(unet), stats, str(device))


def unlearn_on_ray(method: str, pipeline: DDPMPipeline, source: UnlearnSource, forget: ForgetSet,
                   settings: UnlearnSettings, pixel_match_threshold: float, ray_address: str | None = None) -> UnlearnedWeights:
    """One Ray task runs `method` on the source's UNet: on a GPU when the cluster has one, else one CPU.
    `ray_address`: the one asked for now (`cluster.resolve_ray_address`), never the source run's."""
    with ray_session(ray_address):
        gpu = ray.cluster_resources().get("GPU", 0) >= 1
        options = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
        images = source.dataset.images
        task = _unlearn_task.options(**options).remote(
            method, state_to_numpy(pipeline.unet), to_dict(source.config), source.dataset.channels,
            images[forget.keep_rows], images[forget.rows], settings, pixel_match_threshold)
        return ray.get(task)


def retrain_without(source: UnlearnSource, forget: ForgetSet, tracking_uri: str,
                    ray_address: str | None = None, guard: GuardConfig | None = None) -> Retrained:
    """`memshard train` again with the source run's configuration, on the kept data only; its model is
    registered as a new version of the source's registered model. Where it runs is asked for now
    (`ray_address`, else RAY_ADDRESS, else a local instance), never the source run's saved address; its
    folders are this machine's (`with_default_places`), never the saved ones. Its guard is `guard` (None:
    the source's), over the source's training set, forget set included (README "Copy guard")."""
    cfg = with_default_places(from_dict(to_dict(source.config)))
    cfg.ray.address = ray_address
    if guard is not None:
        cfg.guard = guard
    data_dir = in_workspace(cfg.data.cache_dir) / f"unlearn-{forget.hash[:16]}"
    cfg.data.path = str(write_subset(source.dataset, forget.keep_rows, data_dir))
    cfg.mlflow.tracking_uri = tracking_uri
    cfg.mlflow.register_as = source.registered_name
    steps = training_steps(cfg)
    started = time.perf_counter()
    result = train(cfg, show_progress=False, hooks=RunHooks(guard_dataset=source.dataset))
    return Retrained(result, steps, time.perf_counter() - started)


def write_subset(dataset: ImageDataset, rows: np.ndarray, out_dir: Path) -> Path:
    """The prepared dataset restricted to `rows`, ids and bytes unchanged, metadata updated."""
    table = pq.read_table(Path(dataset.path) / DATASET_FILE)
    subset = table.take(pa.array(rows))
    meta = dict(table.schema.metadata or {})
    meta[b"memshard.count"] = str(len(rows)).encode()
    meta[b"memshard.fingerprint"] = fingerprint_of(dataset.sample_ids[rows], dataset.images[rows]).encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{DATASET_FILE}.tmp"
    pq.write_table(subset.replace_schema_metadata(meta), tmp)
    tmp.replace(out_dir / DATASET_FILE)
    return out_dir


def audit_unlearning(source: UnlearnSource, forget: ForgetSet, before: DDPMPipeline, after: DDPMPipeline,
                     compute: UnlearnCompute, settings: AuditSettings,
                     retrained: RetrainedModel | None = None) -> AuditReport:
    """Before vs after on the same seeded draws, quality in the default quality space; with `retrained`
    (an approximate method's exact reference) the retrain is measured the same way and set beside them."""
    dataset = source.dataset
    space, note = quality_space(dataset, settings)
    retrain = None if retrained is None else RetrainReference(
        retrained.run_id, retrained.model_uri, retrained.steps, retrained.seconds,
        measure(retrained.pipeline, dataset, forget, settings, space))
    return AuditReport(
        source_run_id=source.run_id, registered_model=source.registered_name, forget_hash=forget.hash,
        forget_size=len(forget.rows), keep_size=len(forget.keep_rows), method=compute.method, settings=settings,
        before=measure(before, dataset, forget, settings, space), after=measure(after, dataset, forget, settings, space),
        compute=compute, training=training_compute(source), retrain=retrain, quality_note=note)


def quality_space(dataset: ImageDataset, settings: AuditSettings) -> tuple[FeatureSpace | None, str]:
    """The audit's quality space (`default_quality_space`: the training set's classifier for labelled
    digits) and one line saying which and why."""
    if not settings.quality:
        return None, "not measured (audit.quality=false)"
    return default_quality_space(dataset)
