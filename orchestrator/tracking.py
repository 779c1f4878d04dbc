"""MLflow plumbing for the driver: where the store is, whether it answers, and table artifacts."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from memshard.config import REDACTED, redact_uri
from memshard.errors import MemshardError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
log = logging.getLogger("memshard.tracking")


def resolve_tracking_uri(setting: str | None) -> str:
    return setting or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def connect_mlflow(tracking_uri: str, experiment: str) -> str:
    """Point MLflow at the store and the experiment; fail before any training if it does not answer."""
    check_tracking_store(tracking_uri)
    if not experiment.strip():
        raise MemshardError("the MLflow experiment name is empty: give one (--experiment NAME)")
    try:
        return mlflow.set_experiment(experiment).experiment_id
    except Exception as error:  # the store answered: it refuses the name (deleted, too long, ...)
        raise MemshardError(
            f"MLflow experiment {experiment[:100]!r} cannot be used in {redact_uri(tracking_uri)} "
            f"({_reason(error, tracking_uri)}): choose another name (--experiment) or restore it"
        ) from None


def check_tracking_store(tracking_uri: str) -> MlflowClient:
    """Point MLflow at the store and return its client once it answers; for commands that choose the
    experiment later (evaluate, unlearn) but must fail in seconds, not after MLflow's minutes of retries.

    A URI with credentials also turns off MLflow's own "View run at" lines, which print the URI as given.
    """
    if redact_uri(tracking_uri) != tracking_uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(tracking_uri)
    _check_server_listens(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as error:  # connection refused, bad URI, locked database, auth: all user-fixable
        raise _store_error(tracking_uri, error) from None
    return client


def require_run(tracking_uri: str, run_id: str) -> None:
    """Fail in one line, before any work, when `run_id` is not a run of this (answering) store."""
    try:
        MlflowClient(tracking_uri).get_run(run_id)
    except Exception as error:  # RESOURCE_DOES_NOT_EXIST, or an id this store cannot parse
        raise MemshardError(
            f"run {run_id} is not in the MLflow tracking store {redact_uri(tracking_uri)} "
            f"({_reason(error, tracking_uri)}): give the store it was trained in "
            f"(--set mlflow.tracking_uri=URI or MLFLOW_TRACKING_URI)"
        ) from None


def _store_error(tracking_uri: str, error: Exception) -> MemshardError:
    return MemshardError(
        f"MLflow tracking store {redact_uri(tracking_uri)} does not answer ({_reason(error, tracking_uri)}): "
        f"start it or fix MLFLOW_TRACKING_URI"
    )


def _reason(error: BaseException, tracking_uri: str) -> str:
    text = str(error).splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return scrub(text, tracking_uri)


def scrub(text: str, tracking_uri: str) -> str:
    """`text` with the tracking URI's credentials removed wherever they appear (errors quote URLs)."""
    try:
        parts = urlsplit(tracking_uri)
        userinfo = parts.netloc.rpartition("@")[0]
        secrets = [parts.password] if parts.password else [parts.username] if parts.username else []
    except ValueError:  # unparsable: hide the whole URI
        return text.replace(tracking_uri, redact_uri(tracking_uri))
    for secret in ([userinfo] if userinfo else []) + secrets:
        for form in {secret, unquote(secret)}:
            if form:
                text = text.replace(form, REDACTED)
    return text


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
    """What opens the MLflow UI for this store, without its credentials: a server's own address, or
    `mlflow ui` over a local store."""
    parts = urlsplit(redact_uri(tracking_uri))
    if parts.scheme in ("http", "https"):
        return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    return f"mlflow ui --backend-store-uri {redact_uri(tracking_uri)}"


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
            log.warning("MLflow call %s failed (%s); retry %d/%d in %.1f s", getattr(action, "__name__", action),
                        scrub(str(error), mlflow.get_tracking_uri()), attempt, attempts - 1, delay)
            time.sleep(delay)
            delay *= 2
