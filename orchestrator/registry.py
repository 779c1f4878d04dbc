"""Which model a command means and where it came from: the one resolution `evaluate` and `unlearn` use.

MODEL is one of
- `models:/NAME/VERSION` or `NAME/VERSION`: a registered model version;
- `models:/NAME` or `NAME`: that registered model's latest version;
- `runs:/RUN_ID/PATH`: a model logged in a run (memshard train logs it at `model`);
- a local directory: a saved pipeline (model_index.json), a downloaded MLflow model holding one, or a
  training checkpoint's pipeline (`.memshard/checkpoints/RUN_ID/pipeline`).
An existing directory wins over a registered name it happens to share. Registered names cannot hold
'/' or ':' (MLflow refuses them), so `NAME/VERSION` never reads as a path with more parts.

The lineage is the training run that logged the model (the registry version's run, the runs:/ id,
the run id in a local MLflow model's MLmodel file, or the checkpoint folder's name): its params
`dataset.path` / `dataset.fingerprint` and its `config.json` artifact. A local folder whose run is
not in this store resolves without lineage; a URI's run must be there.

Resolving downloads no weights. `load_model_pipeline` fetches them into a temporary folder it removes
and reads the saved pipeline folder (`memshard.pipeline.load_pipeline`), never MLflow's pickled
pyfunc wrapper; `load_model` also reads the guard settings the model's files carry (`memshard.guard`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml
from diffusers import DDPMPipeline
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from memshard.config import Config, GuardConfig, from_dict, redact_uri
from memshard.data import ImageDataset, is_prepared_dataset, load_dataset
from memshard.errors import MemshardError, shown
from memshard.guard import find_guard_dir, read_guard_settings
from memshard.orchestrator.tracking import scrub
from memshard.pipeline import find_pipeline_dir, load_pipeline

KIND_TAG = "memshard.kind"  # what a run is: "evaluation", "compare" (training runs carry none)
SOURCE_RUN_TAG = "memshard.source_run_id"  # an evaluation's or unlearning's training run
SYNTAX = "models:/NAME/VERSION, models:/NAME, NAME/VERSION, NAME, runs:/RUN_ID/model or a pipeline directory"


@dataclass(frozen=True)
class ResolvedModel:
    given: str  # MODEL as the user wrote it
    location: str  # the saved pipeline directory, or models:/NAME/VERSION or runs:/RUN_ID/PATH to fetch
    source_run: Run | None  # the training run; None: not known in this store
    config: Config | None  # the source run's config.json; None: it logged none
    registered_name: str | None = None
    registered_version: str | None = None

    @property
    def is_local(self) -> bool:
        return "://" not in self.location and not self.location.startswith(("models:/", "runs:/"))

    @property
    def source_run_id(self) -> str | None:
        return self.source_run.info.run_id if self.source_run is not None else None


def resolve_model(model: str, client: MlflowClient) -> ResolvedModel:
    """MODEL in any of the module's forms -> where its pipeline is, its training run and configuration."""
    text = model.strip()
    local = Path(text).expanduser()
    if text and _exists(local):
        pipeline_dir = find_pipeline_dir(local, model)
        run = _run_if_present(client, _mlmodel_run_id(local) or _checkpoint_run_id(pipeline_dir))
        return ResolvedModel(model, str(pipeline_dir), run, _run_config(client, run))
    if text.startswith("runs:/"):
        run_id, _, path = text[len("runs:/"):].partition("/")
        if not run_id or not path.strip("/"):
            raise MemshardError(f"model {shown(model)}: write runs:/RUN_ID/model (the run id, then the model's path)")
        run = get_run(client, run_id)
        return ResolvedModel(model, text, run, _run_config(client, run))
    name, _, version = text.removeprefix("models:/").partition("/")
    if not name or ":" in name or (version and not version.isdigit()):
        raise MemshardError(f"model {shown(model)} is neither an existing pipeline directory nor an MLflow model "
                            f"URI: give {SYNTAX}")
    try:
        version = version or _latest_version(client, name)
        run_id = client.get_model_version(name, version).run_id
    except MlflowException as error:
        raise _not_fetched(model, client, error) from None
    run = get_run(client, run_id) if run_id else None  # a version registered from outside a run has none
    return ResolvedModel(model, f"models:/{name}/{version}", run, _run_config(client, run), name, version)


@dataclass(frozen=True)
class LoadedModel:
    pipeline: DDPMPipeline
    guard: GuardConfig | None  # the guard section the model's files carry; None: none (models before the guard)


def load_model_pipeline(resolved: ResolvedModel, client: MlflowClient, device: str | None = "cpu") -> DDPMPipeline:
    """The resolved model's DDPMPipeline on `device`, read from its saved pipeline folder."""
    return load_model(resolved, client, device).pipeline


