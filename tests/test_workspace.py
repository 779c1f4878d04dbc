"""Where memshard writes: every relative place lies under one workspace root, resolved once per process
(MEMSHARD_WORKSPACE, else the directory the process started in), and a saved run never pins a place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from memshard.config import Config, build_config, to_dict
from memshard.data import load_dataset, resolve_dataset
from memshard.evaluation.classifier_space import classifier_cache_file
from memshard.files import in_workspace, workspace_root
from memshard.orchestrator.checkpoint import check_checkpoint_root, save_checkpoint
from memshard.orchestrator.tracking import resolve_tracking_uri
from memshard.orchestrator.train import checkpoint_dir, resume_config
from memshard.shard_worker.faults import FAULTS_ENV, FaultPlan
from memshard.tuning.sweep import TUNE_DIR, absolute_places


def in_a_fresh_process(code: str, cwd: Path, env: dict[str, str]) -> list[str]:
    """Run `code` in a new Python process started in `cwd`: its lines of output."""
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout.splitlines()


CHANGE_DIRECTORY_THEN_ASK = """
import os
from memshard.files import workspace_root
from memshard.orchestrator.tracking import resolve_tracking_uri
print(workspace_root())
os.chdir(os.environ["ELSEWHERE"])
print(workspace_root())
print(resolve_tracking_uri(None))
"""


def test_the_root_is_the_starting_directory_and_a_later_chdir_changes_nothing(tmp_path):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MEMSHARD_WORKSPACE", "MLFLOW_TRACKING_URI")}
    lines = in_a_fresh_process(CHANGE_DIRECTORY_THEN_ASK, start, {**env, "ELSEWHERE": str(elsewhere)})
    assert lines == [str(start), str(start), f"sqlite:///{start}/mlflow.db"]


def test_the_environment_variable_wins_and_a_relative_one_is_taken_from_the_starting_directory(tmp_path):
    start, chosen = tmp_path / "start", tmp_path / "chosen"
    start.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    lines = in_a_fresh_process(CHANGE_DIRECTORY_THEN_ASK, start,
                               {**env, "MEMSHARD_WORKSPACE": str(chosen), "ELSEWHERE": str(tmp_path)})
    assert lines == [str(chosen), str(chosen), f"sqlite:///{chosen}/mlflow.db"]
    lines = in_a_fresh_process(CHANGE_DIRECTORY_THEN_ASK, start,
                               {**env, "MEMSHARD_WORKSPACE": "sub", "ELSEWHERE": str(tmp_path)})
    assert lines[:2] == [str(start / "sub"), str(start / "sub")]


def test_every_default_place_lies_under_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(FAULTS_ENV, '{"shard": 0}')
    cfg = Config()
    assert workspace_root() == tmp_path
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///other.db") == f"sqlite:///{tmp_path}/other.db"  # a user's relative file too
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    sqlite_uri_form = "sqlite:///file:/abs/x.db?mode=ro&uri=true"  # SQLite's own URI form: not a relative path
    assert resolve_tracking_uri(sqlite_uri_form) == sqlite_uri_form
    prepared = resolve_dataset("digits", 8, None, cfg.data.cache_dir)
    places = [checkpoint_dir(cfg, "RUN"), check_checkpoint_root(cfg.mlflow.checkpoint_dir), in_workspace(TUNE_DIR),
              Path(FaultPlan.from_environment().marker_dir), prepared, classifier_cache_file(load_dataset(prepared))]
    for place in places:
        assert place.is_absolute() and place.is_relative_to(tmp_path / ".memshard"), place
    assert in_workspace("/elsewhere/ckpt") == Path("/elsewhere/ckpt")  # an absolute setting is kept


def test_a_sweep_trial_gets_the_drivers_absolute_places_wherever_it_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(tmp_path))
    base = build_config("tiny")
    places = absolute_places(base, tmp_path / "prepared")
    assert places == {"data.path": str(tmp_path / "prepared"), "data.cache_dir": str(tmp_path / ".memshard" / "data"),
                      "mlflow.checkpoint_dir": str(tmp_path / ".memshard" / "checkpoints")}
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(tmp_path / "a-trial-folder"))  # the trial resolves nothing itself
    trial = build_config("tiny", sets=[f"{key}={value}" for key, value in places.items()])
    assert checkpoint_dir(trial, "RUN") == tmp_path / ".memshard" / "checkpoints" / "RUN"


def test_a_saved_run_keeps_relative_defaults_and_a_resume_uses_this_machines_places(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(tmp_path))
    saved = to_dict(Config())
    assert saved["mlflow"]["checkpoint_dir"] == ".memshard/checkpoints"  # config.json pins no machine's folder
    assert saved["data"]["cache_dir"] == ".memshard/data"
    foreign = to_dict(build_config("tiny", sets=["mlflow.checkpoint_dir=/other-machine/ckpt",
                                                 "data.cache_dir=/other-machine/data"]))
    save_checkpoint(checkpoint_dir(Config(), "run1"), {"config": foreign, "dataset_fingerprint": "f",
                                                       "driver": {}, "owners": np.zeros(2, np.int64)}, keep_round=1)
    resumed = resume_config("run1", {}, [])
    assert (resumed.mlflow.checkpoint_dir, resumed.data.cache_dir) == (".memshard/checkpoints", ".memshard/data")
    assert checkpoint_dir(resumed, "run1") == tmp_path / ".memshard" / "checkpoints" / "run1"
    given = resume_config("run1", {}, [f"data.cache_dir={tmp_path / 'cache'}"])
    assert given.data.cache_dir == str(tmp_path / "cache")


def test_a_new_experiment_keeps_its_artifacts_under_the_root_wherever_the_process_runs(tmp_path, monkeypatch):
    """MLflow alone would put them in ./mlruns of the working directory at creation (a Tune trial's folder)."""
    import mlflow

    from memshard.orchestrator.tracking import connect_mlflow

    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir(), elsewhere.mkdir()
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(root))
    monkeypatch.chdir(elsewhere)
    previous = mlflow.get_tracking_uri()
    try:
        uri = resolve_tracking_uri(None)
        experiment_id = connect_mlflow(uri, "placed")
        assert connect_mlflow(uri, "placed") == experiment_id  # the second call finds it, creates nothing
        with mlflow.start_run(experiment_id=experiment_id):
            mlflow.log_text("x", "x.txt")
            artifacts = Path(mlflow.get_artifact_uri().removeprefix("file://"))
    finally:
        mlflow.set_tracking_uri(previous)
    assert (artifacts / "x.txt").is_file() and artifacts.is_relative_to(root / "mlruns")
    assert not any(elsewhere.iterdir())
