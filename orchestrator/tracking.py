"""MLflow plumbing for the driver: where the store is, whether it answers, and table artifacts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from orchestrator.errors import MemshardError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(setting: str | None) -> str:
    return setting or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def connect_mlflow(tracking_uri: str, experiment: str) -> str:
    """Point MLflow at the store and the experiment; fail before any training if it does not answer."""
    mlflow.set_tracking_uri(tracking_uri)
    try:
        MlflowClient(tracking_uri).search_experiments(max_results=1)
        return mlflow.set_experiment(experiment).experiment_id
    except Exception as error:  # connection refused, bad URI, locked database, auth: all user-fixable
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise MemshardError(
            f"MLflow tracking store {tracking_uri} does not answer ({reason}): start it or fix MLFLOW_TRACKING_URI"
        ) from None


def ui_command(tracking_uri: str) -> str:
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def log_table(table: pa.Table, artifact_file: str) -> None:
    """Log a pyarrow table as a Parquet artifact of the active run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        pq.write_table(table, path)
        artifact_dir = str(Path(artifact_file).parent)
        mlflow.log_artifact(str(path), artifact_path=None if artifact_dir == "." else artifact_dir)
