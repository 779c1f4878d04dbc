"""A trial of `memshard tune`: what runs inside a Ray Tune trial worker, in a process of its own.

`run_trial`: `orchestrator.train.train` with hooks — its run nested under the sweep's parent run, its
model logged but not registered, and after every E-th round (and the reference round) the global
weights measured (`measure`) once per guard setting of the trial (`Trial.guards`: sampled differently,
never trained again) and each point reported to Tune; the plain points are logged to the training run
as `tune.*` metrics by round. At the end one evaluation run per guard setting, nested under the
training run and linked to it as `memshard evaluate` links its runs, holds its points' figures by
round (and, guarded, the guard's settings as guard.* params and what it did as guard.* metrics). A trial that raises is
marked FAILED in MLflow and in Tune (no retries), and the others go on.

What a trial needs beyond its configuration comes from the sweep's driver (`sweep`) as a
`TrialContext`: every path and the tracking URI absolute, through `tune.with_parameters` (the object
store, never Tune's files on disk, which would hold credentials).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow
from mlflow.tracking import MlflowClient
from ray import tune

from memshard.config import Config, GuardConfig, flatten, from_dict, set_dotted
from memshard.data import ImageDataset, load_dataset, resolve_dataset
from memshard.errors import MemshardError, one_line
from memshard.evaluation.classifier_space import ClassifierSpace
from memshard.evaluation.curve_point import Data, GuardedGenerateHere, evaluation_rounds, measure
from memshard.evaluation.evaluate import EvaluateSettings
from memshard.guard import GuardLog, build_guard
from memshard.orchestrator.cluster import assigned_device
from memshard.orchestrator.registry import KIND_TAG, SOURCE_RUN_TAG
from memshard.orchestrator.tracking import tracker
from memshard.orchestrator.train import RoundEnd, RunHooks, checkpoint_dir, train
from memshard.pipeline import build_pipeline, save_pipeline
from memshard.tuning.choice import UNGUARDED, guard_suffix
from memshard.tuning.space import guard_label

SWEEP_TAG = "memshard.tune.parent_run_id"  # on every trial's runs: the sweep they belong to
TRIAL_TAG = "memshard.tune.trial"  # the trial's name (t00, ...)
GUARD_TAG = "memshard.tune.guard"  # on each evaluation run: the guard setting its points were sampled with
log = logging.getLogger("memshard.tune")


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs beyond its configuration: absolute places, the parent run, how to measure."""

    tracking_uri: str
    parent_run_id: str
    where: dict[str, str]  # `section.key` -> an absolute path: the trials' working directory is Tune's
    classifier_cache: str
    evaluate: EvaluateSettings
    eval_every: int
    reference_round: int



def run_trial(config: dict, context: TrialContext) -> None:
    spec = config["trial"]
    cfg = from_dict(spec["config"])
    for dotted, value in context.where.items():
        set_dotted(cfg, dotted, value, origin="the sweep")
    cfg.mlflow.tracking_uri = context.tracking_uri
    mlflow.set_tracking_uri(context.tracking_uri)
    tags = {SWEEP_TAG: context.parent_run_id, TRIAL_TAG: spec["name"]}
    try:
        _train_and_measure(cfg, spec, context, tags)
    except BaseException as error:
        try:
            _mark_failed(cfg, spec, context, tags, error)
        except Exception as marking:  # the trial's own error is the one Tune must report
            log.warning("trial %s: its MLflow run could not be marked FAILED (%s)", spec["name"], marking)
        raise


