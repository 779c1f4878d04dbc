"""The copy guard in the registered model (issue 28): predict's "guard" field, the model's own default
(the `guard` section it was logged with), and the guard reference it carries instead of the training
images. A real tiny pipeline, a real sqlite MLflow store and real prepared datasets in a temp dir."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from memshard.config import GuardConfig, build_config
from memshard.data import load_dataset, prepare_dataset
from memshard.errors import MemshardError
from memshard.guard import GUARD_FILE, GUARD_IMAGES_FILE, find_guard_dir
from memshard.model import build_unet, state_to_numpy
from memshard.orchestrator.pipeline_model import DDPMPipelineModel, log_pipeline_model
from memshard.orchestrator.tracking import tracker
from memshard.orchestrator.train import train
from memshard.pipeline import build_pipeline, save_pipeline

STEPS = 5  # sampling steps: enough to exercise the loop, fast on 2 CPU cores
REQUEST = {"num_images": 6, "seed": 11, "num_inference_steps": STEPS}
PLANTED = [0, 3]  # which of REQUEST's plain generations the training set holds exactly

pytestmark = pytest.mark.integration  # an MLflow store, logged models, one training run: seconds, not milliseconds


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pipeline; its plain output for REQUEST; a training set of 40 digits plus two of those
    outputs (so they are near copies, exact ones); a sqlite store."""
    root = tmp_path_factory.mktemp("pyfunc-guard")
    torch.manual_seed(0)
    cfg = build_config("tiny")
    pipeline_dir = save_pipeline(build_pipeline(cfg, 1, state_to_numpy(build_unet(cfg, 1))), root / "pipeline")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    try:
        experiment_id = mlflow.create_experiment("pyfunc-guard", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment_id):
            bare = log_pipeline_model(pipeline_dir, None, None)  # as every model logged before the guard
        plain = mlflow.pyfunc.load_model(bare.model_uri).predict(REQUEST)  # (N, H, W, 1)
        digits = load_dataset(prepare_dataset("digits", root / "digits")).images[:40, 0]
        np.save(root / "training.npy", np.concatenate([digits, plain[PLANTED, ..., 0]]))
        yield {"root": root, "pipeline_dir": pipeline_dir, "experiment_id": experiment_id, "plain": plain,
               "bare": bare.model_uri, "digits": digits}
    finally:
        mlflow.set_tracking_uri(previous)


def training_set(world, name: str, images: np.ndarray | None = None) -> Path:
    """A prepared dataset of `images` (default: the module's training set) in its own folder."""
    source = world["root"] / f"{name}.npy"
    np.save(source, np.load(world["root"] / "training.npy") if images is None else images)
    return prepare_dataset(str(source), world["root"] / name)


def logged(world, guard: GuardConfig, dataset_dir: Path) -> str:
    """The pipeline logged as train logs it (Tracker.log_model), with `guard` over the dataset."""
    with mlflow.start_run(experiment_id=world["experiment_id"]):
        return tracker.log_model(world["pipeline_dir"], None, guard, load_dataset(dataset_dir)).model_uri


def one_line_error(action, match: str) -> str:
    with pytest.raises(MemshardError, match=match) as caught:
        action()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_the_guard_redraws_exactly_the_near_copies_and_is_off_unless_asked(world):
    model = mlflow.pyfunc.load_model(logged(world, GuardConfig(), training_set(world, "reference")))
    inner = model.unwrap_python_model()
    assert inner.default_guard == "off"
    np.testing.assert_array_equal(model.predict(REQUEST), world["plain"])  # no field: the model's off
    assert inner.last_guard_log is None
    np.testing.assert_array_equal(model.predict({**REQUEST, "guard": "off"}), world["plain"])

    guarded = model.predict({**REQUEST, "guard": "reject"})
    near = inner.guard("reject").near_copies(world["plain"].transpose(0, 3, 1, 2))
    assert near[PLANTED].all() and near.sum() < len(near)
    changed = (guarded != world["plain"]).any(axis=(1, 2, 3))
    np.testing.assert_array_equal(changed, near)  # redrawn where the plain draw was a near copy, nowhere else
    log = inner.last_guard_log
    assert (log.mode, log.generations, log.redrawn) == ("reject", 6, int(near.sum()))
    assert log.rejected_draws >= log.redrawn and log.unresolved == 0
    np.testing.assert_array_equal(model.predict({**REQUEST, "guard": "reject"}), guarded)  # seeded: again the same

    steered = model.predict({**REQUEST, "guard": "guidance"})
    assert steered.shape == guarded.shape and steered.dtype == np.uint8
    assert inner.last_guard_log.mode == "guidance" and inner.last_guard_log.generations == 6

    one_line_error(lambda: model.predict({**REQUEST, "guard": "strict"}),
                   "guard='strict' must be one of off, reject, guidance")
    # The reference carries no training images: only the dataset's path, fingerprint and count.
    local = Path(mlflow.artifacts.download_artifacts(model.metadata.get_model_info().model_uri,
                                                     dst_path=str(world["root"] / "download")))
    folder = find_guard_dir(local)
    assert sorted(p.name for p in folder.iterdir()) == [GUARD_FILE]
    reference = json.loads((folder / GUARD_FILE).read_text())
    assert reference["dataset"]["count"] == 42 and reference["dataset"]["path"] == str(world["root"] / "reference")


