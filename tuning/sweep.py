"""`memshard tune` on Ray Tune: one trial per setting, each a training run plus its points, the choice.

Placement: a trial reserves, through `tune.with_resources`, a placement group of an empty bundle for
its driver (it generates and measures between rounds, while its actors wait) and K bundles shaped
like the K shard actors `memshard train` would start on this cluster (`plan_actor_resources`). Inside
the trial, `cluster.place_actors` finds that group and puts the actors in those K bundles, so a trial
holds exactly what it reserved: trials run side by side when the cluster has room and queue when it
does not.

A trial (`run_trial`, in its own process): `orchestrator.train.train` with hooks — its run nested
under the sweep's parent run, its model logged but not registered, and after every E-th round (and
the reference round) the global weights measured (`measure`) and reported to Tune, each point
logged to the training run as `tune.*` metrics by round. At the end one evaluation run, nested under
the training run and linked to it as `memshard evaluate` links its runs, holds every point's figures
by round. A trial that raises is marked FAILED in MLflow and in Tune (no retries), and the others
go on.

MLflow: the parent run holds the sweep's settings, trials.md / trials.csv / points.csv, tradeoff.png,
choice.json and the chosen setting as chosen_config.yaml (a config file `memshard train --config`
takes). Every path and the tracking URI reach the trials absolute (`TrialContext`, through
`tune.with_parameters`: the object store, never Tune's files on disk, which would hold credentials).
"""

from __future__ import annotations

import io
import json
import logging
import sys
import tempfile
from collections.abc import Callable
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import mlflow
import ray
import torch
from mlflow.tracking import MlflowClient
from ray import tune

from memshard.config import Config, flatten, from_dict, set_dotted, to_dict
from memshard.data import ImageDataset, load_dataset, resolve_dataset
from memshard.errors import MemshardError, one_line
from memshard.evaluation.classifier_space import DEFAULT_CACHE_DIR, ClassifierSpace, classifier_unavailable
from memshard.evaluation.evaluate import EvaluateSettings
from memshard.files import in_workspace
from memshard.orchestrator.checkpoint import check_checkpoint_root
from memshard.orchestrator.cluster import (
    ActorResources,
    check_feasible,
    connect_ray,
    node_resources,
    plan_actor_resources,
)
from memshard.orchestrator.registry import KIND_TAG, SOURCE_RUN_TAG
from memshard.orchestrator.tracking import connect_mlflow, resolve_tracking_uri, tracker
from memshard.orchestrator.train import RoundEnd, RunHooks, checkpoint_dir, train
from memshard.pipeline import save_pipeline
from memshard.tuning.choice import Choice, Point, choose, quality_budget
from memshard.tuning.measure import Data, evaluation_rounds, measure
from memshard.tuning.report import (
    TRIAL_COLUMNS,
    TrialOutcome,
    as_csv,
    as_markdown,
    chosen_config,
    point_rows,
    tradeoff_figure,
    trial_rows,
)
from memshard.tuning.space import SweepSpace, Trial

SWEEP_TAG = "memshard.tune.parent_run_id"  # on every trial's runs: the sweep they belong to
TRIAL_TAG = "memshard.tune.trial"  # the trial's name (t00, ...)
TUNE_DIR = ".memshard/tune"  # under the workspace root
log = logging.getLogger("memshard.tune")  # Tune's own files, and the chosen config file, per sweep


@dataclass(frozen=True)
class SweepSettings:
    max_quality_loss: float = 0.10  # the budget: Fréchet at most the reference's × (1 + this)
    num_images: int = 500  # generations per point
    sampler: str = "ddim"
    sampling_steps: int = 50
    eval_every: int | None = None  # rounds between points; None: a fifth of the reference's rounds
    register_as: str | None = None  # register the chosen trial's model under this name
    seed: int = 0  # generation seed: the same for every point, so points differ only by their weights

    def evaluate_settings(self) -> EvaluateSettings:
        settings = EvaluateSettings(protocol="quick", num_images=self.num_images, sampler=self.sampler,
                                    sampling_steps=self.sampling_steps, batch_size=min(250, self.num_images),
                                    seed=self.seed, feature_space=None, device="cpu")
        settings.check()
        return settings


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


