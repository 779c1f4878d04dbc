"""`memshard train`: data → shards → Ray actors → rounds → DDPMPipeline in MLflow, registered.

The driver alone talks to MLflow; actors only return numbers. A failure anywhere inside the run
leaves it FAILED (mlflow.start_run's context does that) and registers nothing.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from memshard.config import (
    WHERE_SETTINGS,
    Config,
    build_partial,
    flatten,
    from_dict,
    is_redacted,
    to_dict,
    with_default_places,
)
from memshard.data import ImageDataset, load_dataset, resolve_dataset
from memshard.errors import MemshardError
from memshard.files import in_workspace
from memshard.orchestrator.checkpoint import (
    check_checkpoint_root,
    checkpoint_interval,
    load_checkpoint,
    run_lock,
    save_checkpoint,
)
from memshard.orchestrator.cluster import ray_session
from memshard.orchestrator.rounds import IETDriver, RoundReport, start_shard_driver
from memshard.orchestrator.settings import check, server_hyperparameters
from memshard.orchestrator.sharding import split_into_shards
from memshard.orchestrator.tracking import (
    check_tracking_store,
    connect_mlflow,
    redact_uri,
    require_run,
    resolve_tracking_uri,
    tracker,
)
from memshard.pipeline import SamplingPlan, build_pipeline, generate_plan, image_grid, save_pipeline
from memshard.shard_worker.faults import FaultPlan

MIN_TRAINING_IMAGES = 2  # a run trains on at least two images


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    tracking_uri: str
    model_uri: str
    registered_name: str | None  # None: the model was logged, not registered (RunHooks.register False)
    registered_version: str | None
    local_pipeline: Path


@dataclass(frozen=True)
class RoundEnd:
    """What RunHooks.after_round receives after each round, inside the run."""

    report: RoundReport  # the round's losses, steps and phase timings, per shard
    model_weights: dict  # the model the run delivers: the EMA with training.ema, else the averaged weights
    # (after an exchange round that did not average: the proxies' FedAvg, computed for this report only)
    raw_weights: dict | None  # with training.ema, the averaged weights under the EMA; else None
    train_seconds: float  # the wall time of driver.run_round: broadcast, training, aggregation, exchange
    # generate(weights, plan): the plan's images (M, C, H, W) uint8 from a pipeline of `weights`, made by the
    # shard actors while they wait (IETDriver.generate); generation_device: where (cpu or cuda)
    generate: Callable[[dict, SamplingPlan], np.ndarray]
    generation_device: str

    @property
    def round_index(self) -> int:
        return self.report.round_index

    @property
    def optimizer_steps_total(self) -> int:
        """The round's optimizer steps, all shards together: its compute."""
        return sum(r.steps for r in self.report.results)

    @property
    def optimizer_steps_sequential(self) -> int:
        """The round's longest shard's steps: how far one model was updated in it."""
        return max(r.steps for r in self.report.results)


@dataclass(frozen=True)
class RunHooks:
    """What a caller that trains many runs (the sweep, the efficacy bench) needs of one: the run nested
    under its own, tagged, its model logged but not registered, and each round's end as it happens."""

    parent_run_id: str | None = None  # the caller's run; it may be the active one
    tags: dict[str, str] = field(default_factory=dict)
    register: bool = True
    after_round: Callable[[RoundEnd], None] | None = None  # inside the run, while the shard actors wait
    # The weights to log (and register) instead of the last round's model, given that model's weights; inside
    # the run, after the last round (also on a resume that had no round left to run).
    final_model: Callable[[dict], dict] | None = None
    # The training set the model's guard reference names (README "Copy guard"); None: the run's own. An
    # unlearned model's retrain trains without the forget set but keeps its source's, forget set included.
    guard_dataset: ImageDataset | None = None