def load_model(resolved: ResolvedModel, client: MlflowClient, device: str | None = "cpu") -> LoadedModel:
    """The resolved model's DDPMPipeline on `device` and the guard settings in its files (the folder
    given, or the downloaded model: `memshard.guard.find_guard_dir`)."""
    if resolved.is_local:
        return _loaded(Path(resolved.given.strip()).expanduser(), Path(resolved.location), device)
    with tempfile.TemporaryDirectory(prefix="memshard-model-") as tmp:
        try:
            downloaded = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=resolved.location, dst_path=tmp, tracking_uri=client.tracking_uri))
        except Exception as error:  # missing artifact, store gone: the user fixes the URI or the store
            raise _not_fetched(resolved.given, client, error) from None
        return _loaded(downloaded, find_pipeline_dir(downloaded, resolved.given), device)


def _loaded(root: Path, pipeline_dir: Path, device: str | None) -> LoadedModel:
    guard_dir = find_guard_dir(root)
    return LoadedModel(load_pipeline(pipeline_dir, device), None if guard_dir is None else read_guard_settings(guard_dir))


def get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise MemshardError(f"run {shown(run_id)} is not in the tracking store {redact_uri(client.tracking_uri)}: "
                            "check the run id and --tracking-uri (or MLFLOW_TRACKING_URI)") from None


def recorded_dataset(run: Run, fix: str) -> ImageDataset:
    """The dataset `run` trained on, as its params recorded it; refused (ending with `fix`) when it is
    gone or its fingerprint changed since."""
    params, run_id = run.data.params, run.info.run_id
    path, fingerprint = params.get("dataset.path"), params.get("dataset.fingerprint")
    if not path or not fingerprint:
        raise MemshardError(f"run {run_id} recorded no dataset.path / dataset.fingerprint, so its training data "
                            f"is unknown: {fix}")
    if not is_prepared_dataset(path):
        raise MemshardError(f"run {run_id} was trained on {path}, which is no longer there: {fix}")
    dataset = load_dataset(path)
    if dataset.fingerprint != fingerprint:
        raise MemshardError(f"the dataset at {path} changed since run {run_id} trained on it (fingerprint differs): "
                            f"{fix}")
    return dataset


def latest_evaluation(client: MlflowClient, run_id: str) -> Run:
    """`run_id` itself when it is an evaluation run, else its latest FINISHED evaluation."""
    run = get_run(client, run_id)
    if run.data.tags.get(KIND_TAG) == "evaluation":
        return run
    found = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`{SOURCE_RUN_TAG}` = '{run_id}' and tags.`{KIND_TAG}` = 'evaluation' "
                      "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise MemshardError(f"run {run_id} is neither an evaluation run nor a training run with one: "
                            f"run `memshard evaluate runs:/{run_id}/model` first")
    return found[0]


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a NUL byte, a name too long for the file system: not a folder, so a name
        return False


def _latest_version(client: MlflowClient, name: str) -> str:
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise MlflowException(f"no registered model named {shown(name)}")
    return str(max(int(v.version) for v in versions))


def _not_fetched(model: str, client: MlflowClient, error: Exception) -> MemshardError:
    reason = scrub((str(error).splitlines() or [type(error).__name__])[0][:200], client.tracking_uri)
    return MemshardError(f"model {shown(model)} could not be fetched from {redact_uri(client.tracking_uri)} "
                         f"({reason}): check the model (memshard train prints its URI) and --tracking-uri")


def _mlmodel_run_id(root: Path) -> str | None:
    """The run an MLflow model folder was logged in, from its MLmodel file."""
    if not root.is_dir():
        return None
    files = [root / "MLmodel"] if (root / "MLmodel").is_file() else sorted(root.rglob("MLmodel"))[:1]
    for file in files:
        try:
            meta = yaml.safe_load(file.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None  # not a readable MLmodel: the folder resolves without lineage
        if isinstance(meta, dict) and meta.get("run_id"):
            return str(meta["run_id"])
    return None


def _checkpoint_run_id(pipeline_dir: Path) -> str | None:
    """`memshard train` saves the final pipeline at CHECKPOINT_DIR/RUN_ID/pipeline."""
    return pipeline_dir.absolute().parent.name if pipeline_dir.name == "pipeline" else None


def _run_if_present(client: MlflowClient, run_id: str | None) -> Run | None:
    if run_id is None:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:  # a folder from another store: resolved without lineage
        return None


def _run_config(client: MlflowClient, run: Run | None) -> Config | None:
    """The run's config.json as a Config; None when it logged none. Read from a temporary folder
    that is removed at once, so nothing of the run stays in the system's temp dir."""
    if run is None:
        return None
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory(prefix="memshard-config-") as tmp:
        try:
            text = Path(client.download_artifacts(run_id, "config.json", tmp)).read_text()
        except (MlflowException, OSError):
            return None
    try:
        tree = json.loads(text)
    except ValueError:
        raise MemshardError(f"run {run_id}'s config.json is not valid JSON: the run's lineage is damaged; "
                            "retrain the model") from None
    return from_dict(tree)
