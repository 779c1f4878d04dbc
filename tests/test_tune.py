"""`memshard tune` on the test cluster: a tiny sweep on Ray Tune, its MLflow runs, table, picture and
config file; a trial that fails leaves the sweep finished; shard actors go into a trial's own group; on a
cluster with GPUs (simulated: nodes that declare them) the trial's driver, which measures, holds one too."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray import cloudpickle, tune
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from memshard.commands.cli import main
from memshard.config import build_config
from memshard.errors import MemshardError
from memshard.orchestrator.cluster import assigned_device, node_resources, place_actors, release
from memshard.orchestrator.registry import KIND_TAG, SOURCE_RUN_TAG
from memshard.tuning.space import Trial
from memshard.tuning.sweep import placement, trial_bundles
from memshard.tuning.trial import GUARD_TAG, SWEEP_TAG, TRIAL_TAG

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the remote code below ships with the test


@ray.remote
class _Probe:
    def where(self) -> dict:
        context = ray.get_runtime_context()
        return {"group": context.get_placement_group_id(), "resources": context.get_assigned_resources(),
                "gpu_ids": ray.get_gpu_ids()}


@ray.remote
def _place_two_inside():
    actors, group, resources, _ = place_actors(build_config("tiny"), 2, _Probe, lambda k, r: ())
    where = ray.get([actor.where.remote() for actor in actors])
    release(actors, group)  # must leave the caller's group alone
    return {"owned_group": group, "cpus": resources.cpus, "where": where,
            "caller_group": ray.get_runtime_context().get_placement_group_id()}


def test_place_actors_inside_a_placement_group_uses_its_last_bundles(ray_cluster):
    """As in a Tune trial: an empty-ish bundle for the caller, K bundles for the actors, no second group."""
    group = placement_group([{"CPU": 0.25}, {"CPU": 0.5}, {"CPU": 0.5}], strategy="PACK")
    ray.get(group.ready(), timeout=60)
    groups_before = len(placement_group_table())
    try:
        found = ray.get(_place_two_inside.options(
            num_cpus=0.25, scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote(), timeout=120)
        assert found["owned_group"] is None and found["cpus"] == 0.5
        assert all(w["group"] == found["caller_group"] == group.id.hex() for w in found["where"])
        assert all(w["resources"].get("CPU") == 0.5 for w in found["where"])
        assert len(placement_group_table()) == groups_before
        assert placement_group_table(group)["state"] == "CREATED"  # released actors, kept the group
    finally:
        remove_placement_group(group)


def _trial(shards: int, *sets: str) -> Trial:
    return Trial("t00", {}, build_config("tiny", sets=[f"iet.shards={shards}", *sets]))


def _holds(nodes: list[dict[str, float]], bundle: dict[str, float]) -> int:
    """How many of these alike bundles the nodes hold, node by node."""
    return sum(min(int(node.get(name, 0.0) / amount + 1e-9) for name, amount in bundle.items()) for node in nodes)


TWO_GPU_NODES = [{"CPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]  # a CPU head, 2 nodes x 1 GPU


@pytest.mark.parametrize(("shards", "share"), [(2, 0.5), (4, 0.33)])
def test_on_gpus_the_trials_measurement_holds_a_gpu_share_and_the_group_fits(shards, share):
    """K actors and the driver share the 2 GPUs as K + 1 processes: 3 -> 1/2 GPU each, 5 -> 1/3."""
    bundles = trial_bundles(_trial(shards), TWO_GPU_NODES)
    assert bundles == [{"CPU": 1.0, "GPU": share}] * (shards + 1)
    assert _holds(TWO_GPU_NODES, bundles[0]) >= len(bundles)
    assert placement({"trial": {"bundles": bundles, "strategy": "PACK"}}).bundles == bundles


@pytest.mark.parametrize(("nodes", "sets"), [
    ([{"CPU": 2.0}, {"CPU": 1.0}, {"CPU": 1.0}], []),  # a CPU-only cluster
    (TWO_GPU_NODES, ["ray.gpus_per_actor=0"]),  # actors kept off the GPUs: so is the measurement
])
def test_without_gpu_actors_nothing_asks_for_a_gpu_and_the_driver_bundle_is_empty(nodes, sets):
    bundles = trial_bundles(_trial(2, *sets), nodes)
    assert bundles[0] == {} and len(bundles) == 3 and not any("GPU" in b for b in bundles)


def test_a_trial_whose_measurement_cannot_have_a_gpu_beside_its_actors_is_one_line():
    """One whole GPU per actor on 2 GPUs: 2 actors would fit, 2 and the measurement do not."""
    with pytest.raises(MemshardError) as raised:
        trial_bundles(_trial(2, "ray.gpus_per_actor=1"), TWO_GPU_NODES)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("trial t00 ")
    assert "its measurement holds a GPU bundle like a shard actor's" in message
    assert "the nodes hold 2; use --shards 1 or fewer" in message and "lower ray.gpus_per_actor" in message
    with pytest.raises(MemshardError, match=r"the nodes hold 1; lower ray.gpus_per_actor"):  # no --shards 0
        trial_bundles(_trial(1, "ray.gpus_per_actor=1"), [{"CPU": 4.0, "GPU": 1.0}])


def _gpu_trial(config: dict) -> None:
    """A Tune trial's driver without the training: what Ray gave it, and where its shard actors went."""
    actors, group, resources, _ = place_actors(build_config("tiny"), config["shards"], _Probe, lambda k, r: ())
    where = ray.get([actor.where.remote() for actor in actors])
    release(actors, group)
    tune.report({"gpu_ids": [str(i) for i in ray.get_gpu_ids()], "device": assigned_device(),
                 "cuda": torch.cuda.is_available(), "actor_gpus": [w["resources"].get("GPU", 0.0) for w in where],
                 "actor_gpu_ids": [len(w["gpu_ids"]) for w in where]})