def train(cfg: Config, show_progress: bool = True, resume_run_id: str | None = None,
          hooks: RunHooks = RunHooks()) -> TrainResult:  # noqa: B008  frozen, never mutated
    """Train a new run, or with `resume_run_id` continue one from its last checkpoint.

    For a resume, `cfg` must be the run's saved configuration (see `resume_config`).
    """
    check(cfg)
    faults = FaultPlan.from_environment()  # test-only; None in a real run
    check_checkpoint_root(cfg.mlflow.checkpoint_dir)
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    with ExitStack() as held:
        if resume_run_id:  # refused before anything is written to the store
            held.enter_context(run_lock(checkpoint_dir(cfg, resume_run_id), resume_run_id))
            check_tracking_store(tracking_uri)
            _require_resumable(tracking_uri, resume_run_id)
        return _open_run_and_train(cfg, show_progress, resume_run_id, hooks, faults, tracking_uri, held)


def _open_run_and_train(cfg: Config, show_progress: bool, resume_run_id: str | None, hooks: RunHooks,
                        faults: FaultPlan | None, tracking_uri: str, held: ExitStack) -> TrainResult:
    """`train` once a resume is allowed; `held` keeps the run's lock until the run has ended."""
    experiment_id = connect_mlflow(tracking_uri, cfg.mlflow.experiment)
    checkpoint = load_checkpoint(checkpoint_dir(cfg, resume_run_id)) if resume_run_id else None
    dataset = load_dataset(resolve_dataset(cfg.data.path, cfg.data.resolution, cfg.data.channels, cfg.data.cache_dir))
    if len(dataset) < MIN_TRAINING_IMAGES:
        raise MemshardError(f"{dataset.path} holds {len(dataset)} image: training needs at least "
                            f"{MIN_TRAINING_IMAGES}, add images")
    if checkpoint is not None and checkpoint["dataset_fingerprint"] != dataset.fingerprint:
        raise MemshardError(
            f"the dataset at {dataset.path} is not the one run {resume_run_id} was trained on "
            f"(fingerprint differs): restore it, or start a new run"
        )
    shards = initial_shards(cfg, dataset)
    with ray_session(cfg.ray.address):
        _check_cluster_has_gpu(cfg)
        run_args = {"run_id": resume_run_id} if resume_run_id else {"experiment_id": experiment_id}
        with mlflow.start_run(**run_args, parent_run_id=hooks.parent_run_id, nested=hooks.parent_run_id is not None,
                              tags=hooks.tags or None) as run:
            if not resume_run_id:  # a resume holds it already
                held.enter_context(run_lock(checkpoint_dir(cfg, run.info.run_id), run.info.run_id))
            return _train_in_run(cfg, dataset, shards, run.info.run_id, tracking_uri, show_progress, checkpoint, faults,
                                 hooks)


# A run whose training ended in an error or a signal. A RUNNING one is resumable too once `train` holds its
# lock: no live process trains it, its driver died without a word (SIGKILL, a lost node); FINISHED is done.
RESUMABLE_STATUSES = ("FAILED", "KILLED", "RUNNING")


def _require_resumable(tracking_uri: str, run_id: str) -> None:
    """A one-line error when run `run_id` may not be resumed: only a run that did not finish. Called
    while holding the run's lock, so the status read is not one another process is about to change."""
    status = require_run(tracking_uri, run_id).info.status
    if status not in RESUMABLE_STATUSES:
        logged = " (its model is logged)" if status == "FINISHED" else ""
        raise MemshardError(f"run {run_id} is {status}{logged}: --resume continues only a run that failed or was "
                            "interrupted; train a new run instead")


def min_training_images(cfg: Config) -> int:
    """Images a training run with `cfg` needs: MIN_TRAINING_IMAGES, and one per shard."""
    return max(MIN_TRAINING_IMAGES, cfg.iet.shards)


def checkpoint_dir(cfg: Config, run_id: str) -> Path:
    return in_workspace(cfg.mlflow.checkpoint_dir) / run_id


