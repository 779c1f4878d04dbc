"""Failures: actors that die or stall, a driver that dies, NaN losses, bad input — all on real processes.

Faults are injected with a test-only plan (memshard.shard_worker.faults) in the MEMSHARD_TEST_FAULTS
environment variable, never through the run's configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import all_runs
from mlflow.tracking import MlflowClient
from safetensors.numpy import load_file

from memshard.commands.cli import main
from memshard.config import build_config
from memshard.errors import MemshardError
from memshard.orchestrator.checkpoint import CHECKPOINT_FILE, checkpoint_interval, load_checkpoint
from memshard.orchestrator.tracking import redact_uri
from memshard.orchestrator.train import checkpoint_dir, resume_config, train
from memshard.shard_worker.faults import FAULTS_ENV


def tiny(store: str, *sets: str):
    return build_config("tiny", overrides={"mlflow.tracking_uri": store}, sets=list(sets))


def inject(monkeypatch, **plan) -> None:
    """Faults for the runs this test starts in this process (a FaultPlan's fields)."""
    monkeypatch.setenv(FAULTS_ENV, json.dumps(plan))


def final_weights(result) -> dict[str, np.ndarray]:
    return load_file(str(result.local_pipeline / "unet" / "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def only_run(store: str):
    runs = all_runs(store)
    assert len(runs) == 1
    return runs[0]


@pytest.fixture(scope="module")
def reference_weights(ray_cluster, tmp_path_factory):
    """Final weights of an uninterrupted tiny run with 3 rounds, shared by the recovery tests."""
    where = tmp_path_factory.mktemp("reference")
    cfg = tiny(f"sqlite:///{where}/mlflow.db", "iet.rounds=3", "mlflow.register_as=reference",
               f"mlflow.checkpoint_dir={where}/checkpoints", f"data.cache_dir={where}/data")
    return final_weights(train(cfg, show_progress=False))


def test_an_actor_killed_mid_round_is_replaced_and_the_run_ends_as_if_nothing_happened(
    ray_cluster, mlflow_store, tmp_path, reference_weights, monkeypatch
):
    reference = reference_weights
    # tiny: 3 local steps per round, so global step 4 is inside round 2.
    inject(monkeypatch, shard=1, exit_at_steps=[4])
    cfg = tiny(mlflow_store, "iet.rounds=3")
    result = train(cfg, show_progress=False)
    client = MlflowClient(mlflow_store)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert not [name for name in run.data.params if "fault" in name]  # the run logs only real settings
    assert "fault" not in Path(client.download_artifacts(result.run_id, "config.json", str(tmp_path))).read_text()
    restarts = client.get_metric_history(result.run_id, "actor_restarts")
    assert [(m.step, m.value) for m in restarts] == [(2, 1.0)]
    assert (tmp_path / ".memshard" / "faults" / "exit-shard1-step4").exists()  # the process really exited
    assert_same_weights(final_weights(result), reference)  # recovery re-ran exactly what was lost


def test_a_stalled_shard_is_failed_after_the_round_timeout_and_replaced(ray_cluster, mlflow_store, tmp_path, monkeypatch):
    inject(monkeypatch, shard=0, stall_at_steps=[1])
    cfg = tiny(mlflow_store, "ray.round_timeout_s=10")
    result = train(cfg, show_progress=False)
    client = MlflowClient(mlflow_store)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert client.get_metric_history(result.run_id, "actor_restarts")[0].value == 1
    events = client.download_artifacts(result.run_id, "failures.json", str(tmp_path))
    assert "round_timeout_s" in Path(events).read_text()


def test_past_the_restart_budget_the_run_fails_cleanly_and_keeps_its_checkpoint(
    ray_cluster, mlflow_store, capsys, monkeypatch
):
    inject(monkeypatch, shard=0, exit_at_steps=[4, 5])
    code = main(["train", "--preset", "tiny", "--no-progress", "--rounds", "3",
                 "--set", f"mlflow.tracking_uri={mlflow_store}", "--set", "ray.max_actor_restarts=1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "shard 0 failed in round 2" in err and "ray.max_actor_restarts" in err
    run = only_run(mlflow_store)
    assert run.info.status == "FAILED"
    assert load_checkpoint(Path(".memshard/checkpoints") / run.info.run_id)["driver"]["rounds_done"] == 1
    assert not MlflowClient(mlflow_store).search_registered_models()


def test_a_nan_loss_names_the_shard_and_step_and_rolls_the_round_back(ray_cluster, mlflow_store, monkeypatch):
    inject(monkeypatch, shard=1, nan_at_step=4)
    cfg = tiny(mlflow_store, "iet.rounds=3")
    with pytest.raises(MemshardError, match="shard 1 produced a non-finite loss at step 4 in round 2") as error:
        train(cfg, show_progress=False)
    assert "\n" not in str(error.value)
    run = only_run(mlflow_store)
    assert run.info.status == "FAILED"
    state = load_checkpoint(checkpoint_dir(cfg, run.info.run_id))["driver"]
    assert state["rounds_done"] == 1 and all(np.isfinite(w).all() for w in state["weights"].values())


def train_until_the_driver_dies_after_round_one(ray_cluster, store: str, cwd, *sets: str,
                                                plan: dict | None = None) -> None:
    """`memshard train --preset tiny --rounds 3` in a process whose driver exits right after round 1's
    checkpoint (the test fault plan; `plan` replaces it), its run left RUNNING for a resume; `sets` are
    extra --set items."""
    plan = {"driver_exit_after_round": 1} if plan is None else plan
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, FAULTS_ENV: json.dumps(plan)}
    completed = subprocess.run(
        [sys.executable, "-m", "memshard.commands.cli", "train", "--preset", "tiny", "--no-progress", "--rounds", "3",
         "--set", f"mlflow.tracking_uri={store}", *(arg for item in sets for arg in ("--set", item))],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 3, completed.stderr[-2000:]  # the driver process died after round 1


def test_resume_after_the_driver_dies_equals_an_uninterrupted_run(ray_cluster, mlflow_store, tmp_path, reference_weights):
    reference = reference_weights
    train_until_the_driver_dies_after_round_one(ray_cluster, mlflow_store, tmp_path)
    run = only_run(mlflow_store)
    assert run.info.status == "RUNNING"

    cfg = resume_config(run.info.run_id, {}, [])
    result = train(cfg, show_progress=False, resume_run_id=run.info.run_id)
    assert result.run_id == run.info.run_id
    client = MlflowClient(mlflow_store)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert_same_weights(final_weights(result), reference)  # bitwise on CPU


def test_resume_rejects_changed_settings_and_missing_or_damaged_checkpoints(ray_cluster, mlflow_store, tmp_path, capsys):
    cfg = tiny(mlflow_store)
    result = train(cfg, show_progress=False)
    with pytest.raises(MemshardError, match="trained with data.resolution = 8; --resume keeps"):
        resume_config(result.run_id, {}, ["data.resolution=16"])
    assert resume_config(result.run_id, {}, ["ray.round_timeout_s=99"]).ray.round_timeout_s == 99
    with pytest.raises(MemshardError, match="no checkpoint"):
        resume_config("0123456789abcdef", {}, [])
    path = checkpoint_dir(cfg, result.run_id) / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:1000])
    code = main(["train", "--resume", result.run_id])
    err = capsys.readouterr().err
    assert code == 2 and "is damaged" in err and "Traceback" not in err


def test_checkpoints_hold_no_pickled_code_and_the_driver_file_names_the_proxies_files(ray_cluster, mlflow_store):
    cfg = tiny(mlflow_store, "mlflow.checkpoint_every=1")
    result = train(cfg, show_progress=False)
    directory = checkpoint_dir(cfg, result.run_id)
    torch.load(directory / CHECKPOINT_FILE, weights_only=True)  # raises on pickled objects
    for shard_file in directory.glob("round_*/shard_*.pt"):
        torch.load(shard_file, weights_only=True)
    driver = load_checkpoint(directory)["driver"]
    assert "workers" not in driver  # no proxy's state went through the driver
    manifest = driver["worker_files"]
    assert manifest["round"] == 2 and manifest["files"] == ["round_0002/shard_0.pt", "round_0002/shard_1.pt"]
    sizes = [(directory / name).stat().st_size for name in manifest["files"]]
    assert sizes == manifest["bytes"]
    # Each proxy file holds weights and two AdamW moments; the driver's file one copy of the weights.
    assert (directory / CHECKPOINT_FILE).stat().st_size < min(sizes)
    assert sorted(p.name for p in directory.glob("round_*")) == ["round_0002"]  # round 1's files went once 2's were in


def test_a_replacement_replays_the_rounds_since_the_last_checkpoint_exactly(
    ray_cluster, mlflow_store, tmp_path, reference_weights, monkeypatch
):
    # Checkpoints every 3 rounds: shard 1 dies in round 3 (global step 7) with no proxy file written yet,
    # so its replacement starts fresh (the round-0 state) and re-runs rounds 1 and 2 before round 3.
    inject(monkeypatch, shard=1, exit_at_steps=[7])
    cfg = tiny(mlflow_store, "iet.rounds=3", "mlflow.checkpoint_every=3")
    result = train(cfg, show_progress=False)
    assert (tmp_path / ".memshard" / "faults" / "exit-shard1-step7").exists()
    run = MlflowClient(mlflow_store).get_run(result.run_id)
    assert run.data.params["checkpoint_interval_rounds"] == "3"
    assert [(m.step, m.value) for m in MlflowClient(mlflow_store).get_metric_history(result.run_id, "actor_restarts")] \
        == [(3, 1.0)]
    assert_same_weights(final_weights(result), reference_weights)


def test_a_crash_before_the_manifest_keeps_the_previous_checkpoint_and_replay_reads_its_files(
    ray_cluster, mlflow_store, tmp_path, reference_weights, monkeypatch
):
    # The driver dies after the proxies wrote round 2's files, before checkpoint.pt named them.
    train_until_the_driver_dies_after_round_one(ray_cluster, mlflow_store, tmp_path,
                                                "mlflow.checkpoint_every=1", plan={"driver_exit_before_manifest": 2})
    run_id = only_run(mlflow_store).info.run_id
    directory = Path(".memshard/checkpoints") / run_id
    assert (directory / "round_0002" / "shard_1.pt").is_file()  # written, but not yet named
    assert load_checkpoint(directory)["driver"]["worker_files"]["round"] == 1

    # Resumed from round 1, checkpointing every 3 rounds: shard 0 dies in round 3 (global step 7), and
    # its replacement reads round 1's file and re-runs round 2 before round 3.
    inject(monkeypatch, shard=0, exit_at_steps=[7])
    cfg = resume_config(run_id, {}, ["mlflow.checkpoint_every=3"])
    result = train(cfg, show_progress=False, resume_run_id=run_id)
    assert (tmp_path / ".memshard" / "faults" / "exit-shard0-step7").exists()
    assert_same_weights(final_weights(result), reference_weights)  # bitwise on CPU
    assert sorted(p.name for p in directory.glob("round_*")) == ["round_0003"]


def test_the_auto_checkpoint_interval_follows_the_state_size():
    tiny_cfg = build_config("tiny")
    assert checkpoint_interval(tiny_cfg, 1, tiny_cfg.iet.shards) == 1  # about 2 MB per proxy
    published = build_config("cifar32", sets=["training.ema=true"])  # 35.7M parameters: 5.7 GB over 10 proxies
    assert checkpoint_interval(published, 3, 10) == 3
    assert checkpoint_interval(published, 3, 1) == 1
    assert checkpoint_interval(build_config("cifar32", sets=["mlflow.checkpoint_every=5"]), 3, 10) == 5
    with pytest.raises(MemshardError, match="mlflow.checkpoint_every = '0': use auto or a whole number"):
        build_config("tiny", sets=["mlflow.checkpoint_every=0"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "missing-folder"], "missing-folder"),
        (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
        (["--set", "iet.shards=-2"], "at least 1 shard"),
        (["--set", "iet.bogus=1"], "unknown key"),
        (["--set", "training.batch_size=many"], "wrong type"),
        (["--data", "one.npy", "--shards", "1"], "training needs at least 2"),
        (["--data", "corrupt.parquet"], "corrupt.parquet"),
        (["--set", "mlflow.tracking_uri=http://127.0.0.1:9"], "does not answer"),
        (["--set", "msr.rule=random"], "msr.rule = 'random' is not a destination rule: choose one of ring, least-familiar"),
        (["--set", "faults.shard=0"], "'faults.shard'"),  # fault injection is not a setting
    ],
)
def test_bad_input_is_one_line_and_starts_no_run(ray_cluster, mlflow_store, tmp_path, cli_rejects, args, message):
    np.save(tmp_path / "one.npy", np.zeros((1, 8, 8), dtype=np.uint8))
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    cli_rejects(["train", "--preset", "tiny", "--no-progress", "--set", f"mlflow.tracking_uri={mlflow_store}", *args],
                message)
    assert not all_runs(mlflow_store)  # these are caught before a run starts


def test_credentials_never_reach_logged_params():
    assert redact_uri("https://alice:s3cret@mlflow.example:5000/api") == "https://***@mlflow.example:5000/api"
    assert redact_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


@pytest.mark.slow
def test_soak_many_rounds_with_several_failures(ray_cluster, mlflow_store, monkeypatch):
    inject(monkeypatch, shard=2, exit_at_steps=[2, 8, 17, 29])
    cfg = tiny(mlflow_store, "iet.rounds=12", "iet.shards=3", "msr.schedule=every", "ray.max_actor_restarts=4")
    result = train(cfg, show_progress=False)
    client = MlflowClient(mlflow_store)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert client.get_metric_history(result.run_id, "actor_restarts")[-1].value == 4
    monkeypatch.delenv(FAULTS_ENV)
    reference = train(tiny(mlflow_store, "iet.rounds=12", "iet.shards=3", "msr.schedule=every"), show_progress=False)
    assert_same_weights(final_weights(result), final_weights(reference))
