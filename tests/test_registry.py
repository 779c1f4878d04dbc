"""One model resolution for evaluate and unlearn: every accepted MODEL form against a real sqlite
MLflow store with two registered versions (logged here without training: no Ray needed)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from memshard.config import build_config, to_dict
from memshard.data import load_dataset, prepare_dataset
from memshard.errors import MemshardError
from memshard.model import build_unet, state_to_numpy
from memshard.orchestrator.pipeline_model import log_pipeline_model
from memshard.orchestrator.registry import load_model_pipeline, recorded_dataset, resolve_model
from memshard.pipeline import build_pipeline, save_pipeline

pytestmark = pytest.mark.integration  # an MLflow store and logged models: seconds, not milliseconds

NAME = "resolve-me"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Versions 1 and 2 of NAME, each logged by a run with lineage (dataset params, config.json) and
    saved at checkpoints/RUN_ID/pipeline as `memshard train` does; and a bare run with nothing."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMSHARD_WORKSPACE", str(root))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        dataset = load_dataset(prepare_dataset("digits", root / "data"))
        cfg = build_config("tiny", overrides={"data.path": dataset.path, "mlflow.register_as": NAME})
        experiment_id = mlflow.create_experiment("registry", artifact_location=(root / "artifacts").as_uri())
        versions = {}
        for version in (1, 2):
            torch.manual_seed(version)
            weights = state_to_numpy(build_unet(cfg, 1))
            with mlflow.start_run(experiment_id=experiment_id) as run:
                local = save_pipeline(build_pipeline(cfg, 1, weights), root / "checkpoints" / run.info.run_id / "pipeline")
                mlflow.log_params({"dataset.path": dataset.path, "dataset.fingerprint": dataset.fingerprint})
                mlflow.log_dict(to_dict(cfg), "config.json")
                log_pipeline_model(local, NAME, None)
            versions[version] = {"run_id": run.info.run_id, "weights": weights, "local": local}
        with mlflow.start_run(experiment_id=experiment_id) as bare:
            pass
        yield {"uri": uri, "client": MlflowClient(uri), "root": root, "cfg": cfg, "dataset": dataset,
               "versions": versions, "bare": bare.info.run_id}
        mlflow.set_tracking_uri(previous)


def assert_loads(store, resolved, version: int) -> None:
    unet = load_model_pipeline(resolved, store["client"]).unet
    for name, tensor in unet.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), store["versions"][version]["weights"][name], err_msg=name)


def assert_lineage(store, resolved, version: int) -> None:
    assert resolved.source_run_id == store["versions"][version]["run_id"]
    assert to_dict(resolved.config) == to_dict(store["cfg"])
    assert recorded_dataset(resolved.source_run, fix="-").fingerprint == store["dataset"].fingerprint


@pytest.mark.parametrize("model, version", [
    (f"models:/{NAME}/1", 1), (f"models:/{NAME}", 2), (f"{NAME}/1", 1), (NAME, 2), (f" {NAME}/2 ", 2),
])
def test_registered_forms_name_a_version_its_run_and_its_config(store, model, version):
    resolved = resolve_model(model, store["client"])
    assert resolved.location == f"models:/{NAME}/{version}" and not resolved.is_local
    assert (resolved.registered_name, resolved.registered_version) == (NAME, str(version))
    assert_lineage(store, resolved, version)
    assert_loads(store, resolved, version)


def test_a_runs_uri_names_its_run(store):
    run_id = store["versions"][1]["run_id"]
    resolved = resolve_model(f"runs:/{run_id}/model", store["client"])
    assert resolved.location == f"runs:/{run_id}/model" and resolved.registered_name is None
    assert_lineage(store, resolved, 1)
    assert_loads(store, resolved, 1)


def test_local_folders_find_their_run_by_checkpoint_name_or_mlmodel(store, tmp_path):
    checkpoint = store["versions"][2]["local"]
    by_checkpoint = resolve_model(str(checkpoint), store["client"])
    assert by_checkpoint.is_local and by_checkpoint.location == str(checkpoint)
    assert_lineage(store, by_checkpoint, 2)
    assert_loads(store, by_checkpoint, 2)

    run_id = store["versions"][1]["run_id"]
    downloaded = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path / "dl"),
                                                     tracking_uri=store["uri"])
    by_mlmodel = resolve_model(downloaded, store["client"])  # MLmodel names the run; the pipeline is inside
    assert by_mlmodel.is_local and (tmp_path / "dl").resolve() in Path(by_mlmodel.location).resolve().parents
    assert_lineage(store, by_mlmodel, 1)
    assert_loads(store, by_mlmodel, 1)

    loose = shutil.copytree(checkpoint, tmp_path / "loose")  # no MLmodel, not named pipeline: no lineage
    without = resolve_model(str(loose), store["client"])
    assert without.source_run is None and without.config is None
    assert_loads(store, without, 2)


def test_an_existing_folder_wins_over_a_registered_name(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MODEL is a folder relative to the working directory, as a shell user types it
    shutil.copytree(store["versions"][1]["local"], tmp_path / NAME)
    resolved = resolve_model(NAME, store["client"])
    assert resolved.is_local and resolved.registered_name is None
    assert_loads(store, resolved, 1)


@pytest.mark.parametrize("model, message", [
    ("no/such/dir", "neither an existing pipeline directory nor an MLflow model URI"),
    (f"models:/{NAME}/one", "neither an existing pipeline directory nor an MLflow model URI"),
    ("http://host/model", "neither an existing pipeline directory nor an MLflow model URI"),
    ("models:/no-such-model/1", "could not be fetched"),
    ("no-such-model", "could not be fetched"),
    (f"{NAME}/9", "could not be fetched"),
    ("runs:/abc", "write runs:/RUN_ID/model"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "is not in the tracking store"),
])
def test_what_does_not_resolve_is_one_line(store, model, message):
    with pytest.raises(MemshardError, match=message):
        resolve_model(model, store["client"])


def test_a_run_without_lineage_resolves_but_has_no_model_to_load(store):
    resolved = resolve_model(f"runs:/{store['bare']}/model", store["client"])
    assert resolved.source_run_id == store["bare"] and resolved.config is None
    with pytest.raises(MemshardError, match="recorded no dataset.path"):
        recorded_dataset(resolved.source_run, fix="retrain it")
    with pytest.raises(MemshardError, match="could not be fetched"):
        load_model_pipeline(resolved, store["client"])


def test_resolving_and_loading_leave_nothing_in_the_temp_dir(store, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for model in (NAME, f"runs:/{store['versions'][1]['run_id']}/model"):
        load_model_pipeline(resolve_model(model, store["client"]), store["client"])
    assert list(tmp_path.iterdir()) == []