def _check_cluster_has_gpu(cfg: Config) -> None:
    """training.device=cuda needs a GPU in the cluster (the driver itself may have none): checked before the run."""
    if cfg.training.device == "cuda" and ray.cluster_resources().get("GPU", 0) < 1e-9:
        raise MemshardError("training.device = cuda but the Ray cluster has no GPU: use training.device=auto "
                            "(or cpu), or add GPU nodes")


# Settings a resumed run may change: where things are and how patient to be, and whether the last round
# is registered; never what is trained or measured.
RESUMABLE_SETTINGS = {*WHERE_SETTINGS, "mlflow.checkpoint_every", "ray.round_timeout_s", "ray.max_actor_restarts",
                      "ray.placement_timeout_s", "ray.placement_strategy", "selection.register"}


def resume_config(run_id: str, overrides: dict, sets: list[str]) -> Config:
    """The saved configuration of `run_id`; explicit flags may only change RESUMABLE_SETTINGS. Its place
    settings are this machine's (flags, else defaults), never the saved ones."""
    if not re.fullmatch(r"[a-zA-Z0-9][\w\-]{0,255}", run_id):  # MLflow's run id rule; also no path tricks
        raise MemshardError(f"--resume {run_id[:80]!r} is not a run id: give the id `memshard train` printed")
    requested = build_partial(overrides, sets)
    root = requested.get("mlflow.checkpoint_dir", Config().mlflow.checkpoint_dir)
    directory = in_workspace(root) / run_id
    saved_tree = load_checkpoint(directory)["config"]
    try:
        saved = from_dict(saved_tree)
    except MemshardError as error:
        raise MemshardError(f"damaged checkpoint in {directory} (its config: {error}): start the run again") from None
    asked_where = "mlflow.tracking_uri" in requested or os.environ.get("MLFLOW_TRACKING_URI")
    if is_redacted(saved.mlflow.tracking_uri) and not asked_where:  # say why the default store will not do
        raise MemshardError(
            f"run {run_id} was trained against {saved.mlflow.tracking_uri}, whose credentials are not saved: "
            f"give the URI again (--set mlflow.tracking_uri=URI or MLFLOW_TRACKING_URI)"
        )
    # Where-settings are asked for again, never taken from the saved run (README "Where-settings").
    with_default_places(saved, WHERE_SETTINGS)
    for key, value in requested.items():
        section, name = key.split(".", 1)
        current = getattr(getattr(saved, section), name)
        if key in RESUMABLE_SETTINGS:
            setattr(getattr(saved, section), name, value)
        elif value != current:
            raise MemshardError(
                f"run {run_id} was trained with {key} = {current!r}; --resume keeps the saved configuration: "
                f"drop the setting (you gave {value!r})"
            )
    check(saved)
    return saved


def initial_shards(cfg: Config, dataset: ImageDataset) -> list[np.ndarray]:
    labels = None
    if cfg.data.balanced_by_label:
        if np.all(dataset.labels < 0):
            raise MemshardError(f"data.balanced_by_label is set but {dataset.path} has no labels: drop the setting")
        labels = dataset.labels
    return split_into_shards(len(dataset), cfg.iet.shards, cfg.training.seed, labels)