@dataclass(frozen=True)
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    outcomes: list[TrialOutcome]
    choice: Choice | None  # None: the reference trial failed, so there is no budget
    config_file: Path | None  # the chosen setting (or, over budget, the closest one's, named so)
    registered: tuple[str, str] | None  # (name, version)
    table: str  # trials.md


# ---------------------------------------------------------------- the trial (runs in a Tune worker)


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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rounds = evaluation_rounds(cfg.iet.rounds, context.eval_every, context.reference_round if spec["reference"] else None)
    steps_per_round = cfg.iet.shards * cfg.iet.local_steps
    measured: list[tuple[int, dict, dict]] = []  # (round, evaluate's metrics, its params)

    def after_round(end: RoundEnd) -> None:
        round_index = end.round_index
        if round_index not in rounds:
            return
        run_id = mlflow.active_run().info.run_id
        m = measure(cfg, end.model_weights, data, context.evaluate, space, device)
        pipeline_dir = ""
        if round_index < cfg.iet.rounds:  # the last round's pipeline is the run's model already
            pipeline_dir = str(save_pipeline(m.pipeline.to("cpu"), checkpoint_dir(cfg, run_id) / "rounds" / f"round_{round_index:04d}"))
        figures = m.figures
        if figures["copied_near"] is None:  # evaluate() calibrates near copies on >= 3 distinct images
            raise MemshardError(f"{cfg.data.path} has fewer than 3 distinct images: near copies, what the choice "
                                "minimizes, cannot be calibrated; tune on a dataset of at least 3 images")
        tracker.log_metrics({f"tune.{k}": float(v) for k, v in figures.items() if v is not None}, step=round_index)
        measured.append((round_index, m.metrics, m.params))
        tune.report({"kind": "point", "trial": spec["name"], "round": round_index, "run_id": run_id,
                     "near_copied": float(figures["copied_near"]),
                     "near_copy_fraction": float(figures["generations_near_copies"]),
                     "frechet": float(figures["frechet"]),
                     "coverage": -1.0 if figures["coverage"] is None else float(figures["coverage"]),
                     "real_frechet": float(figures["real_frechet"]), "shards": cfg.iet.shards,
                     "compute": float(round_index * steps_per_round), "pipeline": pipeline_dir})

    hooks = RunHooks(parent_run_id=context.parent_run_id, tags={**tags, "mlflow.runName": spec["name"]},
                     register=False, after_round=after_round)
    result = train(cfg, show_progress=False, hooks=hooks)
    _log_evaluation_run(result.run_id, result.model_uri, cfg, dataset, measured, tags)
    tune.report({"kind": "trained", "trial": spec["name"], "run_id": result.run_id, "model_uri": result.model_uri})


def _log_evaluation_run(run_id: str, model_uri: str, cfg: Config, dataset: ImageDataset,
                        measured: list[tuple[int, dict, dict]], tags: dict[str, str]) -> None:
    """The trial's points as `memshard evaluate` logs one evaluation, by round, linked to its training run."""
    if not measured:
        return
    params = {**measured[-1][2], "model": model_uri, "dataset.path": dataset.path,
              "dataset.fingerprint": dataset.fingerprint, "dataset.count": len(dataset),
              "dataset.matches_training_run": "true", "rounds_measured": ",".join(str(r) for r, _, _ in measured)}
    run_tags = {**tags, KIND_TAG: "evaluation", SOURCE_RUN_TAG: run_id, "memshard.model_uri": model_uri,
                "memshard.source_method": cfg.iet.method}
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    with mlflow.start_run(experiment_id=experiment_id, parent_run_id=run_id, run_name=f"evaluate {tags[TRIAL_TAG]}",
                          tags=run_tags):
        tracker.log_params(params)
        for round_index, metrics, _ in measured:
            tracker.log_metrics(metrics, step=round_index)


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


# ---------------------------------------------------------------- the driver


def trial_resources(trial: Trial, nodes: list[dict[str, float]]) -> ActorResources:
    """One shard actor of `trial`, sized as `memshard train` sizes it on this cluster; a trial that
    could never be placed is a one-line error before any work."""
    resources = plan_actor_resources(trial.cfg, trial.cfg.iet.shards, nodes)
    try:
        check_feasible(resources, trial.cfg.iet.shards, nodes)
    except MemshardError as error:
        raise MemshardError(f"trial {trial.name} ({trial.describe()}): {error}") from None
    return resources


