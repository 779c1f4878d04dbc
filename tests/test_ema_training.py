"""The EMA (`training.ema`) inside training: each proxy's EMA averaged by the driver, the averaged EMA
registered as the model, and carried through a checkpoint and resume — on the session's real Ray
cluster and a real MLflow store."""

from __future__ import annotations

import numpy as np
import ray
from conftest import all_runs
from test_reliability import assert_same_weights, final_weights, train_until_the_driver_dies_after_round_one
from test_server_optimizer_training import tiny

from memshard.aggregation import weighted_average
from memshard.config import build_config
from memshard.data import load_dataset, resolve_dataset
from memshard.orchestrator.rounds import start_shard_driver
from memshard.orchestrator.sharding import split_into_shards
from memshard.orchestrator.train import resume_config, train


def test_the_driver_averages_the_proxies_emas_by_shard_size(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(tmp_path))
    cfg = build_config("tiny", sets=["iet.shards=3", "training.ema=true", "iet.local_steps=4"])
    dataset = load_dataset(resolve_dataset("digits", 8, None, tmp_path / "cache"))
    shards = split_into_shards(len(dataset), 3, seed=0)
    shards[1], shards[2] = shards[1][:300], np.sort(np.concatenate([shards[2], shards[1][300:]]))  # unequal sizes
    with start_shard_driver(cfg, dataset.images, shards) as (driver, _):
        assert_same_weights(driver.model_weights, driver.weights)  # the EMA starts at the initial weights
        for round_index in (1, 2):
            sizes = [len(s) for s in driver.shards]
            driver.run_round(round_index, is_last=round_index == 2)
        held = ray.get([actor.get_ema_weights.remote() for actor in driver.actors])
        assert_same_weights(driver.ema_weights, weighted_average(list(zip(held, sizes, strict=True))))  # bitwise
        assert driver.model_weights is driver.ema_weights
        assert any(not np.allclose(driver.ema_weights[n], w) for n, w in driver.weights.items())


def test_a_resumed_ema_run_registers_the_ema_of_an_uninterrupted_one(ray_cluster, mlflow_store, tmp_path):
    reference = train(tiny(mlflow_store, "iet.rounds=3", "training.ema=true", "mlflow.register_as=reference"),
                      show_progress=False)
    plain = train(tiny(mlflow_store, "iet.rounds=3", "mlflow.register_as=plain"), show_progress=False)
    # The EMA does not change training, so the plain run's weights are the EMA run's raw weights: the
    # two registered models differ only if the EMA run registered its EMA.
    assert any(not np.array_equal(a, b) for a, b in zip(final_weights(reference).values(),
                                                        final_weights(plain).values(), strict=True))

    train_until_the_driver_dies_after_round_one(ray_cluster, mlflow_store, tmp_path,
                                                "mlflow.register_as=resumed", "training.ema=true")
    run_id = next(r.info.run_id for r in all_runs(mlflow_store) if r.info.status == "RUNNING")
    result = train(resume_config(run_id, {}, []), show_progress=False, resume_run_id=run_id)
    assert_same_weights(final_weights(result), final_weights(reference))  # bitwise on CPU
