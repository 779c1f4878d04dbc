"""`memshard unlearn`: remove a forget set from a trained model, register the result, audit it.

MODEL takes every form `orchestrator.registry` resolves; its training run supplies the lineage. An
approximate method runs on Ray (`unlearning.runner`) inside a new MLflow run tagged
`memshard.source_run_id`; `retrain` is a new training run on X \\ A, which then gets the same tags.
The result is registered as a new version of the source's registered model, with the audit report
(`unlearning.audit`: report.json, report.md, nearest.png) logged beside it.

Every input is checked before a run starts: a bad setting, a bad forget set or a model without
lineage is a one-line error, and nothing is logged or registered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
from diffusers import DDPMPipeline
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from memshard.config import GuardConfig, MLflowConfig, RayConfig, check_guard, field_hints, parse_sets, to_dict
from memshard.errors import MemshardError
from memshard.evaluation.evaluate import COPIES_TABLE, PER_SAMPLE_MEASURES
from memshard.files import in_workspace
from memshard.orchestrator.registry import SOURCE_RUN_TAG, get_run, load_model_pipeline, resolve_model
from memshard.orchestrator.tracking import check_tracking_store, connect_mlflow, resolve_tracking_uri, tracker
from memshard.pipeline import build_pipeline, load_pipeline, save_pipeline
from memshard.unlearning.audit import AuditReport, AuditSettings, UnlearnCompute
from memshard.unlearning.forget_set import ForgetSet, evaluation_spec, forget_set
from memshard.unlearning.methods import UnlearnSettings
from memshard.unlearning.runner import (
    FORGET_HASH_TAG,
    METHOD_TAG,
    STEPS_TAG,
    RetrainedModel,
    UnlearnSource,
    audit_unlearning,
    check_keep_set,
    check_method,
    retrain_without,
    unlearn_on_ray,
    unlearn_source,
)

# Where-settings `--set` may give: where to log and where to run (asked for again on every command,
# never taken from the source run: README "Which cluster"); the rest is the source's.
MLFLOW_SETTINGS = ("mlflow.tracking_uri", "mlflow.experiment")
RAY_SETTINGS = ("ray.address",)
STOPPED_TAG = "memshard.unlearn_stopped"  # forgotten (the checks said so) or max_steps
FORGET_MEASURE_TAG = "memshard.forget_measure"  # near-copies or r-copies: what chose an evaluation:RUN_ID forget set


@dataclass(frozen=True)
class UnlearnOptions:
    settings: UnlearnSettings
    audit: AuditSettings
    tracking_uri: str | None = None
    experiment: str | None = None  # None: the source run's configured experiment
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local instance (never the source run's)
    guard: dict[str, object] = dataclasses.field(default_factory=dict)  # guard.NAME given: over the source's


@dataclass(frozen=True)
class UnlearnResult:
    run_id: str
    registered_name: str
    registered_version: str
    report: AuditReport
    report_dir: Path
    forget: ForgetSet


def parse_unlearn_sets(sets: list[str], steps: int | None = None) -> UnlearnOptions:
    """`--set` keys: unlearning settings by name (rho, forget_scale_mode, check_every, ...), `audit.NAME`,
    `guard.NAME` (the new version's guard, README "Copy guard"), `mlflow.tracking_uri|experiment`,
    `ray.address`; read and checked by the training config's machinery
    (`memshard.config.parse_sets`). `steps` (--steps) is the cap, max_steps."""
    where_hints = {**field_hints(MLflowConfig, "mlflow."), **field_hints(RayConfig, "ray.")}
    hints = {**field_hints(UnlearnSettings), **field_hints(AuditSettings, "audit."), **field_hints(GuardConfig, "guard."),
             **{key: where_hints[key] for key in (*MLFLOW_SETTINGS, *RAY_SETTINGS)}}
    chosen = parse_sets(sets, hints, example="rho=0.1")
    unlearn_values = {key: value for key, value in chosen.items() if "." not in key}
    if steps is not None:
        unlearn_values["max_steps"] = steps
    audit = AuditSettings(**{key[len("audit."):]: value for key, value in chosen.items() if key.startswith("audit.")})
    audit.check()
    settings = UnlearnSettings(**unlearn_values)
    settings.check()
    guard = {key[len("guard."):]: value for key, value in chosen.items() if key.startswith("guard.")}
    return UnlearnOptions(settings, audit, chosen.get("mlflow.tracking_uri"), chosen.get("mlflow.experiment"),
                          chosen.get("ray.address"), guard)


@dataclass(frozen=True)
class UnlearnRequest:
    """Everything checked, nothing run yet."""

    model: str
    forget_spec: str
    method: str
    source: UnlearnSource
    forget: ForgetSet
    before: DDPMPipeline = dataclasses.field(repr=False)
    options: UnlearnOptions

    @property
    def guard(self) -> GuardConfig:
        """The new version's guard: the settings given (--set guard.NAME=...) over the source's. Its reference
        stays the source's training set, forget set included: the guard keeps generations away from the
        forgotten images too."""
        return dataclasses.replace(self.source.config.guard, **self.options.guard)

    def tags(self, steps: int | None = None, stopped: str = "") -> dict[str, str]:
        """On the unlearned run and its registered version: lineage, the forget set, the method, and
        once known the steps taken and why it stopped."""
        tags = {SOURCE_RUN_TAG: self.source.run_id, FORGET_HASH_TAG: self.forget.hash,
                "memshard.forget_size": str(len(self.forget.rows)), METHOD_TAG: self.method}
        if steps is not None:
            tags[STEPS_TAG] = str(steps)
        if stopped:
            tags[STOPPED_TAG] = stopped
        if self.forget.measure:
            tags[FORGET_MEASURE_TAG] = self.forget.measure
        return tags


def unlearn_model(model: str, forget: str, method: str = "siss", steps: int | None = None,
                  sets: list[str] | None = None, tracking_uri: str | None = None) -> UnlearnResult:
    options = parse_unlearn_sets(sets or [], steps)
    check_method(method)
    tracking_uri = resolve_tracking_uri(tracking_uri or options.tracking_uri)
    client = check_tracking_store(tracking_uri)
    source = unlearn_source(resolve_model(model, client))
    connect_mlflow(tracking_uri, options.experiment or source.config.mlflow.experiment)
    dataset = source.dataset
    chosen = forget_set(forget, dataset.sample_ids, dataset.content_hashes, dataset.images.shape[1:],
                        lambda run_id, measure: copied_ids(client, run_id, source.run_id, measure))
    check_keep_set(source, chosen, method, options.audit)
    request = UnlearnRequest(model, forget, method, source, chosen, load_model_pipeline(source.model, client), options)
    check_guard(request.guard)
    if method == "retrain":
        return _retrain(client, request, tracking_uri)
    return _approximate(client, request)


def _approximate(client: MlflowClient, request: UnlearnRequest) -> UnlearnResult:
    source, chosen, options = request.source, request.forget, request.options
    dataset = source.dataset
    with mlflow.start_run() as run:
        tracker.set_tags(request.tags())
        tracker.log_params({
            **{f"unlearn.{k}": v for k, v in dataclasses.asdict(options.settings).items()},
            **{f"audit.{k}": v for k, v in dataclasses.asdict(options.audit).items()},
            "unlearn.method": request.method, "forget.size": len(chosen.rows), "forget.spec": request.forget_spec[:400],
            "dataset.path": dataset.path, "dataset.fingerprint": dataset.fingerprint, "source.model": request.model,
        })
        # Lineage for the next unlearn; its guard section is this version's (the next one's default).
        tracker.log_dict(to_dict(dataclasses.replace(source.config, guard=request.guard)), "config.json")
        tracker.log_text("\n".join(chosen.ids) + "\n", "forget_ids.txt")
        unlearned = unlearn_on_ray(request.method, request.before, source, chosen, options.settings,
                                   options.audit.pixel_match_threshold, options.ray_address)
        stats = unlearned.stats
        tags = request.tags(stats.steps, stats.stopped)  # the steps taken, not the cap
        tracker.set_tags(tags)
        for point in stats.trajectory:
            counted = {} if point.pixel_matches is None else {"check_pixel_matches": point.pixel_matches}
            tracker.log_metrics({"check_keep_loss": point.keep_loss, "check_forget_loss": point.forget_loss, **counted},
                                step=point.step)
        after = build_pipeline(source.config, dataset.channels, unlearned.weights)
        checkpoints = in_workspace(MLflowConfig.checkpoint_dir)  # this machine's, never the source run's saved one
        local = save_pipeline(after, checkpoints / run.info.run_id / "pipeline")
        tracker.set_tags({"device": unlearned.device})
        compute = UnlearnCompute(request.method, stats.steps, stats.seconds, unlearned.device, stats.check_seconds,
                                 options.settings.max_steps, stats.stopped, stats.trajectory)
        report = audit_unlearning(source, chosen, request.before, after, compute, options.audit,
                                  latest_retrain(client, source, chosen))
        report_dir = _log_report(report, source, local.parent / "audit")
        version = str(tracker.log_model(local, source.registered_name, request.guard,
                                        dataset).registered_model_version)
    tracker.tag_model_version(source.registered_name, version, tags)
    return UnlearnResult(run.info.run_id, source.registered_name, version, report, report_dir, chosen)


def _retrain(client: MlflowClient, request: UnlearnRequest, tracking_uri: str) -> UnlearnResult:
    source, chosen = request.source, request.forget
    retrained = retrain_without(source, chosen, tracking_uri, request.options.ray_address, request.guard)
    result, tags = retrained.result, request.tags(retrained.steps)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=result.run_id):
        tracker.set_tags(tags)
        tracker.log_text("\n".join(chosen.ids) + "\n", "forget_ids.txt")
        after = load_pipeline(result.local_pipeline, "cpu")
        compute = UnlearnCompute("retrain", retrained.steps, retrained.seconds, "see the run's devices tag")
        report = audit_unlearning(source, chosen, request.before, after, compute, request.options.audit)
        report_dir = _log_report(report, source, result.local_pipeline.parent / "audit")
    tracker.tag_model_version(source.registered_name, result.registered_version, tags)
    return UnlearnResult(result.run_id, source.registered_name, result.registered_version, report, report_dir, chosen)


def copied_ids(client: MlflowClient, evaluation_run_id: str, source_run_id: str, measure: str) -> list[str]:
    """The sample ids an evaluation run of the source found at least one generation to be a copy of,
    by `measure` (a key of PER_SAMPLE_MEASURES): its copies table's column of that measure."""
    column = PER_SAMPLE_MEASURES[measure]
    run = get_run(client, evaluation_run_id)
    evaluated = run.data.tags.get(SOURCE_RUN_TAG)
    if evaluated != source_run_id:
        raise MemshardError(f"evaluation run {evaluation_run_id} evaluated run {evaluated}, not this model's run "
                            f"{source_run_id}: pass an evaluation of this model")
    with tempfile.TemporaryDirectory(prefix="memshard-copies-") as tmp:
        try:
            path = client.download_artifacts(evaluation_run_id, COPIES_TABLE, tmp)
        except (MlflowException, OSError):
            raise MemshardError(f"evaluation run {evaluation_run_id} has no {COPIES_TABLE}: run memshard evaluate "
                                "on the model first") from None
        table = pq.read_table(path)
    if column not in table.column_names:
        raise MemshardError(f"evaluation run {evaluation_run_id} predates per-sample {measure} (its {COPIES_TABLE} "
                            f"has no {column} column): run memshard evaluate on the model again")
    if table.column(column).null_count == len(table):
        raise MemshardError(f"evaluation run {evaluation_run_id} could not calibrate {measure} (fewer than 3 distinct "
                            f"training images): pass evaluation:{evaluation_run_id}:r-copies or sample ids")
    counts = table.select(["sample_id", column]).to_pandas()
    return counts.loc[counts[column] > 0, "sample_id"].astype(str).tolist()


def latest_retrain(client: MlflowClient, source: UnlearnSource, forget: ForgetSet) -> RetrainedModel | None:
    """The latest registered retrain of `source` without `forget` in the store, loaded (None: there is none)."""
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=(f"tags.`{SOURCE_RUN_TAG}` = '{source.run_id}' and tags.`{METHOD_TAG}` = 'retrain' "
                       f"and tags.`{FORGET_HASH_TAG}` = '{forget.hash}'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    versions = client.search_model_versions(f"run_id='{run.info.run_id}'")
    if not versions:
        return None
    uri = f"models:/{versions[0].name}/{versions[0].version}"
    return RetrainedModel(run.info.run_id, uri, int(run.data.tags.get(STEPS_TAG, 0)),
                          run.data.metrics.get("unlearn_seconds"), load_model_pipeline(resolve_model(uri, client), client))


def _log_report(report: AuditReport, source: UnlearnSource, out_dir: Path) -> Path:
    """report.json, report.md and nearest.png, written next to the local pipeline and logged under audit/;
    the before/after numbers as metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    (out_dir / "report.md").write_text(report.markdown())
    report.nearest_picture(source.dataset).save(out_dir / "nearest.png")
    for name in ("report.json", "report.md", "nearest.png"):
        tracker.log_artifact(out_dir / name, "audit")
    tracker.log_metrics(report.metrics())
    return out_dir


def run_unlearn_command(args: argparse.Namespace) -> int:
    """`memshard unlearn` (see memshard/commands/cli.py)."""
    result = unlearn_model(args.model, args.forget, args.method, args.steps, args.set)
    report = result.report
    before, after, compute = report.before, report.after, report.compute
    print(f"run id: {result.run_id}")
    print(f"registered model: {result.registered_name} version {result.registered_version}")
    evaluation = evaluation_spec(args.forget)
    if evaluation:
        print(f"forget set: {len(result.forget.rows)} samples, the training images evaluation run {evaluation[0]} "
              f"found generations to be {evaluation[1]} of, with their exact duplicates")
    print(f"generations pixel-matching a forget image (mean squared pixel distance < "
          f"{report.settings.pixel_match_threshold}): {before.pixel_matches}/{before.generations} -> "
          f"{after.pixel_matches}/{after.generations}")
    print(f"keep-set loss {before.keep_loss:.4f} -> {after.keep_loss:.4f}, forget-set loss "
          f"{before.forget_loss:.4f} -> {after.forget_loss:.4f}")
    if before.quality is not None and after.quality is not None:
        print(f"Fréchet in {before.quality.space}: {before.quality.generated.frechet:.3f} -> "
              f"{after.quality.generated.frechet:.3f} (real reference {before.quality.real.frechet:.3f})")
    stop = f", stopped: {compute.stopped}" if compute.stopped else ""
    print(f"cost: {compute.steps} steps{stop}, {compute.seconds:.1f} s = {100 * report.steps_fraction:.1f}% of the "
          "training run's steps")
    print(f"audit report: {result.report_dir / 'report.md'}")
    if report.method != "retrain":
        print("note: this removal is approximate; --method retrain is exact")
    return 0
