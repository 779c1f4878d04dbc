"""MLflow plumbing: where the store is, whether it answers, and the tracker every logging call goes through."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import requests
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.exceptions import MlflowException
from mlflow.store.db.db_types import DATABASE_ENGINES
from mlflow.tracking import MlflowClient
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from memshard.config import REDACTED, GuardConfig, redact_uri
from memshard.data import ImageDataset
from memshard.errors import MemshardError
from memshard.files import check_writable_target, in_workspace
from memshard.guard import write_guard_reference
from memshard.orchestrator.pipeline_model import log_pipeline_model

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the file lies in the workspace root: see resolve_tracking_uri
SQLITE = "sqlite:///"
log = logging.getLogger("memshard.tracking")


def resolve_tracking_uri(setting: str | None) -> str:
    """The store: the setting (flag), else MLFLOW_TRACKING_URI, else DEFAULT_TRACKING_URI. A relative sqlite
    file lies under the workspace root, made absolute here, so every process means the same file.
    SQLite's own URI form (sqlite:///file:PATH?mode=ro&uri=true) is the user's to place: kept as given."""
    uri = setting or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith(SQLITE) and not uri.startswith((SQLITE + "/", SQLITE + "file:")):
        return SQLITE + str(in_workspace(uri[len(SQLITE):]))
    return uri


def connect_mlflow(tracking_uri: str, experiment: str) -> str:
    """Point MLflow at the store and the experiment; fail before any training if it does not answer."""
    check_tracking_store(tracking_uri)
    if not experiment.strip():
        raise MemshardError("the MLflow experiment name is empty: give one (--experiment NAME)")
    try:
        _create_local_experiment(tracking_uri, experiment)
        return mlflow.set_experiment(experiment).experiment_id
    except Exception as error:  # the store answered: it refuses the name (deleted, too long, ...)
        raise MemshardError(
            f"MLflow experiment {experiment[:100]!r} cannot be used in {redact_uri(tracking_uri)} "
            f"({_reason(error, tracking_uri)}): choose another name (--experiment) or restore it"
        ) from None


def _create_local_experiment(tracking_uri: str, experiment: str) -> None:
    """A new experiment in a local sqlite store gets its artifact folder under the workspace root.

    MLflow would put it in ./mlruns of whatever directory the process happens to be in when the
    experiment is created (a Ray Tune trial's folder, a test's); the store itself is already resolved
    under the root (`resolve_tracking_uri`), and its artifacts belong beside it. Servers choose their own.
    """
    if urlsplit(tracking_uri).scheme != "sqlite" or mlflow.get_experiment_by_name(experiment) is not None:
        return
    try:  # MLflow's layout would be mlruns/<id>, but the id is the store's to give: a fresh folder instead
        mlflow.create_experiment(experiment, artifact_location=(in_workspace("mlruns") / uuid.uuid4().hex).as_uri())
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile: use theirs
            raise


def check_tracking_store(tracking_uri: str) -> MlflowClient:
    """Point MLflow at the store and return its client once it answers; for commands that choose the
    experiment later (evaluate, unlearn) but must fail in seconds, not after MLflow's minutes of retries.

    A URI with credentials also turns off MLflow's own "View run at" lines, which print the URI as given.
    """
    check_store_location(tracking_uri)
    if redact_uri(tracking_uri) != tracking_uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(tracking_uri)
    _check_server_listens(tracking_uri)
    try:
        client = MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)
    except Exception as error:  # connection refused, bad URI, locked database, auth: all user-fixable
        raise _store_error(tracking_uri, error) from None
    return client


# The stores memshard checks before MLflow opens them: a tracking server, a database MLflow's SQL store
# speaks (`mlflow.store.db.db_types.DATABASE_ENGINES`, each through its SQLAlchemy driver), a local
# folder (MLflow's file store). MLflow's hosted schemes are MLflow's to check.
SERVER_SCHEMES = ("http", "https")
FOLDER_SCHEMES = ("", "file")
HOSTED_SCHEMES = ("databricks", "databricks-uc", "uc")
STORE_FORMS = "http(s)://HOST:PORT, sqlite:///FILE, postgresql://HOST/DB, mysql://HOST/DB or mssql://HOST/DB"


def check_store_location(tracking_uri: str) -> None:
    """The store's address checked before MLflow opens it, without changing the store: the URI parses
    (a port in range), its scheme is one MLflow serves and its database driver is installed, an sqlite
    file is a database (or can be created) and takes a write, a file store's folder is writable.

    Each of these would otherwise surface mid-command as a traceback, after minutes of MLflow's
    retries, or -- a read-only store -- only once the command has done its work and logs it.
    """
    shown_uri = redact_uri(tracking_uri)
    try:
        parts = urlsplit(tracking_uri)
        parts.port  # noqa: B018  parsed on access: a port out of range or not a number raises here
    except ValueError as error:
        raise MemshardError(f"MLflow tracking URI {shown_uri} cannot be parsed ({scrub(str(error), tracking_uri)}): "
                            f"write it as {STORE_FORMS}") from None
    scheme = parts.scheme.lower()
    if scheme in SERVER_SCHEMES + HOSTED_SCHEMES:
        return  # a server answers for itself: `_check_server_listens`, then a read
    if scheme.partition("+")[0] in DATABASE_ENGINES:
        _check_database_store(tracking_uri)
    elif scheme in FOLDER_SCHEMES:
        _check_folder_store(parts.path if scheme else tracking_uri, shown_uri)
    else:
        raise MemshardError(f"MLflow tracking URI {shown_uri}: MLflow has no store for the scheme {scheme[:40]!r}: "
                            f"use {STORE_FORMS}")


def _check_database_store(tracking_uri: str) -> None:
    """A SQL store: its SQLAlchemy driver importable; for sqlite, the file a database that takes a write."""
    shown_uri = redact_uri(tracking_uri)
    try:
        url = make_url(tracking_uri)
        url.get_dialect().import_dbapi()
    except ImportError as error:
        raise MemshardError(f"MLflow tracking store {shown_uri} needs a database driver that is not installed "
                            f"({error}): install it (pip install ...) or use sqlite:///FILE") from None
    except (SQLAlchemyError, ValueError) as error:  # unknown driver name, unparsable URL
        raise MemshardError(f"MLflow tracking URI {shown_uri} cannot be used ({_reason(error, tracking_uri)}): "
                            f"write it as {STORE_FORMS}") from None
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return
    if not url.database.startswith("file:"):  # SQLite's own URI form (file:...?mode=ro) has no plain path
        database = check_writable_target(url.database, f"the MLflow store {shown_uri}")
        if not database.exists():
            return  # MLflow creates it, and its folders: their nearest existing one takes a file
    try:
        tracker.call(_write_and_roll_back, tracking_uri)
    except Exception as error:  # read-only file or folder, not a database
        raise MemshardError(f"MLflow tracking store {shown_uri} cannot be written ({_reason(error, tracking_uri)}): "
                            f"give a writable SQLite database file (or a new file's path)") from None


def _write_and_roll_back(tracking_uri: str) -> None:
    """Prove an sqlite store takes a write, and leave it as it was: a table created inside a transaction
    that is rolled back (the journal, or the write-ahead log, must be writable too)."""
    engine = create_engine(tracking_uri, poolclass=NullPool)
    try:
        connection = engine.raw_connection()
        try:
            cursor = connection.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                cursor.execute("CREATE TABLE memshard_write_probe (x)")
            finally:
                cursor.execute("ROLLBACK")
        finally:
            connection.close()
    finally:
        engine.dispose()


def _check_folder_store(path: str, shown_uri: str) -> None:
    """MLflow's file store: allowed by MLFLOW_ALLOW_FILE_STORE (MLflow 3 refuses it otherwise), and a
    folder memshard can write in, or create."""
    if not MLFLOW_ALLOW_FILE_STORE.get():
        raise MemshardError(f"MLflow tracking store {shown_uri} is a file store, which MLflow refuses unless "
                            f"MLFLOW_ALLOW_FILE_STORE=true: set that, or use sqlite:///FILE")
    check_writable_target(unquote(path), f"the MLflow store {shown_uri}", kind="directory")


def require_run(tracking_uri: str, run_id: str) -> mlflow.entities.Run:
    """The run `run_id` of this (answering) store, as it is now (its status: `run.info.status`); a
    one-line error, before any work, when the store does not hold it."""
    try:
        return tracker.call(MlflowClient(tracking_uri).get_run, run_id)
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


# MLflow error codes of a store that is briefly away: a SQL store's OperationalError (a locked sqlite
# file among them; MLflow's managed session maps every OperationalError to TEMPORARILY_UNAVAILABLE),
# an HTTP 503 or 429, a timed-out request.
TRANSIENT_ERROR_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"})
# A sqlite OperationalError is transient only when another writer holds the file; "no such table" or
# "unable to open database file" will not pass by themselves.
SQLITE_BUSY = ("database is locked", "database table is locked")


def is_transient(error: BaseException) -> bool:
    """Whether a failed MLflow call may succeed when tried again: the one retry rule of the tracker.

    MLflow 3 raises a store that is briefly away as an MlflowException with a TRANSIENT_ERROR_CODES
    code (chained from SQLAlchemy's and sqlite3's OperationalError for a SQL store), or, over HTTP once
    its own retries are spent, as an MlflowException chained from requests' ConnectionError, Timeout or
    RetryError (the 5xx answers); artifact uploads raise requests' HTTPError with the 5xx response.
    Everything else (a bad argument, a missing run, a refused name, a MemshardError) is not.
    """
    chain, link = [], error
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    if any(isinstance(link, MemshardError) for link in chain):
        return False
    sqlite_errors = [link for link in chain if isinstance(link, sqlite3.OperationalError)]
    if sqlite_errors:
        return any(busy in str(link) for link in sqlite_errors for busy in SQLITE_BUSY)
    for link in chain:
        if isinstance(link, MlflowException) and link.error_code in TRANSIENT_ERROR_CODES:
            return True
        if isinstance(link, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError,
                             ConnectionError, TimeoutError)):
            return True
        if isinstance(link, requests.HTTPError) and link.response is not None and link.response.status_code >= 500:
            return True
    return False


class Tracker:
    """The MLflow calls memshard makes into the active run, each tried again while `is_transient` says
    the store is briefly away (exponential backoff); any other failure surfaces at once.

    After the last attempt the error propagates: the caller decides what is lost (nothing -- the model
    and checkpoints are written locally before they are logged).
    """

    def __init__(self, attempts: int = 5, first_delay_s: float = 0.5):
        self.attempts = attempts
        self.first_delay_s = first_delay_s

    def call(self, action, *args, **kwargs):
        """`action(*args, **kwargs)` under the retry rule; for a call the methods below do not cover."""
        delay = self.first_delay_s
        for attempt in range(1, self.attempts + 1):
            try:
                return action(*args, **kwargs)
            except Exception as error:
                if attempt == self.attempts or not is_transient(error):
                    raise
                log.warning("MLflow call %s failed (%s); retry %d/%d in %.1f s", getattr(action, "__name__", action),
                            scrub(str(error).splitlines()[0] if str(error) else type(error).__name__,
                                  mlflow.get_tracking_uri()), attempt, self.attempts - 1, delay)
                time.sleep(delay)
                delay *= 2

    def log_params(self, params: dict) -> None:
        self.call(mlflow.log_params, params)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.call(mlflow.log_metrics, metrics, step=step)

    def set_tags(self, tags: dict) -> None:
        self.call(mlflow.set_tags, tags)

    def log_dict(self, dictionary: dict, artifact_file: str) -> None:
        self.call(mlflow.log_dict, dictionary, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.call(mlflow.log_text, text, artifact_file)

    def log_image(self, image, artifact_file: str | None = None, key: str | None = None,
                  step: int | None = None) -> None:
        self.call(mlflow.log_image, image, artifact_file=artifact_file, key=key, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.call(mlflow.log_artifact, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path) -> None:
        self.call(mlflow.log_artifacts, str(folder))

    def log_table(self, table: pa.Table, artifact_file: str) -> None:
        """A pyarrow table as a Parquet artifact."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            pq.write_table(table, path)
            artifact_dir = str(Path(artifact_file).parent)
            self.log_artifact(path, None if artifact_dir == "." else artifact_dir)

    def log_model(self, pipeline_dir: str | Path, registered_name: str | None, guard: GuardConfig,
                  guard_dataset: ImageDataset, artifact_name: str = "model"):
        """The saved pipeline as the run's pyfunc model, registered as `registered_name` unless None, with
        its guard reference (README "Copy guard"): `guard`, the model's default guard, kept away from
        `guard_dataset`, the training set the guard's fingerprint check holds it to."""
        with tempfile.TemporaryDirectory(prefix="memshard-guard-") as tmp:
            guard_dir = write_guard_reference(guard, guard_dataset, tmp)
            return self.call(log_pipeline_model, pipeline_dir, registered_name, guard_dir, artifact_name=artifact_name)

    def tag_model_version(self, name: str, version: str, tags: dict) -> None:
        client = MlflowClient()
        for key, value in tags.items():
            self.call(client.set_model_version_tag, name, version, key, value)


tracker = Tracker()  # what memshard logs with; tests build their own with other attempts and delays
