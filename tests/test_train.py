"""`memshard train` end to end on the session's real Ray cluster, logging to a real MLflow store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from diffusers import DDPMPipeline
from mlflow.tracking import MlflowClient

from memshard.aggregation import weighted_average
from memshard.config import build_config
from memshard.data import load_dataset, resolve_dataset
from memshard.model import AUGMENTATION_EMBEDDING, AUGMENTATION_PARAMS
from memshard.orchestrator.rounds import start_shard_driver
from memshard.orchestrator.sharding import split_into_shards
from memshard.orchestrator.train import train


def tiny_config(store: str, *sets: str, **overrides):
    return build_config(
        "tiny",
        overrides={"mlflow.tracking_uri": store, **overrides},
        sets=list(sets),
    )


@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_train_finishes_logs_rounds_and_registers_a_model(ray_cluster, mlflow_store, shards):
    cfg = tiny_config(mlflow_store, **{"iet.shards": shards, "iet.rounds": 2})
    result = train(cfg, show_progress=False)

    client = MlflowClient(mlflow_store)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["shards"] == str(shards) and run.data.params["method"] == "iet-agc-plus"
    for metric in ("loss", "agc_kept_fraction", "samples_moved", "images_per_second", "time_train_s",
                   "time_gather_s", "time_aggregate_s", "time_broadcast_s", "shard_0_loss"):
        history = client.get_metric_history(result.run_id, metric)
        assert [m.step for m in history] == [1, 2], metric
    assert all(np.isfinite(m.value) for m in client.get_metric_history(result.run_id, "loss"))
    versions = client.search_model_versions(f"name='{cfg.mlflow.register_as}'")
    assert [str(v.version) for v in versions] == [result.registered_version] == ["1"]
    assert versions[0].run_id == result.run_id

    assignments = pq.read_table(mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="shard_assignments.parquet", tracking_uri=mlflow_store)).to_pandas()
    for round_index in (0, 1, 2):
        in_round = assignments[assignments["round"] == round_index]
        assert len(in_round) == 1797 and in_round["sample_id"].is_unique  # each sample in exactly one shard
        assert sorted(in_round["shard"].unique()) == list(range(shards))
    if shards > 1:  # MSR moved the configured fraction after round 1 (alternate schedule, not after the last)
        moved = client.get_metric_history(result.run_id, "samples_moved")
        sizes = assignments[assignments["round"] == 0].groupby("shard").size()
        assert moved[0].value == sum(round(0.25 * n) for n in sizes) and moved[1].value == 0
        before = assignments[assignments["round"] == 0].set_index("sample_id")["shard"]
        after = assignments[assignments["round"] == 1].set_index("sample_id")["shard"]
        assert (before != after.loc[before.index]).sum() == moved[0].value


def test_model_loads_through_pyfunc_and_diffusers(ray_cluster, mlflow_store, tmp_path):
    cfg = tiny_config(mlflow_store, **{"iet.shards": 2})
    first = train(cfg, show_progress=False)
    second = train(cfg, show_progress=False)
    assert (first.registered_version, second.registered_version) == ("1", "2")

    model = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.register_as}/2")
    images = model.predict({"num_images": 3, "seed": 7, "num_inference_steps": 4})
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, model.predict({"num_images": 3, "seed": 7, "num_inference_steps": 4}))

    local = mlflow.artifacts.download_artifacts(artifact_uri=second.model_uri, dst_path=str(tmp_path / "dl"))
    pipeline_dirs = [p.parent for p in (tmp_path / "dl").rglob("model_index.json")]
    assert local and len(pipeline_dirs) == 1
    pipeline = DDPMPipeline.from_pretrained(pipeline_dirs[0])
    assert pipeline.unet.config.sample_size == 8 and pipeline.unet.config.in_channels == 1


def test_least_familiar_rule_and_every_round_schedule(ray_cluster, mlflow_store):
    cfg = tiny_config(mlflow_store, "msr.rule=least-familiar", "msr.schedule=every", "msr.fraction=0.1",
                      "mlflow.sample_grid_every=2", "mlflow.sample_grid_steps=3", "data.balanced_by_label=true",
                      **{"iet.shards": 3, "iet.rounds": 3})
    result = train(cfg, show_progress=False)
    client = MlflowClient(mlflow_store)
    moved = [m.value for m in client.get_metric_history(result.run_id, "samples_moved")]
    assert moved[0] > 0 and moved[1] > 0 and moved[2] == 0  # no exchange after the last round
    assert moved[0] <= sum(round(0.1 * n) for n in (599, 599, 599))
    images = [a.path for a in client.list_artifacts(result.run_id, "images")]
    assert len([p for p in images if p.endswith(".png") and "samples" in p]) == 1  # the grid of round 2
    matrix = client.download_artifacts(result.run_id, "moves/round_0001.json")
    assert np.array(json.loads(Path(matrix).read_text())["from_rows_to_columns"]).sum() == moved[0]


def test_fedavg_equals_the_size_weighted_mean_of_the_actors_weights(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(tmp_path))
    cfg = build_config("tiny", sets=["iet.shards=3", "msr.schedule=every", "msr.exchange_averages=true"])
    dataset = load_dataset(resolve_dataset("digits", 8, None, tmp_path / "cache"))
    shards = split_into_shards(len(dataset), 3, seed=0)
    shards[0] = shards[0][:200]  # unequal sizes make the weighting visible
    shards[1] = np.sort(np.concatenate([shards[1], split_into_shards(len(dataset), 3, seed=0)[0][200:]]))
    with start_shard_driver(cfg, dataset.images, shards) as (driver, _):
        sizes = [len(s) for s in driver.shards]
        report = driver.run_round(1, is_last=False)
        held = ray.get([actor.get_weights.remote() for actor in driver.actors])  # local weights, not yet overwritten
        expected = weighted_average(list(zip(held, sizes, strict=True)))
        for name, value in expected.items():
            np.testing.assert_allclose(driver.weights[name], value, rtol=1e-6, atol=1e-7)
        unweighted = weighted_average([(w, 1) for w in held])
        assert any(not np.allclose(unweighted[n], expected[n]) for n in expected)
        assert report.samples_moved > 0 and sum(len(s) for s in driver.shards) == len(dataset)


def test_an_msr_exchange_round_does_not_average(ray_cluster, tmp_path, monkeypatch):
    """The published prototype (msr.exchange_averages false, schedule alternate): round 1 moves samples and
    leaves each proxy its own weights; round 2 averages; round 3 starts from that average."""
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(tmp_path))
    cfg = build_config("tiny", sets=["iet.rounds=3", "msr.exchange_averages=false"])
    dataset = load_dataset(resolve_dataset("digits", 8, None, tmp_path / "cache"))
    with start_shard_driver(cfg, dataset.images, split_into_shards(len(dataset), 2, seed=0)) as (driver, _):
        initial = dict(driver.weights)
        sizes = [len(s) for s in driver.shards]
        exchange = driver.run_round(1, is_last=False)
        held = ray.get([actor.get_weights.remote() for actor in driver.actors])
        average = weighted_average(list(zip(held, sizes, strict=True)))
        assert not exchange.averaged and exchange.samples_moved > 0
        assert any(not np.array_equal(held[0][n], held[1][n]) for n in held[0])  # the proxies differ
        assert any(not np.array_equal(held[0][n], average[n]) for n in average)  # and differ from their average
        assert all(np.array_equal(driver.weights[n], initial[n]) for n in initial)  # nothing aggregated
        assert all(np.array_equal(driver.model_weights[n], average[n]) for n in average)  # reported only

        sizes = [len(s) for s in driver.shards]
        averaging = driver.run_round(2, is_last=False)
        assert driver.rounds_since_saved[-1].weights_refs is None  # round 2 started from the proxies' own weights
        held = ray.get([actor.get_weights.remote() for actor in driver.actors])
        average = weighted_average(list(zip(held, sizes, strict=True)))
        assert averaging.averaged and averaging.samples_moved == 0
        for name, value in average.items():
            np.testing.assert_allclose(driver.weights[name], value, rtol=1e-6, atol=1e-7)
        assert driver.model_weights is driver.weights

        driver.run_round(3, is_last=True)
        broadcast = ray.get(driver.rounds_since_saved[-1].weights_refs[0])  # every proxy started round 3 from it
        for name, value in average.items():
            np.testing.assert_allclose(broadcast[name], value, rtol=1e-6, atol=1e-7)


def test_non_leaky_augmentation_trains_its_map_and_ships_a_plain_unet(ray_cluster, mlflow_store):
    cfg = tiny_config(mlflow_store, "taa.non_leaky=true", "iet.local_steps=8", **{"iet.shards": 2, "iet.rounds": 2})
    result = train(cfg, show_progress=False)
    assert MlflowClient(mlflow_store).get_run(result.run_id).data.params["taa.non_leaky"] == "True"
    pipeline = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.register_as}/{result.registered_version}")
    assert pipeline.predict({"num_images": 2, "seed": 0, "num_inference_steps": 3}).shape == (2, 8, 8, 1)
    dataset = load_dataset(resolve_dataset(cfg.data.path, 8, None, cfg.data.cache_dir))
    few = [np.arange(0, 24), np.arange(24, 48)]  # small shards: a sample comes back, augmented by its strength
    with start_shard_driver(cfg, dataset.images[:48], few) as (driver, _):
        for round_index in (1, 2):
            driver.run_round(round_index, is_last=round_index == 2)
        learned = driver.weights[AUGMENTATION_EMBEDDING]  # averaged like every weight; zero at the start
    assert learned.shape[1] == AUGMENTATION_PARAMS and np.abs(learned).max() > 0


def test_actors_spread_across_nodes_by_custom_resource(ray_cluster, mlflow_store):
    cfg = tiny_config(mlflow_store, "ray.actor_resources={worker_slot: 1}", **{"iet.shards": 2})
    result = train(cfg, show_progress=False)
    run = MlflowClient(mlflow_store).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["nodes"] == "2"


def test_ddpm_baseline_runs_through_the_same_path(ray_cluster, mlflow_store):
    cfg = tiny_config(mlflow_store, **{"iet.method": "ddpm", "iet.shards": 2})
    result = train(cfg, show_progress=False)
    client = MlflowClient(mlflow_store)
    run = client.get_run(result.run_id)
    assert run.data.params["shards"] == "1" and run.data.params["iet.local_steps"] == str(2 * 3)
    assert [m.value for m in client.get_metric_history(result.run_id, "agc_kept_fraction")] == [1.0, 1.0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shards", "5"], "5 shards for 3 samples"),
        (["--rounds", "0"], "at least 1 round"),
        (["--method", "magic"], "unknown method"),
        (["--set", "ray.cpus_per_actor=64"], "no node can hold one shard actor"),
    ],
)
def test_bad_training_input_is_a_one_line_error_and_leaves_no_running_run(
    ray_cluster, mlflow_store, tmp_path, cli_rejects, args, message
):
    np.save(tmp_path / "three.npy", np.random.default_rng(0).integers(0, 255, (3, 8, 8), dtype=np.uint8))
    cli_rejects(["train", "--preset", "tiny", "--data", str(tmp_path / "three.npy"), "--no-progress",
                 "--set", f"mlflow.tracking_uri={mlflow_store}", "--shards", "2", *args], message)


@pytest.mark.integration
def test_cli_prints_the_run_the_version_and_the_ui_command(tmp_path):
    """The real console script in a fresh process (its own local Ray): the README's first command."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    completed = subprocess.run(
        [sys.executable, "-m", "memshard.commands.cli", "train", "--preset", "tiny", "--no-progress",
         "--set", f"mlflow.tracking_uri={store}", "--register-as", "cli-model"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "registered model: cli-model version 1" in completed.stdout
    assert f"mlflow ui --backend-store-uri {store}" in completed.stdout
    assert "round 2/2" in completed.stderr