def placement(config: dict) -> tune.PlacementGroupFactory:
    """A trial's reservation: an empty bundle for its driver, then one bundle per shard actor."""
    spec = config["trial"]
    return tune.PlacementGroupFactory([{}] + [spec["bundle"]] * spec["shards"], strategy=spec["strategy"])


class Progress(tune.Callback):
    """Collects every point the trials report (in the sweep's driver) and prints a line on each change:
    trials done / running / queued / failed, and the best point within the budget so far."""

    def __init__(self, outcomes: dict[str, TrialOutcome], reference: Trial, reference_round: int,
                 max_quality_loss: float, say: Callable[[str], None]):
        self.outcomes, self.reference, self.reference_round = outcomes, reference, reference_round
        self.max_quality_loss, self.say = max_quality_loss, say

    def on_trial_start(self, iteration, trials, trial, **info):
        name = trial.config["trial"]["name"]
        self.outcomes[name].status = "RUNNING"
        self._line(f"{name} started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        outcome = self.outcomes[result["trial"]]
        outcome.run_id = result["run_id"]
        if result["kind"] == "trained":
            outcome.model_uri = result["model_uri"]
            return
        point = Point(result["trial"], int(result["round"]), result["near_copied"], result["near_copy_fraction"],
                      result["frechet"], None if result["coverage"] < 0 else result["coverage"],
                      int(result["shards"]), result["compute"])
        outcome.points.append(point)
        if result["pipeline"]:
            outcome.round_pipelines[point.round] = result["pipeline"]
        self._line(f"{point.trial} round {point.round}: {point.near_copied:g} nearly copied, Fréchet {point.frechet:.3f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        name = trial.config["trial"]["name"]
        self.outcomes[name].status = "FINISHED"
        self._line(f"{name} finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        outcome = self.outcomes[trial.config["trial"]["name"]]
        outcome.status = "FAILED"
        outcome.error = _trial_error(trial)
        self._line(f"{outcome.trial.name} FAILED: {outcome.error}")

    def _line(self, event: str) -> None:
        statuses = [o.status for o in self.outcomes.values()]
        counts = ", ".join(f"{statuses.count(s)} {s.lower()}" for s in ("FINISHED", "RUNNING", "QUEUED", "FAILED"))
        choice = current_choice(list(self.outcomes.values()), self.reference, self.reference_round,
                                self.max_quality_loss)
        if choice is None:
            best = f"best within budget: waiting for the reference ({self.reference.name} round {self.reference_round})"
        elif choice.chosen is None:
            best = "best within budget: none yet"
        else:
            p = choice.chosen
            best = (f"best within budget: {p.trial} round {p.round} ({p.near_copied:g} nearly copied, "
                    f"Fréchet {p.frechet:.3f} <= {choice.budget.max_frechet:.3f})")
        self.say(f"{event} | trials: {counts}; {best}")


def _trial_error(trial) -> str:
    """The first line of the error a trial raised, as Tune kept it."""
    text = ""
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text() if path and Path(path).is_file() else ""
    except OSError:
        pass
    lines = [line for line in text.splitlines() if line.strip()]
    # The trial's own exception is the last line of the traceback Tune stored; memshard's are the user's to read.
    last = lines[-1].removeprefix(f"{MemshardError.__module__}.{MemshardError.__name__}: ") if lines else ""
    return one_line(last)[:500] if last else "failed (see the trial's run)"


def reference_point(outcomes: list[TrialOutcome], reference: Trial, reference_round: int) -> Point | None:
    outcome = next(o for o in outcomes if o.trial.name == reference.name)
    if outcome.status == "FAILED":
        return None
    return next((p for p in outcome.points if p.round == reference_round), None)


def current_choice(outcomes: list[TrialOutcome], reference: Trial, reference_round: int,
                   max_quality_loss: float) -> Choice | None:
    """The choice over the points so far (a failed trial's points are shown, never chosen); None
    until the reference point is measured."""
    point = reference_point(outcomes, reference, reference_round)
    if point is None:
        return None
    candidates = [p for o in outcomes if o.status != "FAILED" for p in o.points]
    return choose(candidates, quality_budget(point, max_quality_loss))


def absolute_places(base: Config, dataset_dir: Path) -> dict[str, str]:
    """The place settings resolved here, in the driver: Tune runs each trial in a folder of its own."""
    return {"data.path": str(dataset_dir), "data.cache_dir": str(in_workspace(base.data.cache_dir)),
            "mlflow.checkpoint_dir": str(in_workspace(base.mlflow.checkpoint_dir))}


def run_sweep(space: SweepSpace, settings: SweepSettings, preset: str,
              say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
              tune_output: bool = False) -> SweepResult:
    """Check everything, train and measure every trial on Ray Tune, choose, log, register if asked.
    `say` gets the progress lines; `tune_output` also lets Tune print its own tables (memshard -v)."""
    base = space.base
    evaluate_settings = settings.evaluate_settings()
    if not 0 <= settings.max_quality_loss <= 10:
        raise MemshardError(f"--max-quality-loss {settings.max_quality_loss:g}: give a fraction such as 0.1 or 10%")
    eval_every = settings.eval_every or max(1, space.reference_round // 5)
    if eval_every < 1:
        raise MemshardError(f"--eval-every {eval_every}: need at least 1 round")
    tracking_uri = resolve_tracking_uri(base.mlflow.tracking_uri)
    experiment_id = connect_mlflow(tracking_uri, base.mlflow.experiment)
    check_checkpoint_root(base.mlflow.checkpoint_dir)
    dataset_dir = resolve_dataset(base.data.path, base.data.resolution, base.data.channels, base.data.cache_dir)
    dataset = load_dataset(dataset_dir)
    why_not = classifier_unavailable(dataset)
    if why_not:
        raise MemshardError(f"memshard tune measures quality in the training set's classifier space, and {dataset.path} "
                            f"cannot have one ({why_not}): tune on labelled data")
    classifier_cache = in_workspace(DEFAULT_CACHE_DIR)
    space_name = ClassifierSpace(dataset, cache_dir=classifier_cache).name  # trained once here; every trial loads it
    started_ray = connect_ray(base.ray.address)
    try:
        nodes = node_resources()
        specs = [{"name": t.name, "config": to_dict(t.cfg), "reference": t.reference, "shards": t.cfg.iet.shards,
                  "bundle": trial_resources(t, nodes).bundle(), "strategy": t.cfg.ray.placement_strategy}
                 for t in space.trials]
        outcomes = {t.name: TrialOutcome(t) for t in space.trials}
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"tune {preset}",
                              tags={KIND_TAG: "tune"}) as parent:
            parent_id = parent.info.run_id
            tracker.log_params({
                "preset": preset, "trials": len(space.trials), "reference": space.reference.name,
                "reference_round": space.reference_round, "max_quality_loss": settings.max_quality_loss,
                "num_images": settings.num_images, "sampler": settings.sampler,
                "sampling_steps": settings.sampling_steps, "eval_every": eval_every, "seed": settings.seed,
                "quality_space": space_name,
                "dataset.fingerprint": dataset.fingerprint, "dataset.path": dataset.path})
            tracker.log_dict({t.name: {"setting": t.describe(), "settings": t.settings, "reference": t.reference}
                              for t in space.trials}, "space.json")
            context = TrialContext(tracking_uri, parent_id, absolute_places(base, dataset_dir), str(classifier_cache),
                                   evaluate_settings, eval_every, space.reference_round)
            say(f"sweep: {len(space.trials)} trials on Ray Tune; MLflow parent run {parent_id}; reference "
                f"{space.reference.name} ({space.reference.describe()}) at round {space.reference_round}")
            progress = Progress(outcomes, space.reference, space.reference_round, settings.max_quality_loss, say)
            with nullcontext() if tune_output else redirect_stdout(io.StringIO()):  # Tune prints even at verbose=0
                _fit(specs, context, progress, parent_id)
            return _conclude(list(outcomes.values()), space, settings, preset, parent_id, tracking_uri)
    finally:
        if started_ray:
            ray.shutdown()


def _fit(specs: list[dict], context: TrialContext, progress: Progress, parent_id: str) -> None:
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), resources=placement)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(specs)},
        tune_config=tune.TuneConfig(trial_dirname_creator=lambda trial: trial.config["trial"]["name"],
                                    trial_name_creator=lambda trial: trial.config["trial"]["name"]),
        run_config=tune.RunConfig(name=f"tune-{parent_id}", storage_path=str(in_workspace(TUNE_DIR)),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=0,
                                  callbacks=[progress]),
    )
    tuner.fit()  # a failed trial is in the result grid (and Progress), not an exception: the others go on


