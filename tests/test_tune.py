"""`memshard tune` on the test cluster: a tiny sweep on Ray Tune, its MLflow runs, table, picture and
config file; a trial that fails leaves the sweep finished; shard actors go into a trial's own group."""

from __future__ import annotations

import json
import sys

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray import cloudpickle
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from memshard.cli import main
from memshard.config import build_config
from memshard.orchestrator.cluster import place_actors, release
from memshard.orchestrator.registry import KIND_TAG, SOURCE_RUN_TAG
from memshard.tuning.sweep import SWEEP_TAG, TRIAL_TAG

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the remote code below ships with the test


@ray.remote
class _Probe:
    def where(self) -> dict:
        context = ray.get_runtime_context()
        return {"group": context.get_placement_group_id(), "resources": context.get_assigned_resources()}


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


@pytest.mark.parametrize(("args", "message"), [
    (["--max-quality-loss", "ten"], "--max-quality-loss"),
    (["--trials", "0"], "--trials 0"),
    (["--set", "agc.lam=-1"], "agc.lam"),
    (["--num-images", "1"], "--num-images 1"),
])
def test_bad_input_is_one_line_before_any_work(cli_rejects, args, message):
    cli_rejects(["tune", "--preset", "tiny", *args], message)
