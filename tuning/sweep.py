"""`memshard tune` on Ray Tune, the driver's side: check everything, start one trial per setting, follow
their points, choose, log, register.

Placement (`trial_bundles`): a trial reserves, through `tune.with_resources`, a placement group of a
bundle for its driver — the process Tune runs the trial in, which generates and measures between
rounds while its actors wait — and K bundles shaped like the K shard actors `memshard train` would
start on this cluster (`plan_actor_resources`). Inside the trial, `cluster.place_actors` finds that
group and puts the actors in its last K bundles, so a trial holds exactly what it reserved: trials
run side by side when the cluster has room and queue when it does not.

The driver's bundle follows the actors': where they hold GPU shares, it holds one more bundle like
theirs (the GPUs shared among K + 1, as `ray.gpus_per_actor=auto` shares them among K actors), since
Ray shows a process only the GPUs it reserved and the measurement would otherwise run on the CPU;
where they hold none (a CPU-only cluster, or `ray.gpus_per_actor=0`), it is empty and the driver
borrows the CPUs its waiting actors hold. The driver measures on what Ray assigned it
(`assigned_device`). Why a bundle of the driver's own and not a Ray task in an actor's bundle: the
actor holds all of its bundle, so such a task would need a bigger bundle per actor and would ship
the weights, the data and the classifier to another process each round; a driver bundle like the
actors' keeps the group K + 1 alike bundles, which `check_feasible` checks exactly.

Each trial (`trial.run_trial`, in its own process) is a training run plus its points; what it needs
beyond its configuration reaches it as a `trial.TrialContext`. A failed trial's points are shown,
never chosen, and the others go on.

MLflow: the parent run holds the sweep's settings, trials.md / trials.csv / points.csv, tradeoff.png,
choice.json and the chosen setting as chosen_config.yaml (a config file `memshard train --config`
takes; a chosen guarded point's guard setting is its guard section, and the registered model's default).
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from collections.abc import Callable
from contextlib import nullcontext, redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from ray import tune

from memshard.config import DEFAULT_MAX_QUALITY_LOSS, Config, GuardConfig, check_quality_loss, to_dict
from memshard.data import ImageDataset, load_dataset, resolve_dataset
from memshard.errors import MemshardError, one_line
from memshard.evaluation.classifier_space import DEFAULT_CACHE_DIR, ClassifierSpace, classifier_unavailable
from memshard.evaluation.evaluate import EvaluateSettings
from memshard.files import in_workspace
from memshard.orchestrator.checkpoint import check_checkpoint_root
from memshard.orchestrator.cluster import (
    check_feasible,
    node_resources,
    plan_actor_resources,
    ray_session,
)
from memshard.orchestrator.registry import KIND_TAG
from memshard.orchestrator.tracking import connect_mlflow, resolve_tracking_uri, tracker
from memshard.tuning.choice import UNGUARDED, Choice, Point, choose, guard_suffix, quality_budget
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
from memshard.tuning.space import SweepSpace, Trial, guard_label
from memshard.tuning.trial import GUARD_TAG, SWEEP_TAG, TRIAL_TAG, TrialContext, run_trial

TUNE_DIR = ".memshard/tune"  # Tune's own files, and the chosen config file, per sweep; under the workspace root


@dataclass(frozen=True)
class SweepSettings:
    max_quality_loss: float = DEFAULT_MAX_QUALITY_LOSS  # the budget: Fréchet at most the reference's × (1 + this)
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
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    outcomes: list[TrialOutcome]
    choice: Choice | None  # None: the reference trial failed, so there is no budget
    config_file: Path | None  # the chosen setting (or, over budget, the closest one's, named so)
    registered: tuple[str, str] | None  # (name, version)
    table: str  # trials.md


def trial_bundles(trial: Trial, nodes: list[dict[str, float]]) -> list[dict[str, float]]:
    """The bundles `trial` reserves on these nodes: its driver's, then one per shard actor (see the
    module's docstring: the driver's is like an actor's when the actors hold GPU shares, else empty).
    A trial that could never be placed is a one-line error before any work."""
    shards = trial.cfg.iet.shards
    actor = plan_actor_resources(trial.cfg, shards, nodes)
    measures_on_gpu = actor.gpus > 0
    if measures_on_gpu:
        actor = plan_actor_resources(trial.cfg, shards + 1, nodes)  # the driver is one more GPU process
    try:
        check_feasible(actor, shards, nodes, beside=int(measures_on_gpu))
    except MemshardError as error:
        why = "its measurement holds a GPU bundle like a shard actor's: " if measures_on_gpu else ""
        raise MemshardError(f"trial {trial.name} ({trial.describe()}): {why}{error}") from None
    return [actor.bundle() if measures_on_gpu else {}] + [actor.bundle()] * shards


def placement(config: dict) -> tune.PlacementGroupFactory:
    """A trial's reservation, as `trial_bundles` made it."""
    spec = config["trial"]
    return tune.PlacementGroupFactory(spec["bundles"], strategy=spec["strategy"])


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
                      int(result["shards"]), result["compute"], result["guard"])
        outcome.points.append(point)
        if result["pipeline"]:
            outcome.round_pipelines[point.round] = result["pipeline"]
        self._line(f"{point.trial} round {point.round}{guard_suffix(point.guard)}: {point.near_copied:g} nearly copied, "
                   f"Fréchet {point.frechet:.3f}")

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
            best = (f"best within budget: {p.trial} round {p.round}{guard_suffix(p.guard)} ({p.near_copied:g} nearly copied, "
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
    return next((p for p in outcome.points if p.round == reference_round and p.guard == UNGUARDED), None)


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
    check_quality_loss(settings.max_quality_loss, f"--max-quality-loss {settings.max_quality_loss:g}")
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
    parent_id = None
    try:
        with ray_session(base.ray.address):
            nodes = node_resources()
            specs = [{"name": t.name, "config": to_dict(t.cfg), "reference": t.reference, "bundles": trial_bundles(t, nodes),
                      "strategy": t.cfg.ray.placement_strategy, "guards": [asdict(g) for g in t.guards]}
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
                tracker.log_dict({t.name: {"setting": t.describe(), "settings": t.settings, "reference": t.reference,
                                           "guards": {guard_label(g): asdict(g) for g in t.guards}}
                                  for t in space.trials}, "space.json")
                context = TrialContext(tracking_uri, parent_id, absolute_places(base, dataset_dir), str(classifier_cache),
                                       evaluate_settings, eval_every, space.reference_round)
                say(f"sweep: {len(space.trials)} trials on Ray Tune; MLflow parent run {parent_id}; reference "
                    f"{space.reference.name} ({space.reference.describe()}) at round {space.reference_round}")
                progress = Progress(outcomes, space.reference, space.reference_round, settings.max_quality_loss, say)
                with nullcontext() if tune_output else redirect_stdout(io.StringIO()):  # Tune prints even at verbose=0
                    _fit(specs, context, progress, parent_id)
                return _conclude(list(outcomes.values()), space, settings, preset, parent_id, tracking_uri, dataset)
    except KeyboardInterrupt:  # SIGINT or SIGTERM (memshard.commands.cli): Ray is shut down, the trials ended
        if parent_id is not None:
            _end_interrupted_trials(tracking_uri, parent_id)
        raise


def _end_interrupted_trials(tracking_uri: str, parent_id: str) -> None:
    """The sweep's runs still RUNNING once an interrupt has shut Ray down (the trials' processes ended
    where they stood, unable to end their runs) are marked KILLED; the parent run ended FAILED as the
    interrupt left its context."""
    client = MlflowClient(tracking_uri)
    experiment_id = tracker.call(client.get_run, parent_id).info.experiment_id
    running = tracker.call(client.search_runs, [experiment_id], filter_string=(
        f"tags.`{SWEEP_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'"))
    for run in running:
        tracker.call(client.set_terminated, run.info.run_id, "KILLED")


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
              parent_id: str, tracking_uri: str, dataset: ImageDataset) -> SweepResult:
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
        config_file.write_text(chosen_config(trial.cfg, marked.round, trial.guard_named(marked.guard)))
        tracker.log_artifact(config_file)
    metrics = {"trials_failed": sum(o.status == "FAILED" for o in outcomes),
               "trials_finished": sum(o.status == "FINISHED" for o in outcomes)}
    if choice is not None and choice.chosen is not None:
        metrics.update({"chosen.training_images_nearly_copied": choice.chosen.near_copied, "chosen.frechet": choice.chosen.frechet,
                        "chosen.round": choice.chosen.round, "budget.max_frechet": choice.budget.max_frechet})
    tracker.log_metrics(metrics)
    if choice is not None and choice.chosen is not None:
        tracker.set_tags({"memshard.tune.chosen": f"{choice.chosen.trial} round {choice.chosen.round}{guard_suffix(choice.chosen.guard)}"})
    registered = None
    if settings.register_as and choice is not None and choice.chosen is not None:
        registered = register_point(next(o for o in outcomes if o.trial.name == choice.chosen.trial),
                                    choice.chosen, settings.register_as, parent_id, dataset)
    return SweepResult(parent_id, tracking_uri, outcomes, choice, config_file, registered, table)


def _choice_summary(choice: Choice | None, space: SweepSpace) -> dict:
    if choice is None:
        return {"chosen": None, "why": f"the reference trial {space.reference.name} failed: no quality budget"}

    def point(p: Point | None) -> dict | None:
        return None if p is None else {"trial": p.trial, "round": p.round, "guard": p.guard,
                                       "training_images_nearly_copied": p.near_copied,
                                       "generations_near_copies": p.near_copy_fraction, "frechet": p.frechet,
                                       "coverage": p.coverage, "shards": p.shards, "optimizer_steps": p.compute}

    return {"reference": point(choice.budget.reference), "max_quality_loss": choice.budget.max_quality_loss,
            "budget": {"max_frechet": choice.budget.max_frechet, "min_coverage": choice.budget.min_coverage},
            "chosen": point(choice.chosen), "closest_over_budget": point(choice.closest),
            "within_budget": [point(p) for p in choice.within]}


def register_point(outcome: TrialOutcome, point: Point, name: str, parent_id: str,
                   dataset: ImageDataset) -> tuple[str, str]:
    """Register the model of a trial's point as a new version of `name`: the run's logged model for its
    last round, else that round's saved pipeline, logged into the trial's run first. A guarded point's
    model carries its guard setting as its default (`point_guard`)."""
    round_index = point.round
    if round_index == outcome.trial.cfg.iet.rounds and point.guard == UNGUARDED:
        version = mlflow.register_model(outcome.model_uri, name)
    else:
        with mlflow.start_run(run_id=outcome.run_id, nested=True):
            info = tracker.log_model(outcome.round_pipelines[round_index], name, point_guard(outcome, point), dataset,
                                     artifact_name=f"model-round-{round_index}")
        version = MlflowClient().get_model_version(name, str(info.registered_model_version))
    tracker.tag_model_version(name, str(version.version), {
        SWEEP_TAG: parent_id, TRIAL_TAG: outcome.trial.name, "memshard.tune.round": str(round_index),
        GUARD_TAG: point.guard})
    return name, str(version.version)


def point_guard(outcome: TrialOutcome, point: Point) -> GuardConfig:
    """The guard section the registered model of `point` carries as its default: a guarded point's
    setting, else the trial's own (the sweep's config's)."""
    return outcome.trial.cfg.guard if point.guard == UNGUARDED else outcome.trial.guard_named(point.guard)
