"""The server optimizers (method.md §8) inside training: config, the driver's aggregate phase, the
checkpoint and resume — on the session's real Ray cluster and a real MLflow store."""

from __future__ import annotations

import re

import numpy as np
import pytest
import ray
from conftest import all_runs
from mlflow.tracking import MlflowClient
from test_reliability import assert_same_weights, final_weights, train_until_the_driver_dies_after_round_one

from memshard.aggregation import weighted_average
from memshard.config import build_config
from memshard.data import load_dataset, resolve_dataset
from memshard.errors import MemshardError
from memshard.files import workspace_root
from memshard.orchestrator.checkpoint import load_checkpoint
from memshard.orchestrator.rounds import start_shard_driver
from memshard.orchestrator.settings import check, server_hyperparameters
from memshard.orchestrator.sharding import split_into_shards
from memshard.orchestrator.train import checkpoint_dir, resume_config, train
from memshard.tuning.curves import method_config, parse_method
from memshard.tuning.space import trial_config


def tiny(store: str, *sets: str):
    return build_config("tiny", overrides={"mlflow.tracking_uri": store}, sets=list(sets))


# ---------------------------------------------------------------- settings (no Ray)


def test_the_default_is_plain_fedavg_and_unset_hyperparameters_take_the_optimizers_defaults():
    assert build_config("tiny").aggregation.server_optimizer == "fedavg"
    assert server_hyperparameters(build_config("tiny")) == {}
    adam = build_config("tiny", sets=["aggregation.server_optimizer=fedadam", "aggregation.eta=0.03"])
    assert server_hyperparameters(adam) == {"eta": 0.03, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-9}
    yogi = build_config("tiny", sets=["aggregation.server_optimizer=fedyogi"])
    assert server_hyperparameters(yogi) == {"eta": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    momentum = build_config("tiny", sets=["aggregation.server_optimizer=fedavgm"])
    assert server_hyperparameters(momentum) == {"server_learning_rate": 1.0, "server_momentum": 0.9}


@pytest.mark.parametrize("sets, message", [
    (["aggregation.server_optimizer=adam"],
     "aggregation.server_optimizer = 'adam' is not a server optimizer: choose one of fedavg, fedavgm, fedadam, fedyogi"),
    (["aggregation.server_optimizer=fedavgm", "aggregation.eta=0.1"],
     "aggregation.eta is not a setting of the server optimizer fedavgm (it takes server_learning_rate, server_momentum)"),
    (["aggregation.server_momentum=0.5"], "aggregation.server_momentum is not a setting of the server optimizer fedavg (it takes none)"),
])
def test_an_unknown_optimizer_or_a_setting_it_does_not_take_is_one_line(sets, message):
    with pytest.raises(MemshardError, match="^" + re.escape(message)) as error:
        server_hyperparameters(build_config("tiny", sets=sets))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("sets, message", [
    (["aggregation.server_optimizer=fedavgm", "aggregation.server_momentum=1.0"],
     "aggregation.server_momentum = 1.0: must be in [0, 1)"),
    (["aggregation.server_optimizer=fedyogi", "aggregation.beta_2=-0.1"], "aggregation.beta_2 = -0.1: must be in [0, 1)"),
    (["aggregation.server_optimizer=fedadam", "aggregation.eta=0"], "aggregation.eta = 0.0: must be > 0"),
    (["aggregation.server_optimizer=fedadam", "aggregation.tau=-0.001"], "aggregation.tau = -0.001: must be > 0"),
])
def test_out_of_range_hyperparameters_are_one_line_errors(sets, message):
    with pytest.raises(MemshardError, match="^" + re.escape(message)):
        check(build_config("tiny", sets=sets))


# Every entry point that trains, each given the same --set items: all go through orchestrator.settings.check.
ENTRY_POINTS = {
    "train": lambda sets: train(build_config("tiny", sets=sets)),
    "tune trial": lambda sets: trial_config("tiny", {}, sets, {}, where="--grid g.yaml"),
    "efficacy bench": lambda sets: method_config("tiny", parse_method("ddpm"), 0, 2, sets),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("sets, message", [
    (["msr.rule=nearest"], "msr.rule = 'nearest' is not a destination rule: choose one of ring, least-familiar"),
    (["aggregation.server_optimizer=adam"], "aggregation.server_optimizer = 'adam' is not a server optimizer"),
    (["aggregation.server_optimizer=fedavgm", "aggregation.eta=0.1"],
     "aggregation.eta is not a setting of the server optimizer fedavgm"),
    (["aggregation.server_optimizer=fedadam", "aggregation.beta_1=1"], "aggregation.beta_1 = 1.0: must be in [0, 1)"),
])
def test_every_entry_point_checks_the_rule_and_the_server_optimizer_before_any_work(entry, sets, message):
    with pytest.raises(MemshardError, match=re.escape(message)) as error:
        ENTRY_POINTS[entry](sets)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- training


def test_default_fedavg_sets_exactly_the_size_weighted_average(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(tmp_path))
    cfg = build_config("tiny", sets=["iet.shards=3"])
    dataset = load_dataset(resolve_dataset("digits", 8, None, tmp_path / "cache"))
    shards = split_into_shards(len(dataset), 3, seed=0)
    shards[1], shards[2] = shards[1][:300], np.sort(np.concatenate([shards[2], shards[1][300:]]))  # unequal sizes
    with start_shard_driver(cfg, dataset.images, shards) as (driver, _):
        sizes = [len(s) for s in driver.shards]
        driver.run_round(1, is_last=True)
        held = ray.get([actor.get_weights.remote() for actor in driver.actors])
        assert_same_weights(driver.weights, weighted_average(list(zip(held, sizes, strict=True))))  # bitwise
        assert driver.server_state.rounds == 1 and not driver.server_state.m and not driver.server_state.v


def test_fedavgm_without_momentum_at_unit_rate_trains_bitwise_like_fedavg(ray_cluster, mlflow_store):
    plain = train(tiny(mlflow_store, "iet.rounds=3"), show_progress=False)
    momentum = train(tiny(mlflow_store, "iet.rounds=3", "aggregation.server_optimizer=fedavgm",
                          "aggregation.server_momentum=0", "aggregation.server_learning_rate=1"), show_progress=False)
    assert_same_weights(final_weights(momentum), final_weights(plain))
    params = MlflowClient(mlflow_store).get_run(momentum.run_id).data.params
    assert params["aggregation.server_optimizer"] == "fedavgm"
    assert (params["aggregation.server_momentum"], params["aggregation.server_learning_rate"]) == ("0.0", "1.0")
    adam_params = MlflowClient(mlflow_store).get_run(
        train(tiny(mlflow_store, "aggregation.server_optimizer=fedadam"), show_progress=False).run_id).data.params
    assert adam_params["aggregation.eta"] == "0.1" and adam_params["aggregation.tau"] == "1e-09"  # the defaults used


def test_resume_with_fedadam_equals_an_uninterrupted_run(ray_cluster, mlflow_store, tmp_path):
    adam = ("aggregation.server_optimizer=fedadam", "aggregation.eta=0.01")
    reference = train(tiny(mlflow_store, "iet.rounds=3", "aggregation.server_optimizer=fedadam",
                           "aggregation.eta=0.01", "mlflow.register_as=reference"), show_progress=False)
    fedavg = train(tiny(mlflow_store, "iet.rounds=3", "mlflow.register_as=fedavg"), show_progress=False)
    assert any(not np.array_equal(a, b) for a, b in zip(final_weights(reference).values(),
                                                        final_weights(fedavg).values(), strict=True))

    train_until_the_driver_dies_after_round_one(ray_cluster, mlflow_store, tmp_path, "mlflow.register_as=resumed", *adam)
    run = [r for r in all_runs(mlflow_store) if r.info.status == "RUNNING"]
    assert len(run) == 1
    run_id = run[0].info.run_id
    saved = load_checkpoint(checkpoint_dir(tiny(mlflow_store), run_id))["driver"]["server_state"]
    assert int(saved["rounds"]) == 1 and any(k.startswith("m/") for k in saved) and any(k.startswith("v/") for k in saved)

    result = train(resume_config(run_id, {}, []), show_progress=False, resume_run_id=run_id)
    assert MlflowClient(mlflow_store).get_run(run_id).info.status == "FINISHED"
    assert_same_weights(final_weights(result), final_weights(reference))  # bitwise on CPU


def test_an_unknown_server_optimizer_is_one_line_and_starts_no_run(mlflow_store, cli_rejects):
    cli_rejects(["train", "--preset", "tiny", "--no-progress", "--set", f"mlflow.tracking_uri={mlflow_store}",
                 "--set", "aggregation.server_optimizer=adam"],
                "aggregation.server_optimizer = 'adam' is not a server optimizer: choose one of fedavg")
    assert not all_runs(mlflow_store)
    assert not (workspace_root() / ".memshard" / "checkpoints").exists()  # stopped before any work