def _train_in_run(cfg: Config, dataset: ImageDataset, shards: list[np.ndarray], run_id: str,
                  tracking_uri: str, show_progress: bool, checkpoint: dict | None,
                  faults: FaultPlan | None, hooks: RunHooks) -> TrainResult:
    num_shards = cfg.iet.shards
    checkpoint_every = checkpoint_interval(cfg, dataset.channels, len(shards))
    if checkpoint is None:
        params = {**flatten(cfg), "dataset.path": dataset.path, "dataset.fingerprint": dataset.fingerprint,
                  "dataset.count": len(dataset), "shards": num_shards, "method": cfg.iet.method}
        params["mlflow.tracking_uri"] = redact_uri(tracking_uri)
        # What the server optimizer ran with, its defaults included (the config keeps None for a default).
        params.update({f"aggregation.{key}": value for key, value in server_hyperparameters(cfg).items()})
        params["checkpoint_interval_rounds"] = checkpoint_every  # what mlflow.checkpoint_every (auto) came to
        tracker.log_params(params)
        tracker.log_dict(to_dict(cfg), "config.json")  # lineage: evaluate/unlearn/retrain read it
    tracker.set_tags({"memshard.version": version("memshard"), "ray.address": ray.get_runtime_context().gcs_address})

    with start_shard_driver(cfg, dataset.images, shards, faults) as (driver, resources):
        placement = driver.placement()
        generation_device = "cpu" if all(p["device"] == "cpu" for p in placement) else "cuda"
        tracker.set_tags({
            "devices": ",".join(sorted({p["device"] for p in placement})),
            "nodes": len({p["node_id"] for p in placement}),
            "actor.resources": str(resources.bundle()),
        })
        owners = [_owners(driver.shards, len(dataset))]
        if checkpoint is not None:
            try:
                driver.load_state(checkpoint["driver"], checkpoint_dir(cfg, run_id))
            except KeyError as error:  # an entry missing: a damaged file (any other error is a bug, with its traceback)
                raise MemshardError(f"damaged checkpoint for run {run_id} (its driver state has no {error}): "
                                    "start the run again") from None
            owners = list(checkpoint["owners"])
            tqdm.write(f"resuming run {run_id} after round {driver.rounds_done}", file=sys.stderr)
        rounds = tqdm(range(driver.rounds_done + 1, cfg.iet.rounds + 1), desc="rounds", initial=driver.rounds_done,
                      total=cfg.iet.rounds, disable=not show_progress, file=sys.stderr)
        for round_index in rounds:
            restarts_before = driver.restarts
            started = time.perf_counter()
            report = driver.run_round(round_index, is_last=round_index == cfg.iet.rounds)
            train_seconds = time.perf_counter() - started
            owners.append(_owners(driver.shards, len(dataset)))
            _log_round(report, num_shards)
            if driver.restarts > restarts_before:
                _log_failures(driver, round_index)
            rounds.set_postfix_str(" ".join(f"s{r.shard}:{r.images_per_second:.0f}img/s" for r in report.results))
            tqdm.write(_round_line(report, cfg.iet.rounds), file=sys.stderr)
            if cfg.mlflow.sample_grid_every and round_index % cfg.mlflow.sample_grid_every == 0:
                _log_sample_grid(cfg, dataset, driver.model_weights, round_index)
            if round_index % checkpoint_every == 0 or round_index == cfg.iet.rounds:
                directory = checkpoint_dir(cfg, run_id)
                driver_state = driver.state(directory)  # the proxies' files are written and checked first
                if faults is not None:
                    faults.before_manifest(round_index)
                save_checkpoint(directory, {
                    "config": to_dict(cfg), "dataset_fingerprint": dataset.fingerprint,
                    "driver": driver_state, "owners": np.stack(owners),
                }, keep_round=round_index)
            if faults is not None:
                faults.after_checkpoint(round_index)
            if hooks.after_round is not None:
                hooks.after_round(RoundEnd(report, driver.model_weights,
                                           None if driver.ema_weights is None else driver.averaged_weights,
                                           train_seconds, driver.generate, generation_device))
        rounds.close()

        # The final model is written locally first, then logged and registered.
        final_weights = driver.model_weights if hooks.final_model is None else hooks.final_model(driver.model_weights)
        pipeline = build_pipeline(cfg, dataset.channels, final_weights)
        local_pipeline = save_pipeline(pipeline, checkpoint_dir(cfg, run_id) / "pipeline")
        tracker.log_table(_assignment_history(dataset, np.stack(owners)), "shard_assignments.parquet")
        tracker.log_table(_memorization_scores(dataset, driver), "memorization_scores.parquet")
        try:
            info = tracker.log_model(local_pipeline, cfg.mlflow.register_as if hooks.register else None, cfg.guard,
                                     dataset if hooks.guard_dataset is None else hooks.guard_dataset)
        except Exception as error:
            raise MemshardError(
                f"the trained model could not be logged to MLflow ({type(error).__name__}); it is saved at "
                f"{local_pipeline}: log it when the tracking server is back"
            ) from None
        if not hooks.register:
            return TrainResult(run_id, tracking_uri, info.model_uri, None, None, local_pipeline)
        return TrainResult(run_id, tracking_uri, info.model_uri, cfg.mlflow.register_as,
                           str(info.registered_model_version), local_pipeline)


