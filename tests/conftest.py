"""Shared fixtures: one real local Ray cluster per test session (a head and two worker nodes, so
multi-node placement is tested on the same cluster), and a real MLflow store in a temp dir per test."""

from __future__ import annotations

import os

import mlflow
import pytest


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (soak tests)")


# A test that uses any of these starts Ray, an MLflow store or a training run: the `integration` lane.
INTEGRATION_FIXTURES = {"ray_cluster", "gpu_nodes", "job_cluster", "mlflow_store", "cli_rejects", "experiment_id"}


def pytest_collection_modifyitems(config, items):
    """Mark integration tests by what they use, so `-m "not integration"` answers in seconds."""
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """A head node (2 CPUs) and two worker nodes (1 CPU each, custom resource `worker_slot`)."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"worker_slot": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def gpu_nodes(ray_cluster):
    """Two worker nodes of one GPU each (1 CPU), joined to the session's cluster for one test. The GPUs
    are declared to Ray, a logical resource (exactly what Ray schedules on); torch sees no CUDA device."""
    import time

    from memshard.orchestrator.cluster import node_resources

    nodes = [ray_cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    ray_cluster.wait_for_nodes()
    yield nodes
    for node in nodes:
        ray_cluster.remove_node(node)
    deadline = time.monotonic() + 60  # later tests must see the CPU-only cluster again
    while any(n.get("GPU") for n in node_resources()) and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store in tmp_path, which is also memshard's workspace (caches, checkpoints).
    The test runs in tmp_path too: memshard's experiments keep their artifacts under the workspace root,
    but MLflow's own Default experiment, which tests that call mlflow directly use, keeps them in
    ./mlruns of the working directory."""
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    yield uri
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


def all_runs(store: str):
    """Every run in every experiment of an MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


@pytest.fixture
def cli_rejects(mlflow_store, capsys):
    """Run `memshard ARGV` in-process and check what every user-fixable failure must look like:
    exit 2, exactly one `error: ...` line holding `message` and ending stderr, no traceback, no run
    left RUNNING and nothing registered. Returns the error line."""
    from mlflow.tracking import MlflowClient

    from memshard.commands.cli import main

    def run(argv: list[str], message: str) -> str:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0] and err.rstrip().endswith(errors[0]), err
        assert all(run.info.status != "RUNNING" for run in all_runs(mlflow_store))
        assert not MlflowClient(mlflow_store).search_registered_models()
        return errors[0]

    return run


def untrained_tiny_pipeline():
    """A tiny pipeline with seeded untrained weights: what it draws is noise-like, but always the same."""
    import torch

    from memshard.config import build_config
    from memshard.model import build_unet, state_to_numpy
    from memshard.pipeline import build_pipeline

    cfg = build_config("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_unet(cfg, 1)
    return build_pipeline(cfg, 1, state_to_numpy(unet))