def test_a_model_logged_before_the_guard_predicts_unguarded_and_refuses_a_guard(world):
    model = mlflow.pyfunc.load_model(world["bare"])
    np.testing.assert_array_equal(model.predict(REQUEST), world["plain"])
    one_line_error(lambda: model.predict({**REQUEST, "guard": "reject"}), "carries no guard reference")
    direct = DDPMPipelineModel()  # as the class is used in-process: a bad type is one line too
    direct.pipeline = model.unwrap_python_model().pipeline
    one_line_error(lambda: direct.predict(None, {**REQUEST, "guard": 1}), "guard=1 must be one of")


def test_a_changed_or_moved_training_set_refuses_the_guard_and_plain_predict_still_works(world):
    dataset_dir = training_set(world, "changing")
    uri = logged(world, GuardConfig(mode="reject"), dataset_dir)
    # The same path, prepared again with one image different: the fingerprint no longer matches.
    changed = np.load(world["root"] / "training.npy")
    changed[5] = 255 - changed[5]
    training_set(world, "changing", changed)
    model = mlflow.pyfunc.load_model(uri)
    one_line_error(lambda: model.predict(REQUEST), "has changed since the model was trained")  # reject: its default
    np.testing.assert_array_equal(model.predict({**REQUEST, "guard": "off"}), world["plain"])

    shutil.move(dataset_dir, world["root"] / "moved-away")
    model = mlflow.pyfunc.load_model(uri)
    one_line_error(lambda: model.predict({**REQUEST, "guard": "guidance"}), "is missing or unreadable")
    np.testing.assert_array_equal(model.predict({**REQUEST, "guard": "off"}), world["plain"])


def test_a_model_carrying_its_images_guards_after_the_dataset_is_deleted(world):
    reference = mlflow.pyfunc.load_model(logged(world, GuardConfig(), training_set(world, "kept")))
    expected = reference.predict({**REQUEST, "guard": "reject"})
    dataset_dir = training_set(world, "deleted")
    uri = logged(world, GuardConfig(mode="reject", carry="images"), dataset_dir)
    shutil.rmtree(dataset_dir)
    model = mlflow.pyfunc.load_model(uri)
    assert model.unwrap_python_model().default_guard == "reject"
    np.testing.assert_array_equal(model.predict(REQUEST), expected)  # the same guard, from the carried images
    assert model.unwrap_python_model().last_guard_log.mode == "reject"
    carried = np.load(find_guard_dir(Path(mlflow.artifacts.download_artifacts(
        uri, dst_path=str(world["root"] / "carried")))) / GUARD_IMAGES_FILE)
    assert carried.shape == (42, 1, 8, 8)


def test_a_guard_mode_set_at_train_time_is_the_registered_models_default(ray_cluster, mlflow_store):
    cfg = build_config("tiny", overrides={"mlflow.tracking_uri": mlflow_store, "iet.rounds": 1},
                       sets=["guard.mode=reject", "mlflow.register_as=guarded"])
    result = train(cfg, show_progress=False)
    model = mlflow.pyfunc.load_model(f"models:/guarded/{result.registered_version}")
    inner = model.unwrap_python_model()
    request = {"num_images": 2, "seed": 0, "num_inference_steps": 2}
    guarded = model.predict(request)
    assert inner.default_guard == "reject" and inner.last_guard_log.mode == "reject"
    assert model.predict({**request, "guard": "off"}).shape == guarded.shape and inner.last_guard_log is None
    params = MlflowClient(mlflow_store).get_run(result.run_id).data.params
    reference = json.loads((inner.guard_dir / GUARD_FILE).read_text())
    assert reference["dataset"]["fingerprint"] == params["dataset.fingerprint"]  # the set it trained on
    assert reference["settings"]["mode"] == "reject"