def _train_and_measure(cfg: Config, spec: dict, context: TrialContext, tags: dict[str, str]) -> None:
    dataset = load_dataset(resolve_dataset(cfg.data.path, cfg.data.resolution, cfg.data.channels, cfg.data.cache_dir))
    data = Data(dataset, dataset, "full")
    space = ClassifierSpace(dataset, cache_dir=context.classifier_cache)  # cached by the sweep's driver
    device = assigned_device()  # a GPU only where the trial's driver bundle holds one (trial_bundles)
    rounds = evaluation_rounds(cfg.iet.rounds, context.eval_every, context.reference_round if spec["reference"] else None)
    steps_per_round = cfg.iet.shards * cfg.iet.local_steps
    settings = [GuardConfig(**g) for g in spec["guards"]]  # the plain point (where measured) first
    # Each guard's threshold is the measurement's near-copy threshold: the same images, the same seed.
    guards = {guard_label(g): None if g.mode == UNGUARDED else build_guard(g, dataset, device, context.evaluate.seed)
              for g in settings}
    measured: dict[str, list[Measured]] = {label: [] for label in guards}
    # The last round's pipeline is the run's model already; a guarded point's model is registered from a saved one.
    keep_last = any(guard is not None for guard in guards.values())

    def after_round(end: RoundEnd) -> None:
        round_index = end.round_index
        if round_index not in rounds:
            return
        run_id = mlflow.active_run().info.run_id
        pipeline_dir, plain, guarded_pipeline = "", None, None
        for label, guard in guards.items():
            if guard is None:
                m, guard_log = measure(cfg, end.model_weights, data, context.evaluate, space, device), None
                plain = m.generated
            else:
                if guarded_pipeline is None:
                    guarded_pipeline = build_pipeline(cfg, dataset.channels, end.model_weights).to(device)
                generation = GuardedGenerateHere(guarded_pipeline, guard, plain)
                m = measure(cfg, end.model_weights, data, context.evaluate, space, device, generate=generation)
                guard_log = generation.log
            figures = m.figures
            if figures["copied_near"] is None:  # evaluate() calibrates near copies on >= 3 distinct images
                raise MemshardError(f"{cfg.data.path} has fewer than 3 distinct images: near copies, what the choice "
                                    "minimizes, cannot be calibrated; tune on a dataset of at least 3 images")
            if not pipeline_dir and (round_index < cfg.iet.rounds or keep_last):
                pipeline_dir = str(save_pipeline(m.pipeline.to("cpu"), checkpoint_dir(cfg, run_id) / "rounds"
                                                 / f"round_{round_index:04d}"))
            if guard is None:
                tracker.log_metrics({f"tune.{k}": float(v) for k, v in figures.items() if v is not None}, step=round_index)
            measured[label].append(Measured(round_index, m.metrics, m.params, guard_log))
            tune.report({"kind": "point", "trial": spec["name"], "round": round_index, "run_id": run_id,
                         "guard": label, "near_copied": float(figures["copied_near"]),
                         "near_copy_fraction": float(figures["generations_near_copies"]),
                         "frechet": float(figures["frechet"]),
                         "coverage": -1.0 if figures["coverage"] is None else float(figures["coverage"]),
                         "real_frechet": float(figures["real_frechet"]), "shards": cfg.iet.shards,
                         "compute": float(round_index * steps_per_round), "pipeline": pipeline_dir})

    hooks = RunHooks(parent_run_id=context.parent_run_id, tags={**tags, "mlflow.runName": spec["name"]},
                     register=False, after_round=after_round)
    result = train(cfg, show_progress=False, hooks=hooks)
    for label, guard in guards.items():
        described = {"guard.mode": UNGUARDED} if guard is None else guard.describe()
        _log_evaluation_run(result.run_id, result.model_uri, cfg, dataset, measured[label], tags, label, described)
    tune.report({"kind": "trained", "trial": spec["name"], "run_id": result.run_id, "model_uri": result.model_uri})


@dataclass(frozen=True)
class Measured:
    """One point of a trial as its evaluation run logs it."""

    round: int
    metrics: dict  # evaluate's metrics
    params: dict  # how they were made
    guard_log: GuardLog | None  # what the guard did (None: the plain point)


def _log_evaluation_run(run_id: str, model_uri: str, cfg: Config, dataset: ImageDataset, measured: list[Measured],
                        tags: dict[str, str], guard: str, guard_params: dict) -> None:
    """One guard setting's points as `memshard evaluate` logs one evaluation, by round, linked to the
    trial's training run: a run per guard setting, each point its own figures and what the guard did."""
    if not measured:
        return
    params = {**measured[-1].params, **guard_params, "model": model_uri, "dataset.path": dataset.path,
              "dataset.fingerprint": dataset.fingerprint, "dataset.count": len(dataset),
              "dataset.matches_training_run": "true", "rounds_measured": ",".join(str(p.round) for p in measured)}
    run_tags = {**tags, KIND_TAG: "evaluation", SOURCE_RUN_TAG: run_id, "memshard.model_uri": model_uri,
                "memshard.source_method": cfg.iet.method, GUARD_TAG: guard}
    name = f"evaluate {tags[TRIAL_TAG]}{guard_suffix(guard)}"
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    with mlflow.start_run(experiment_id=experiment_id, parent_run_id=run_id, run_name=name, tags=run_tags):
        tracker.log_params(params)
        for point in measured:
            guard_metrics = {} if point.guard_log is None else point.guard_log.metrics()
            tracker.log_metrics({**point.metrics, **guard_metrics}, step=point.round)


def _mark_failed(cfg: Config, spec: dict, context: TrialContext, tags: dict[str, str], error: BaseException) -> None:
    """The trial's training run FAILED (train's run is already, when it got that far), with the error;
    a failure before the run opened leaves a FAILED run of its own, so every trial has its nested run."""
    message = one_line(f"{type(error).__name__}: {error}")
    client = MlflowClient(context.tracking_uri)
    parent = client.get_run(context.parent_run_id)
    found = [run for run in client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.`{SWEEP_TAG}` = '{context.parent_run_id}' and tags.`{TRIAL_TAG}` = '{spec['name']}'"))
        if KIND_TAG not in run.data.tags]  # its training run, not its evaluation
    if found:
        run_id = found[0].info.run_id
    else:
        run = client.create_run(parent.info.experiment_id, run_name=spec["name"],
                                tags={**tags, "mlflow.parentRunId": context.parent_run_id})
        run_id = run.info.run_id
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in flatten(cfg).items()
                                          if k != "mlflow.tracking_uri"])
    client.set_tag(run_id, "memshard.tune.error", message[:5000])
    client.log_text(run_id, message + "\n", "error.txt")
    client.set_terminated(run_id, "FAILED")