def _conclude(outcomes: list[TrialOutcome], space: SweepSpace, settings: SweepSettings, preset: str,
              parent_id: str, tracking_uri: str) -> SweepResult:
    """The choice, the table, the picture, the config file; registered when asked; all on the parent run."""
    choice = current_choice(outcomes, space.reference, space.reference_round, settings.max_quality_loss)
    out = in_workspace(TUNE_DIR) / f"tune-{parent_id}"
    out.mkdir(parents=True, exist_ok=True)
    trials = trial_rows(outcomes, choice)
    table = as_markdown(trials, TRIAL_COLUMNS)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "trials.md").write_text(table)
        (folder / "trials.csv").write_text(as_csv(trials))
        (folder / "points.csv").write_text(as_csv(point_rows(outcomes, choice)))
        tradeoff_figure(outcomes, choice, folder / "tradeoff.png",
                        f"{preset}: copying against quality, every trial's points by round "
                        f"(budget: Fréchet within +{settings.max_quality_loss:.0%} of {space.reference.name} "
                        f"at round {space.reference_round})")
        (folder / "choice.json").write_text(json.dumps(_choice_summary(choice, space), indent=1))
        tracker.log_artifacts(folder)
    config_file = None
    marked = None if choice is None else choice.chosen or choice.closest
    if marked is not None:
        trial = next(t for t in space.trials if t.name == marked.trial)
        name = "chosen_config.yaml" if choice.chosen else "closest_over_budget_config.yaml"
        config_file = out / name
        config_file.write_text(chosen_config(trial.cfg, marked.round))
        tracker.log_artifact(config_file)
    metrics = {"trials_failed": sum(o.status == "FAILED" for o in outcomes),
               "trials_finished": sum(o.status == "FINISHED" for o in outcomes)}
    if choice is not None and choice.chosen is not None:
        metrics.update({"chosen.training_images_nearly_copied": choice.chosen.near_copied, "chosen.frechet": choice.chosen.frechet,
                        "chosen.round": choice.chosen.round, "budget.max_frechet": choice.budget.max_frechet})
    tracker.log_metrics(metrics)
    if choice is not None and choice.chosen is not None:
        tracker.set_tags({"memshard.tune.chosen": f"{choice.chosen.trial} round {choice.chosen.round}"})
    registered = None
    if settings.register_as and choice is not None and choice.chosen is not None:
        registered = register_point(next(o for o in outcomes if o.trial.name == choice.chosen.trial),
                                    choice.chosen.round, settings.register_as, parent_id)
    return SweepResult(parent_id, tracking_uri, outcomes, choice, config_file, registered, table)


