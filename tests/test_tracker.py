"""The tracker's retry rule against real failures: a programming error or a refusal surfaces on the
first call; a refused connection and a locked sqlite store are tried again."""

from __future__ import annotations

import socket
import sqlite3

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from memshard.orchestrator.tracking import Tracker, is_transient


def counted(action, calls: list):
    """`action` itself, each call recorded in `calls`."""

    def call(*args, **kwargs):
        calls.append(len(calls) + 1)
        return action(*args, **kwargs)

    return call


def test_a_type_error_surfaces_on_the_first_call():
    calls: list = []
    with pytest.raises(TypeError):
        Tracker().call(counted(mlflow.log_metric, calls), "loss")  # the value is missing
    assert calls == [1]


def test_a_missing_run_surfaces_on_the_first_call(mlflow_store):
    calls: list = []
    with pytest.raises(MlflowException) as raised:
        Tracker().call(counted(MlflowClient(mlflow_store).get_run, calls), "0" * 32)
    assert raised.value.error_code == "RESOURCE_DOES_NOT_EXIST" and calls == [1]


def closed_loopback_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def test_a_refused_connection_is_tried_again(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries take minutes
    client = MlflowClient(f"http://127.0.0.1:{closed_loopback_port()}")
    calls: list = []
    with pytest.raises(MlflowException) as raised:
        Tracker(attempts=3, first_delay_s=0.01).call(counted(client.search_experiments, calls))
    assert calls == [1, 2, 3] and is_transient(raised.value)


def test_a_locked_sqlite_file_is_transient_and_a_missing_table_is_not(tmp_path):
    path = tmp_path / "store.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE metrics (value REAL)")
    holder.execute("BEGIN EXCLUSIVE")
    writer = sqlite3.connect(path, timeout=0)
    with pytest.raises(sqlite3.OperationalError) as locked:
        writer.execute("INSERT INTO metrics VALUES (1.0)")
    holder.rollback()
    with pytest.raises(sqlite3.OperationalError) as missing:
        writer.execute("INSERT INTO params VALUES (1.0)")
    assert is_transient(locked.value) and not is_transient(missing.value)


def test_a_metric_logged_while_another_writer_locks_the_store_is_logged_on_the_next_try(mlflow_store, tmp_path):
    """MLflow waits 20 s for the lock (its sqlite busy_timeout), then raises TEMPORARILY_UNAVAILABLE."""
    mlflow.set_tracking_uri(mlflow_store)
    mlflow.set_experiment("locked")
    calls: list = []
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)

    def release_then_log(*args, **kwargs):
        if len(calls) == 2:  # the second try: the other writer has finished
            holder.rollback()
        return mlflow.log_metrics(*args, **kwargs)

    with mlflow.start_run() as run:
        holder.execute("BEGIN EXCLUSIVE")
        Tracker(attempts=3, first_delay_s=0.01).call(counted(release_then_log, calls), {"loss": 0.5}, step=1)
    assert calls == [1, 2]
    assert MlflowClient(mlflow_store).get_run(run.info.run_id).data.metrics == {"loss": 0.5}