def test_a_trial_on_gpu_nodes_is_placed_and_its_driver_sees_a_gpu(ray_cluster, gpu_nodes, tmp_path):
    """Through Ray Tune as `memshard tune` runs it: the group is placed, the driver gets a GPU id from
    Ray (and measures on cuda exactly when torch can use it), its 2 actors a GPU share each."""
    bundles = trial_bundles(_trial(2), node_resources())
    assert bundles == [{"CPU": 0.5, "GPU": 0.5}] * 3  # the GPU nodes' 2 CPUs and 2 GPUs shared by 3
    tuner = tune.Tuner(tune.with_resources(_gpu_trial, resources=placement),
                       param_space={"trial": {"bundles": bundles, "strategy": "PACK"}, "shards": 2},
                       run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0))
    result = tuner.fit()[0]
    assert result.error is None, result.error
    seen = result.metrics
    assert len(seen["gpu_ids"]) == 1 and seen["device"] == ("cuda" if seen["cuda"] else "cpu")
    assert seen["actor_gpus"] == [0.5, 0.5] and seen["actor_gpu_ids"] == [1, 1]


def test_a_tiny_sweep_logs_its_trials_chooses_registers_and_its_config_trains(ray_cluster, mlflow_store, tmp_path,
                                                                              monkeypatch, capsys):
    """Reference ddpm + two iet-agc-plus trials, one with a learning rate that blows the loss up inside
    the trial: the sweep finishes, that trial is FAILED in Tune and MLflow, and the choice is made."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    grid = tmp_path / "grid.yaml"
    grid.write_text("iet.method: [iet-agc-plus]\ntraining.learning_rate: [0.0002, 1.0e+30]\n")
    code = main(["tune", "--preset", "tiny", "--grid", str(grid), "--max-quality-loss", "10%", "--num-images", "32",
                 "--sampling-steps", "10", "--register-as", "tuned", "--experiment", "tune-test"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in out and "trials: " in err and "best within budget" in err

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get(KIND_TAG) == "tune")
    assert parent.info.status == "FINISHED" and f"MLflow parent run: {parent.info.run_id}" in out
    trials = {r.data.tags[TRIAL_TAG]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(trials) == ["t00", "t01", "t02"]
    assert all(r.data.tags[SWEEP_TAG] == parent.info.run_id for r in trials.values())
    failed = [name for name, r in trials.items() if r.info.status == "FAILED"]
    assert failed == ["t02"] and "non-finite loss" in trials["t02"].data.tags["memshard.tune.error"]
    assert trials["t00"].data.params["method"] == "ddpm" and trials["t00"].info.status == "FINISHED"
    for name in ("t00", "t01"):  # each finished trial: its training run, its evaluation linked to it
        run_id = trials[name].info.run_id
        evaluations = [r for r in runs if r.data.tags.get(SOURCE_RUN_TAG) == run_id]
        assert len(evaluations) == 1 and evaluations[0].data.tags["mlflow.parentRunId"] == run_id
        history = client.get_metric_history(evaluations[0].info.run_id, "r_copied_training_samples")
        assert sorted(m.step for m in history) == [1, 2]  # a point per round of the tiny preset
        assert client.get_metric_history(run_id, "tune.frechet")

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.md", "trials.csv", "points.csv", "tradeoff.png", "choice.json", "chosen_config.yaml"} <= artifacts
    table = client.download_artifacts(parent.info.run_id, "trials.md", str(tmp_path))
    rows = [line for line in open(table).read().splitlines() if line.startswith("| t0")]
    assert len(rows) == 3 and "FAILED" in rows[2] and "non-finite loss" in rows[2]
    choice = json.load(open(client.download_artifacts(parent.info.run_id, "choice.json", str(tmp_path))))
    chosen, budget = choice["chosen"], choice["budget"]
    assert chosen["trial"] in ("t00", "t01") and chosen["frechet"] <= budget["max_frechet"]
    assert choice["reference"]["trial"] == "t00" and choice["reference"]["round"] == 2
    assert all(p["frechet"] <= budget["max_frechet"] for p in choice["within_budget"])
    assert all(p["training_images_nearly_copied"] >= chosen["training_images_nearly_copied"] for p in choice["within_budget"])
    near = client.get_metric_history(trials[chosen["trial"]].info.run_id, "tune.copied_near")  # what the choice minimized
    assert next(m.value for m in near if m.step == chosen["round"]) == chosen["training_images_nearly_copied"]
    assert f"chosen: {chosen['trial']} stopped at round {chosen['round']}" in out

    version = client.get_model_version("tuned", "1")
    assert version.run_id == trials[chosen["trial"]].info.run_id
    assert version.tags["memshard.tune.round"] == str(chosen["round"])

    config_file = next(line.split()[2] for line in out.splitlines() if line.startswith("config file: "))
    code = main(["train", "--config", config_file, "--preset", "tiny", "--experiment", "from-tune", "--no-progress"])
    trained = capsys.readouterr()
    assert code == 0, trained.err
    run_id = next(line.split()[-1] for line in trained.out.splitlines() if line.startswith("run id: "))
    params = client.get_run(run_id).data.params
    assert params["iet.rounds"] == str(chosen["round"]) and params["method"] == trials[chosen["trial"]].data.params["method"]


def test_guard_settings_in_a_grid_are_measured_on_the_one_trained_model(ray_cluster, mlflow_store, tmp_path,
                                                                        monkeypatch, capsys):
    """1 training setting x guard.mode [off, reject]: one training run, and per measured round two points,
    each its own evaluation run; rejection never leaves more near copies than the plain generations, and
    its threshold is the measurement's near-copy threshold."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    grid = tmp_path / "grid.yaml"
    grid.write_text("iet.method: [ddpm]\nguard.mode: [off, reject]\n")
    code = main(["tune", "--preset", "tiny", "--grid", str(grid), "--num-images", "32", "--sampling-steps", "10",
                 "--experiment", "tune-guard"])
    out, err = capsys.readouterr()
    assert code == 0, err

    client = MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("tune-guard").experiment_id])
    parent = next(r for r in runs if r.data.tags.get(KIND_TAG) == "tune")
    trained = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trained) == 1 and trained[0].info.status == "FINISHED"  # trained once
    evaluations = {r.data.tags[GUARD_TAG]: r for r in runs if r.data.tags.get(SOURCE_RUN_TAG) == trained[0].info.run_id}
    reject = "reject (max_redraws=8, quantile=0.05)"
    assert sorted(evaluations) == sorted(["off", reject])
    assert evaluations["off"].data.params["guard.mode"] == "off"
    guarded = evaluations[reject]
    assert guarded.data.params["guard.mode"] == "reject"
    assert float(guarded.data.params["guard.sq_distance"]) == guarded.data.metrics["near_copy_sq_distance"]
    assert [m.value for m in client.get_metric_history(guarded.info.run_id, "guard.generations")] == [32, 32]

    points = list(csv.DictReader(open(client.download_artifacts(parent.info.run_id, "points.csv", str(tmp_path)))))
    assert sorted((p["round"], p["guard"]) for p in points) == [("1", "off"), ("1", reject), ("2", "off"), ("2", reject)]
    for round_ in ("1", "2"):
        near = {p["guard"]: float(p["generations_near_copies"]) for p in points if p["round"] == round_}
        assert near[reject] <= near["off"]
    choice = json.load(open(client.download_artifacts(parent.info.run_id, "choice.json", str(tmp_path))))
    assert choice["reference"]["guard"] == "off" and choice["chosen"] is not None
    config_file = next(line.split()[2] for line in out.splitlines() if line.startswith("config file: "))
    chosen_guard = "reject" if choice["chosen"]["guard"] == reject else "off"
    assert build_config("tiny", config_file).guard.mode == chosen_guard


@pytest.mark.parametrize(("args", "message"), [
    (["--max-quality-loss", "ten"], "--max-quality-loss"),
    (["--trials", "0"], "--trials 0"),
    (["--set", "agc.lam=-1"], "agc.lam"),
    (["--num-images", "1"], "--num-images 1"),
])
def test_bad_input_is_one_line_before_any_work(cli_rejects, args, message):
    cli_rejects(["tune", "--preset", "tiny", *args], message)