def _log_failures(driver: IETDriver, round_index: int) -> None:
    tracker.log_metrics({"actor_restarts": driver.restarts}, step=round_index)
    tracker.log_dict({"events": driver.failure_events}, "failures.json")
    for event in driver.failure_events:
        tqdm.write(f"recovered shard {event['shard']} in round {event['round']}: {event['reason']}", file=sys.stderr)


def _log_round(report: RoundReport, num_shards: int) -> None:
    step = report.round_index
    metrics = {
        "loss": report.mean_loss,
        "agc_kept_fraction": report.kept_fraction,
        "agc_skips_stale": report.skips_stale,
        "agc_skips_low_loss": report.skips_low_loss,
        "averaged": int(report.averaged),
        "samples_moved": report.samples_moved,
        "images_per_second": report.images_per_second,
        **{f"time_{phase}_s": seconds for phase, seconds in report.seconds.items()},
    }
    for result in report.results:
        metrics[f"shard_{result.shard}_loss"] = result.mean_loss_all
        metrics[f"shard_{result.shard}_images_per_second"] = result.images_per_second
        metrics[f"shard_{result.shard}_size"] = len(result.indices)
    tracker.log_metrics(metrics, step=step)
    if report.moves is not None:
        tracker.log_dict({"round": step, "from_rows_to_columns": report.moves.matrix(num_shards).tolist()},
                         f"moves/round_{step:04d}.json")


def _round_line(report: RoundReport, total_rounds: int) -> str:
    phases = " ".join(f"{phase} {seconds:.2f}s" for phase, seconds in report.seconds.items())
    averaged = "" if report.averaged else ", not averaged"
    return (f"round {report.round_index}/{total_rounds}: loss {report.mean_loss:.4f}, kept {report.kept_fraction:.3f} "
            f"(skips: {report.skips_stale} stale, {report.skips_low_loss} low-loss), moved {report.samples_moved}"
            f"{averaged}, {report.images_per_second:.0f} img/s ({phases})")


def _log_sample_grid(cfg: Config, dataset: ImageDataset, weights: dict, round_index: int) -> None:
    pipeline = build_pipeline(cfg, dataset.channels, weights)
    count = cfg.mlflow.sample_grid_images
    images = generate_plan(pipeline, SamplingPlan(count, "ddpm", cfg.mlflow.sample_grid_steps, count, cfg.training.seed))
    tracker.log_image(image_grid(images.transpose(0, 2, 3, 1)), key="samples", step=round_index)


def _owners(shards: list[np.ndarray], num_samples: int) -> np.ndarray:
    owner = np.empty(num_samples, dtype=np.int32)
    for k, shard in enumerate(shards):
        owner[shard] = k
    return owner


def _assignment_history(dataset: ImageDataset, owners: np.ndarray) -> pa.Table:
    """(sample_id, round, shard) for round 0 (the initial split) through the last round."""
    rounds, num_samples = owners.shape
    return pa.table({
        "sample_id": pa.array(np.tile(dataset.sample_ids.astype(str), rounds)),
        "round": pa.array(np.repeat(np.arange(rounds, dtype=np.int32), num_samples)),
        "shard": pa.array(owners.reshape(-1).astype(np.int32)),
    })


def _memorization_scores(dataset: ImageDataset, driver: IETDriver) -> pa.Table:
    owner = _owners(driver.shards, len(dataset))
    return pa.table({
        "sample_id": pa.array(dataset.sample_ids.astype(str)),
        "agc_skips": pa.array(driver.skips_total),
        "last_loss": pa.array(driver.last_loss),
        "final_shard": pa.array(owner),
    })