def _choice_summary(choice: Choice | None, space: SweepSpace) -> dict:
    if choice is None:
        return {"chosen": None, "why": f"the reference trial {space.reference.name} failed: no quality budget"}

    def point(p: Point | None) -> dict | None:
        return None if p is None else {"trial": p.trial, "round": p.round, "training_images_nearly_copied": p.near_copied,
                                       "generations_near_copies": p.near_copy_fraction, "frechet": p.frechet,
                                       "coverage": p.coverage, "shards": p.shards, "optimizer_steps": p.compute}

    return {"reference": point(choice.budget.reference), "max_quality_loss": choice.budget.max_quality_loss,
            "budget": {"max_frechet": choice.budget.max_frechet, "min_coverage": choice.budget.min_coverage},
            "chosen": point(choice.chosen), "closest_over_budget": point(choice.closest),
            "within_budget": [point(p) for p in choice.within]}


def register_point(outcome: TrialOutcome, round_index: int, name: str, parent_id: str) -> tuple[str, str]:
    """Register the model of a trial's point as a new version of `name`: the run's logged model for its
    last round, else that round's saved pipeline, logged into the trial's run first."""
    if round_index == outcome.trial.cfg.iet.rounds:
        version = mlflow.register_model(outcome.model_uri, name)
    else:
        with mlflow.start_run(run_id=outcome.run_id, nested=True):
            info = tracker.log_model(outcome.round_pipelines[round_index], name, artifact_name=f"model-round-{round_index}")
        version = MlflowClient().get_model_version(name, str(info.registered_model_version))
    tracker.tag_model_version(name, str(version.version), {
        SWEEP_TAG: parent_id, TRIAL_TAG: outcome.trial.name, "memshard.tune.round": str(round_index)})
    return name, str(version.version)
