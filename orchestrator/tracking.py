"""MLflow plumbing for the driver: where the store is, whether it answers, and table artifacts."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from memshard.errors import MemshardError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
log = logging.getLogger("memshard.tracking")


def resolve_tracking_uri(setting: str | None) -> str:
    return setting or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def connect_mlflow(tracking_uri: str, experiment: str) -> str:
    """Point MLflow at the store and the experiment; fail before any training if it does not answer."""
    mlflow.set_tracking_uri(tracking_uri)
    _check_server_listens(tracking_uri)
    try:
        MlflowClient(tracking_uri).search_experiments(max_results=1)
        return mlflow.set_experiment(experiment).experiment_id
    except Exception as error:  # connection refused, bad URI, locked database, auth: all user-fixable
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise MemshardError(
            f"MLflow tracking store {tracking_uri} does not answer ({reason}): start it or fix MLFLOW_TRACKING_URI"
        ) from None


def _check_server_listens(tracking_uri: str) -> None:
    """For a tracking server, a plain TCP connect first: MLflow's own client retries for minutes."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=5).close()
    except OSError as error:
        raise MemshardError(
            f"MLflow tracking server {redact_uri(tracking_uri)} does not answer ({error.strerror or error}): "
            f"start it or fix MLFLOW_TRACKING_URI"
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


def with_retries(action, *args, attempts: int = 5, first_delay_s: float = 0.5, **kwargs):
    """Call an MLflow action, retrying transient failures with exponential backoff.

    After the last attempt the error propagates: the caller decides what is lost (nothing — the
    model and checkpoints are written locally before they are logged).
    """
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return action(*args, **kwargs)
        except Exception as error:  # network errors, 5xx, a locked sqlite file
            if attempt == attempts or isinstance(error, MemshardError):
                raise
            log.warning("MLflow call %s failed (%s); retry %d/%d in %.1f s",
                        getattr(action, "__name__", action), error, attempt, attempts - 1, delay)
            time.sleep(delay)
            delay *= 2


def redact_uri(uri: str) -> str:
    """Drop credentials (user:password@) from a URI before it is logged as a param."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))
