"""Hostile input (issue 16): no secret leaves the user's hands, no input can exhaust the machine,
every bad input is one line in the layer that owns it.

The data and config cases never open an MLflow store, so they run in the fast lane through `rejects`
(cli_rejects' checks, less the MLflow ones); cases that reach the store use `cli_rejects`.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import all_runs
from PIL import Image

from memshard.commands.cli import main
from memshard.config import WHERE_SETTINGS, build_config, flatten, from_dict, load_config_file, redact_uri, to_dict
from memshard.errors import MAX_MESSAGE_CHARS, MemshardError, shown
from memshard.orchestrator.checkpoint import CHECKPOINT_FILE, _to_tensors, load_checkpoint
from memshard.orchestrator.tracking import scrub, ui_command
from memshard.orchestrator.train import resume_config


@pytest.fixture
def rejects(capsys):
    """`memshard ARGV` in-process must exit 2 with one `error: ...` line holding `message`, no traceback."""

    def run(argv: list[str], message: str) -> str:
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's errors
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
        assert len(lines[0]) <= MAX_MESSAGE_CHARS + len("error: ")
        return lines[0]

    return run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- errors stay one bounded line


def test_an_error_message_is_one_escaped_line_of_bounded_length():
    error = MemshardError("cannot read new\nline\r.png \x1b[31mred\u2028 (fix: rename it)")
    assert str(error) == "cannot read new\\nline\\r.png \\x1b[31mred\\u2028 (fix: rename it)"
    huge = str(MemshardError("start " + "x" * 10_000_000 + " the fix"))
    assert len(huge) <= MAX_MESSAGE_CHARS and huge.startswith("start ") and huge.endswith(" the fix")
    assert len(shown("y" * 10**6)) < 100 and len(shown(list(range(10**5)))) < 100
    assert shown(10**5000) == "<int>"  # past Python's digit limit: named, never formatted


# ---------------------------------------------------------------- configuration files and --set

BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_yaml_aliases_are_refused_before_they_expand(tmp_path, rejects):
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 500  # expanded: 9**9 strings, gigabytes
    line = rejects(["train", "--config", str(bomb)], "anchor &a")
    assert "write the values out" in line
    started = time.monotonic()
    with pytest.raises(MemshardError, match="anchor &a"):
        load_config_file(bomb)
    assert time.monotonic() - started < 1
    (tmp_path / "alias.yaml").write_text("base: &b {shards: 2}\niet: *b\n")
    with pytest.raises(MemshardError, match="anchor &b"):
        load_config_file(tmp_path / "alias.yaml")
    # --set values are YAML scalars without aliases: an alias stays text, and text is the wrong type.
    with pytest.raises(MemshardError, match="wrong type"):
        build_config("tiny", sets=["iet.shards=&x [*x, *x]"])


@pytest.mark.parametrize("name, content, message", [
    ("huge.yaml", "iet:\n  shards: 2\n" + "#" * (1 << 20), "larger than 1024 KiB"),
    ("deep.yaml", "iet: " + "[" * 50_000, "does not parse"),
    ("deep.toml", "a = " + "[" * 50_000, "does not parse"),
    ("digits.yaml", "iet:\n  shards: " + "9" * 5000, "does not parse"),
    ("binary.yaml", b"\xff\xfe\x00iet", "UTF-8"),
    ("list.yaml", "- 1\n- 2\n", "must hold sections"),
    ("long.yaml", "model:\n  block_out_channels: [" + ", ".join(["true"] * 100_000) + "]\n", "wrong type"),
])
def test_config_files_cannot_grow_memory_or_the_message(tmp_path, rejects, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    rejects(["train", "--config", str(path)], message)


@pytest.mark.parametrize("sets, message", [
    (["model.beta_schedule=bogus"], "model.beta_schedule = 'bogus': choose one of linear"),
    (["training.device=cuda", "ray.gpus_per_actor=0"], "gives the actors no GPU"),
    (["training.learning_rate=.nan"], "not a finite number"),
    (["agc.lam=1e400"], "not a finite number"),  # YAML text, read as a float: inf
    (["ray.placement_timeout_s=.inf"], "not a finite number"),
    (["iet.rounds=99999999999999999999999"], "out of range"),
    (["training.seed=-1"], "training.seed"),
    (["mlflow.register_as=a/b"], "holds '/' or ':'"),
    (["ray.cpus_per_actor=inf"], "ray.cpus_per_actor"),
    (["data.resolution=4096"], "data.resolution = 4096 cannot be used"),
    ([f"iet.method={'m' * 100_000}"], "unknown method"),
])
def test_bad_settings_are_refused_by_validation(rejects, sets, message):
    rejects(["train", *[arg for s in sets for arg in ("--set", s)]], message)


def test_an_empty_experiment_name_is_named_as_such(rejects):
    line = rejects(["train", "--experiment", ""], "mlflow.experiment is empty")
    assert "tracking" not in line


def test_argparse_errors_are_one_line_too(rejects):
    rejects(["train", "--shards", "two"], "argument --shards: invalid int value")
    rejects(["data", "prepare"], "required")


# ---------------------------------------------------------------- credentials


PASSWORD = "S3cret-PW_4real"


def test_the_saved_configuration_never_holds_credentials():
    cfg = build_config("tiny", sets=[f"mlflow.tracking_uri=https://alice:{PASSWORD}@mlflow.example:5000/api"])
    assert cfg.mlflow.tracking_uri.endswith("@mlflow.example:5000/api")  # usable where it is used
    saved = to_dict(cfg)  # what config.json, checkpoints and params are made of
    assert saved["mlflow"]["tracking_uri"] == "https://***@mlflow.example:5000/api"
    assert PASSWORD not in json.dumps(saved) and PASSWORD not in json.dumps(flatten(cfg))
    assert from_dict(saved).mlflow.tracking_uri == "https://***@mlflow.example:5000/api"
    assert redact_uri(f"postgresql://bob:{PASSWORD}@db/mlflow") == "postgresql://***@db/mlflow"
    assert redact_uri(f"http://token{PASSWORD}@host") == "http://***@host"
    assert PASSWORD not in redact_uri(f"http://a:{PASSWORD}@host:notaport/")
    assert ui_command(f"http://alice:{PASSWORD}@127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert ui_command("sqlite:///mlflow.db") == "mlflow ui --backend-store-uri sqlite:///mlflow.db"
    uri = f"http://alice:{PASSWORD.replace('_', '%5F')}@h:1"
    assert PASSWORD not in scrub(f"API request to {uri}/api failed; auth {PASSWORD}", uri)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free loopback port (its own store and artifact folder), killed at the end."""
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    log = open(root / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/store.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: workers die with it
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        yield {"port": port, "root": root}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_password_in_the_tracking_uri_reaches_no_artifact_checkpoint_param_tag_or_terminal(
    ray_cluster, mlflow_server, tmp_path, monkeypatch, capfd
):
    """Train, evaluate, unlearn (SISS), retrain and tune against a real tracking server, the password given
    by flag and by environment; then search the server's store and artifacts, the local checkpoints, Ray
    Tune's files and everything printed."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set_tracking_uri mirrors itself into it
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    port = mlflow_server["port"]
    alice = f"http://alice:{PASSWORD}@127.0.0.1:{port}"
    common = ["train", "--preset", "tiny", "--no-progress", "--rounds", "1", "--register-as", "secret-test"]
    small_audit = ["--set", "audit.num_images=4", "--set", "audit.sampling_steps=2"]

    assert main([*common, "--set", f"mlflow.tracking_uri={alice}"]) == 0
    assert main(["evaluate", "models:/secret-test/1", "--num-images", "4", "--sampling-steps", "2",
                 "--feature-space", "none", "--device", "cpu", "--tracking-uri", alice, "--no-progress"]) == 0
    assert main(["unlearn", "models:/secret-test/1", "--forget", "digits-00000", "--steps", "2",
                 "--set", f"mlflow.tracking_uri={alice}", *small_audit]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://carol:{PASSWORD}@127.0.0.1:{port}")
    assert main(common) == 0
    assert main(["unlearn", "models:/secret-test/2", "--forget", "digits-00001", "--method", "retrain",
                 *small_audit]) == 0
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # A sweep (issue 29 item 1): Ray Tune's own state (tuner.pkl, experiment state, trial folders) is
    # searched below with the rest of .memshard.
    assert main(["tune", "--preset", "tiny", "--trials", "1", "--num-images", "16", "--sampling-steps", "2",
                 "--set", "iet.rounds=1", "--set", f"mlflow.tracking_uri={alice}"]) == 0
    assert list((tmp_path / ".memshard" / "tune").rglob("tuner.pkl"))
    # A server that answers, at a wrong path, and one that does not answer: errors name neither password.
    assert main([*common, "--set", f"mlflow.tracking_uri={alice}/wrong/path"]) == 2
    assert main(["evaluate", "models:/secret-test/1", "--tracking-uri", f"http://u:{PASSWORD}@127.0.0.1:9"]) == 2
    printed = capfd.readouterr()
    assert "error: MLflow tracking store http://***@127.0.0.1:" in printed.err

    assert PASSWORD not in printed.out and PASSWORD not in printed.err
    assert f"open the MLflow UI: http://127.0.0.1:{port}" in printed.out
    assert files_holding(mlflow_server["root"], PASSWORD) == []  # store.db (params, tags), artifacts
    assert files_holding(tmp_path / ".memshard", PASSWORD) == []  # checkpoint.pt, saved pipelines, caches
    client = MlflowClient(f"http://127.0.0.1:{port}")
    runs = all_runs(f"http://127.0.0.1:{port}")
    assert len(runs) >= 5 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not [v for v in values if PASSWORD in v]
        if any(a.path == "config.json" for a in client.list_artifacts(run.info.run_id)):
            local = client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))
            assert PASSWORD not in Path(local).read_text()
        checkpoint = tmp_path / ".memshard" / "checkpoints" / run.info.run_id
        if (checkpoint / CHECKPOINT_FILE).is_file():
            assert PASSWORD not in json.dumps(load_checkpoint(checkpoint)["config"])


# ---------------------------------------------------------------- a sweep holds no credentials (issue 29 item 1)


@pytest.mark.parametrize("key", WHERE_SETTINGS)
def test_a_grid_cannot_sweep_a_where_setting(tmp_path, rejects, key):
    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({"agc.lam": [1.25, 2.0], key: [f"http://bob:{PASSWORD}@127.0.0.1:5000", "x"]}))
    line = rejects(["tune", "--preset", "tiny", "--grid", str(grid)], f"{key} is a where-setting")
    assert PASSWORD not in line and f"--set {key}=" in line


def test_a_sweeps_trials_carry_no_where_setting_and_its_base_keeps_them(tmp_path):
    from memshard.tuning.space import sweep_space

    alice = f"http://alice:{PASSWORD}@127.0.0.1:5000"
    space = sweep_space("tiny", None, [f"mlflow.tracking_uri={alice}", "ray.address=auto",
                                        f"mlflow.checkpoint_dir={tmp_path}"], trials=3)
    assert len(space.trials) == 3
    assert (space.base.mlflow.tracking_uri, space.base.ray.address, space.base.mlflow.checkpoint_dir) == \
        (alice, "auto", str(tmp_path))  # where the sweep itself runs and logs
    for trial in space.trials:  # what Ray Tune is given and keeps
        assert trial.cfg.mlflow.tracking_uri is None and trial.cfg.ray.address is None
        assert trial.cfg.mlflow.checkpoint_dir == build_config("tiny").mlflow.checkpoint_dir


# ---------------------------------------------------------------- data


def png_bytes(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), value).save(buf, format="PNG")
    return buf.getvalue()


def hf_parquet(path: Path, labels, label_type: pa.DataType | None = None, metadata: bytes | None = None) -> Path:
    table = pa.table({
        "image": pa.array([{"bytes": png_bytes(i), "path": None} for i in range(len(labels))]),
        "label": pa.array(labels, label_type or pa.int64()),
    })
    if metadata is not None:
        table = table.replace_schema_metadata({b"huggingface": metadata})
    pq.write_table(table, path)
    return path


def test_labels_that_do_not_fit_int64_are_refused(tmp_path, rejects):
    np.savez(tmp_path / "big.npz", images=np.zeros((3, 8, 8), np.uint8),
             labels=np.array([0, 1, 2**64 - 1], np.uint64))
    rejects(["data", "prepare", str(tmp_path / "big.npz"), "--out", str(tmp_path / "a")],
            "label 18446744073709551615, which does not fit a 64-bit signed integer")
    hf_parquet(tmp_path / "big.parquet", [0, 2**64 - 1], pa.uint64())
    rejects(["data", "prepare", str(tmp_path / "big.parquet"), "--out", str(tmp_path / "b")],
            "does not fit a 64-bit signed integer")


def test_truncated_numpy_files_are_refused(tmp_path, rejects):
    np.savez(tmp_path / "ok.npz", images=np.zeros((4, 8, 8), np.uint8))
    data = (tmp_path / "ok.npz").read_bytes()
    for name, cut in (("half.npz", len(data) // 2), ("tail.npz", len(data) - 30)):
        (tmp_path / name).write_bytes(data[:cut])
        rejects(["data", "prepare", str(tmp_path / name), "--out", str(tmp_path / "o")], "not a readable numpy file")


@pytest.mark.parametrize("metadata, message", [
    (b"{not json", "is not JSON"),
    (b"[1, 2]", "is a JSON list, not an object"),
    (json.dumps({"info": {"features": {"label": {"names": "ab"}}}}).encode(), "not a list of names"),
    (json.dumps({"info": []}).encode(), "no 'info.features'"),
])
def test_broken_hugging_face_metadata_is_one_line(tmp_path, rejects, metadata, message):
    hf_parquet(tmp_path / "hf.parquet", [0, 1], metadata=metadata)
    rejects(["data", "prepare", str(tmp_path / "hf.parquet"), "--out", str(tmp_path / "o")], message)


def test_a_file_name_with_a_newline_stays_on_one_line(tmp_path, rejects):
    folder = tmp_path / "new\nline"
    folder.mkdir()
    (folder / "x\x1b[2J.png").write_bytes(b"not an image")
    line = rejects(["data", "prepare", str(folder), "--out", str(tmp_path / "o")], "new\\nline/x\\x1b[2J.png")
    assert "\x1b" not in line
    (tmp_path / "bad\nname.npz").write_bytes(b"PK\x03\x04 truncated")
    rejects(["data", "prepare", str(tmp_path / "bad\nname.npz"), "--out", str(tmp_path / "o")], "bad\\nname.npz")


@pytest.mark.parametrize(("out", "message"), [("/proc/memshard-out", "is not a writable directory"),
                                              ("/dev/null/x", "'/dev/null' is a character device"),
                                              ("/proc/self/nonexistent/deeper", "is not a writable directory")])
def test_an_unwritable_out_fails_before_any_image_is_read(rejects, out, message):
    started = time.monotonic()
    rejects(["data", "prepare", "digits", "--out", out], message)
    assert time.monotonic() - started < 5


@pytest.fixture
def prepared(tmp_path):
    from memshard.data import prepare_dataset

    return prepare_dataset("digits", tmp_path / "ds")


def with_metadata(dataset: Path, target: Path, **changes: str) -> Path:
    table = pq.read_table(dataset / "images.parquet")
    metadata = {**table.schema.metadata, **{f"memshard.{k}".encode(): v.encode() for k, v in changes.items()}}
    target.mkdir()
    pq.write_table(table.replace_schema_metadata(metadata), target / "images.parquet")
    return target


@pytest.mark.parametrize("changes, message", [
    ({"count": "many"}, "metadata count is 'many'"),
    ({"count": "5"}, "1797 rows, metadata says 5"),
    ({"label_names": "{broken"}, "metadata label_names"),
    ({"label_names": "[1, 2]"}, "metadata label_names"),
    ({"resolution": "999999999"}, "channels at 999999999 px"),
    ({"channels": "2"}, "2 channels"),
    ({"fingerprint": "x"}, "fingerprint"),
])
def test_inspect_and_train_refuse_corrupt_metadata(prepared, tmp_path, rejects, changes, message):
    broken = with_metadata(prepared, tmp_path / "broken", **changes)
    rejects(["data", "inspect", str(broken)], message)


def test_the_hint_names_the_real_prepare_command(tmp_path, rejects):
    rejects(["data", "inspect", str(tmp_path)], "run `memshard data prepare` on your images first")


# ---------------------------------------------------------------- train and resume


def test_unwritable_cache_and_checkpoint_dirs_fail_before_training(ray_cluster, mlflow_store, tmp_path, cli_rejects):
    np.save(tmp_path / "four.npy", np.zeros((4, 8, 8), np.uint8))
    base = ["train", "--preset", "tiny", "--no-progress", "--set", f"mlflow.tracking_uri={mlflow_store}"]
    cli_rejects([*base, "--data", str(tmp_path / "four.npy"), "--set", "data.cache_dir=/proc/memshard-cache"],
                "data.cache_dir: /proc/memshard-cache is not a writable directory")
    cli_rejects([*base, "--set", "mlflow.checkpoint_dir=/dev/null/checkpoints"],
                "mlflow.checkpoint_dir: /dev/null/checkpoints is not a writable directory")
    assert not all_runs(mlflow_store)


def test_cuda_without_a_gpu_in_the_cluster_starts_no_run(ray_cluster, mlflow_store, cli_rejects):
    cli_rejects(["train", "--preset", "tiny", "--no-progress", "--set", f"mlflow.tracking_uri={mlflow_store}",
                 "--set", "training.device=cuda"], "the Ray cluster has no GPU")
    assert not all_runs(mlflow_store)


@pytest.mark.integration  # a fresh process and an MLflow store
def test_a_closed_ray_port_fails_fast_with_the_cluster_error(tmp_path):
    """A fresh process (no Ray in it yet): ray_session checks the port instead of Ray's minutes of retries."""
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "memshard.commands.cli", "train", "--preset", "tiny", "--no-progress",
         "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "--set", f"ray.address=127.0.0.1:{free_port()}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180, env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert completed.returncode == 2 and "Traceback" not in completed.stderr, completed.stderr[-2000:]
    assert completed.stderr.strip().splitlines()[-1].startswith("error: cannot reach the Ray cluster at 127.0.0.1:")
    assert time.monotonic() - started < 120
    assert not all_runs(f"sqlite:///{tmp_path}/mlflow.db")


def write_checkpoint(root: Path, run_id: str, state) -> Path:
    directory = root / run_id
    directory.mkdir(parents=True)
    torch.save(state, directory / CHECKPOINT_FILE)
    return directory


def valid_state() -> dict:
    return {"config": to_dict(build_config("tiny")), "dataset_fingerprint": "f" * 64, "driver": {},
            "owners": np.zeros((1, 4), np.int32)}


@pytest.mark.parametrize("state, message", [
    ({"config": to_dict(build_config("tiny"))}, "no 'dataset_fingerprint' entry"),
    ({**valid_state(), "config": [1, 2]}, "its 'config' is a list"),
    ([1, 2, 3], "holds a list, not a checkpoint"),
    ({**valid_state(), "config": {"iet": {"shards": "many"}}}, "its config"),
])
def test_a_damaged_checkpoint_is_one_line(tmp_path, rejects, state, message):
    root = tmp_path / "checkpoints"
    write_checkpoint(root, "0123456789abcdef", _to_tensors(state))
    line = rejects(["train", "--resume", "0123456789abcdef", "--set", f"mlflow.checkpoint_dir={root}"], message)
    assert "damaged checkpoint" in line


def test_a_resume_id_is_a_run_id_not_a_path(tmp_path, rejects):
    rejects(["train", "--resume", "../../etc", "--set", f"mlflow.checkpoint_dir={tmp_path}"], "is not a run id")


def test_resuming_a_run_the_store_does_not_hold_is_one_line(mlflow_store, tmp_path, cli_rejects):
    root = tmp_path / "checkpoints"
    write_checkpoint(root, "0123456789abcdef0123456789abcdef", _to_tensors(valid_state()))
    cli_rejects(["train", "--resume", "0123456789abcdef0123456789abcdef", "--no-progress",
                 "--set", f"mlflow.checkpoint_dir={root}", "--set", f"mlflow.tracking_uri={mlflow_store}"],
                "is not in the MLflow tracking store")


def test_a_resume_asks_again_where_to_run_and_never_takes_the_saved_ray_address_or_store(tmp_path):
    # The cluster and the store the run was trained with.
    cfg = build_config("tiny", sets=["ray.address=10.1.2.3:6379", f"mlflow.tracking_uri=sqlite:///{tmp_path}/old.db"])
    root = tmp_path / "checkpoints"
    write_checkpoint(root, "0123456789abcdef", _to_tensors({**valid_state(), "config": to_dict(cfg)}))
    where = f"mlflow.checkpoint_dir={root}"
    resumed = resume_config("0123456789abcdef", {}, [where])
    assert resumed.ray.address is None and resumed.mlflow.tracking_uri is None  # the environment, else local
    given = resume_config("0123456789abcdef", {}, [where, "ray.address=auto", "mlflow.tracking_uri=sqlite:///x.db"])
    assert given.ray.address == "auto" and given.mlflow.tracking_uri == "sqlite:///x.db"


def test_a_resume_asks_again_for_credentials_it_never_saved(tmp_path, rejects, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = build_config("tiny", sets=[f"mlflow.tracking_uri=http://alice:{PASSWORD}@127.0.0.1:9"])
    root = tmp_path / "checkpoints"
    write_checkpoint(root, "0123456789abcdef", _to_tensors({**valid_state(), "config": to_dict(cfg)}))
    line = rejects(["train", "--resume", "0123456789abcdef", "--set", f"mlflow.checkpoint_dir={root}"],
                   "whose credentials are not saved: give the URI again")
    assert PASSWORD not in line and "http://***@127.0.0.1:9" in line


# ---------------------------------------------------------------- issue 29 item 3: the tracking store, checked before any work


def read_only(path: Path) -> None:
    """Make `path` unwritable, for root too (root ignores permission bits: the immutable attribute)."""
    if os.geteuid() != 0:
        path.chmod(0o555 if path.is_dir() else 0o444)
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: no way to make a file read-only here")


def writable_again(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.mark.parametrize("uri, message", [
    ("postgresql://user@localhost/db", "needs a database driver that is not installed (No module named"),
    ("mysql://user@localhost/db", "needs a database driver that is not installed"),
    ("foo://bar", "MLflow has no store for the scheme 'foo'"),
    ("file:///proc/x", "MLFLOW_ALLOW_FILE_STORE"),
    ("http://localhost:99999", "cannot be parsed (Port out of range"),
    ("postgresql://user:pw@localhost:70000/db", "cannot be parsed (Port out of range"),
    ("http://[::1", "cannot be parsed (Invalid IPv6 URL)"),
    ("sqlite:////proc/memshard.db", "/proc is not writable"),
])
def test_a_store_that_cannot_be_used_is_one_line_before_any_work(rejects, tmp_path, monkeypatch, uri, message):
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(tmp_path))
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for argv in (["compare", "0123456789abcdef", "--tracking-uri", uri],
                 ["evaluate", "nomodel", "--tracking-uri", uri],
                 ["train", "--preset", "tiny", "--no-progress", "--set", f"mlflow.tracking_uri={uri}"]):
        started = time.monotonic()
        line = rejects(argv, message)
        assert time.monotonic() - started < 30 and "pw" not in line  # imports included: not minutes of retries


def test_an_sqlite_store_that_is_a_directory_or_not_a_database_is_refused_without_retries(rejects, tmp_path):
    (tmp_path / "notes.txt").write_text("not a database")
    os.mkfifo(tmp_path / "pipe.db")
    for target, message in ((tmp_path, "is a directory: give a file path"),
                            (tmp_path / "notes.txt", "cannot be written (file is not a database)"),
                            (tmp_path / "pipe.db", "is a named pipe (FIFO)")):
        started = time.monotonic()
        rejects(["compare", "0123456789abcdef", "--tracking-uri", f"sqlite:///{target}"], message)
        assert time.monotonic() - started < 30  # MLflow's own engine retries took 112 s on a directory
    assert (tmp_path / "notes.txt").read_text() == "not a database"


def test_a_store_file_check_creates_nothing(tmp_path):
    from memshard.orchestrator.tracking import check_store_location

    check_store_location(f"sqlite:///{tmp_path}/new/deeper/mlflow.db")  # MLflow makes it; the check does not
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("how", ["file", "folder"])
def test_a_read_only_store_is_refused_by_every_command_before_any_work(mlflow_store, tmp_path, cli_rejects, how):
    from memshard.orchestrator.tracking import check_tracking_store

    database = tmp_path / "store" / "mlflow.db"  # its own folder: the workspace (checkpoints) stays writable
    check_tracking_store(f"sqlite:///{database}")  # the store exists, with its tables: reads work, writes would not
    locked = {"file": database, "folder": database.parent}[how]
    uri = f"sqlite:///{database}"
    message = {"file": "is read-only", "folder": "is not writable"}[how]
    where = ["--set", f"mlflow.tracking_uri={uri}"]
    commands = [["train", "--preset", "tiny", "--no-progress", *where],
                ["evaluate", "nomodel", "--tracking-uri", uri],
                ["compare", "0123456789abcdef", "--tracking-uri", uri],
                ["unlearn", "nomodel", "--forget", "1", *where],
                ["tune", "--preset", "tiny", "--trials", "1", *where]]
    read_only(locked)
    try:
        for argv in commands:
            started = time.monotonic()
            cli_rejects(argv, message)
            assert time.monotonic() - started < 30, argv
        assert not all_runs(f"sqlite:///{database}")
    finally:
        writable_again(locked)


# ---------------------------------------------------------------- issue 29 item 4: paths and names, checked up front


def test_a_fifo_or_a_device_as_data_is_refused_before_it_is_opened(rejects, tmp_path):
    os.mkfifo(tmp_path / "pipe.npz")
    for source, kind in ((tmp_path / "pipe.npz", "named pipe (FIFO)"), ("/dev/zero", "character device")):
        started = time.monotonic()
        rejects(["data", "prepare", str(source), "--out", str(tmp_path / "out")], kind)
        assert time.monotonic() - started < 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.npz"]  # no temporary folder left


def test_train_refuses_a_fifo_as_data_and_leaves_no_temporary_folder(mlflow_store, tmp_path, cli_rejects):
    os.mkfifo(tmp_path / "pipe.npy")
    cli_rejects(["train", "--preset", "tiny", "--no-progress", "--data", str(tmp_path / "pipe.npy"),
                 "--set", f"mlflow.tracking_uri={mlflow_store}"], "is a named pipe (FIFO), not a file or a directory")
    assert not list((tmp_path / ".memshard").rglob("*tmp*")) if (tmp_path / ".memshard").exists() else True
    assert not all_runs(mlflow_store)


@pytest.mark.parametrize("out, message", [
    ("{tmp}", "is a directory: give a file path"),
    ("/proc/x.md", "/proc is not writable"),
    ("/dev/null/x.md", "/dev/null is not a directory"),
])
def test_compare_checks_its_out_before_the_run_is_logged(mlflow_store, tmp_path, cli_rejects, out, message):
    cli_rejects(["compare", "0123456789abcdef", "--tracking-uri", mlflow_store, "--out", out.format(tmp=tmp_path)],
                message)


def test_compare_out_into_a_missing_folder_is_accepted_and_creates_nothing_until_written(tmp_path):
    from memshard.files import check_writable_target, replace_file

    target = check_writable_target(tmp_path / "new" / "deeper" / "table.md", "--out")
    assert not (tmp_path / "new").exists()
    replace_file(target, lambda file: file.write(b"| a |"))
    assert target.read_text() == "| a |"


@pytest.mark.parametrize("name", ["..", ".", "..hidden", "a/b", "a:b", " "])
def test_a_register_name_mlflow_refuses_is_refused_before_training(rejects, name):
    rejects(["train", "--preset", "tiny", "--register-as", name], "mlflow.register_as")
    rejects(["tune", "--preset", "tiny", "--register-as", name], "--register-as")
# ---------------------------------------------------------------- a run's state (issue 29 item 2)


def store_state(store: str) -> list:
    """Everything a refused resume must leave as it was: each run's status, end time, params, tags and
    metrics, and the registered versions."""
    from mlflow.tracking import MlflowClient

    runs = sorted(all_runs(store), key=lambda run: run.info.run_id)
    versions = MlflowClient(store).search_model_versions()
    return [[(r.info.status, r.info.end_time, r.data.params, r.data.tags, r.data.metrics) for r in runs],
            sorted((v.name, v.version, v.run_id) for v in versions)]


def a_run_with_a_checkpoint(store: str, root: Path, status: str) -> str:
    """A run of the store in `status`, with a (valid) checkpoint of tiny's configuration under `root`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("resumable")).info.run_id
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    write_checkpoint(root, run_id, _to_tensors(valid_state()))
    return run_id


def test_a_finished_run_is_not_resumed_and_the_store_is_left_as_it_was(mlflow_store, tmp_path, cli_rejects):
    root = tmp_path / "checkpoints"
    run_id = a_run_with_a_checkpoint(mlflow_store, root, "FINISHED")
    before = store_state(mlflow_store)
    line = cli_rejects(["train", "--resume", run_id, "--no-progress", "--set", f"mlflow.checkpoint_dir={root}",
                        "--set", f"mlflow.tracking_uri={mlflow_store}"], f"run {run_id} is FINISHED")
    assert "train a new run" in line
    assert store_state(mlflow_store) == before


def test_a_run_another_process_trains_is_not_resumed_and_a_dead_holder_leaves_no_lock(mlflow_store, tmp_path,
                                                                                        cli_rejects):
    from memshard.orchestrator.checkpoint import run_lock

    root = tmp_path / "checkpoints"
    run_id = a_run_with_a_checkpoint(mlflow_store, root, "FAILED")
    holder = subprocess.Popen(  # holds the run's lock, as a training driver does, until it is killed
        [sys.executable, "-c", "import sys, time\nfrom memshard.orchestrator.checkpoint import run_lock\n"
         f"with run_lock({str(root / run_id)!r}, 'x'):\n    print('held', flush=True)\n    time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = store_state(mlflow_store)
        line = cli_rejects(["train", "--resume", run_id, "--no-progress", "--set", f"mlflow.checkpoint_dir={root}",
                            "--set", f"mlflow.tracking_uri={mlflow_store}"], f"is being trained by process {holder.pid}")
        assert "wait for it to end" in line
        assert store_state(mlflow_store) == before
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
    with run_lock(root / run_id, run_id):  # the kernel released it with the process
        pass


def test_two_resumes_of_one_run_train_its_rounds_once(ray_cluster, mlflow_store, tmp_path):
    """The run's driver died after round 1 of 3; two `--resume`, 2 s apart: one trains rounds 2 and 3 and
    registers one version, the other is refused in one line."""
    from mlflow.tracking import MlflowClient
    from test_reliability import train_until_the_driver_dies_after_round_one

    train_until_the_driver_dies_after_round_one(ray_cluster, mlflow_store, tmp_path)
    (run,) = all_runs(mlflow_store)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    resume = [sys.executable, "-m", "memshard.commands.cli", "train", "--resume", run.info.run_id, "--no-progress",
              "--set", f"mlflow.tracking_uri={mlflow_store}"]
    first = subprocess.Popen(resume, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    second = subprocess.Popen(resume, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outcomes = sorted([(p.wait(timeout=600), p.communicate()[1]) for p in (first, second)], key=lambda o: o[0])
    (trained, trained_err), (refused, refused_err) = outcomes
    assert trained == 0, trained_err[-2000:]
    assert refused == 2 and "Traceback" not in refused_err, refused_err[-2000:]
    assert refused_err.strip().splitlines()[-1].startswith("error: run ")  # being trained, or FINISHED by then
    client = MlflowClient(mlflow_store)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert len(client.search_model_versions()) == 1


# ---------------------------------------------------------------- signals (issue 29 item 6)


def processes_holding(marker: str) -> list[int]:
    """Processes whose environment holds `marker`: the command and everything it started (Ray's own
    processes and workers inherit the environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def terminate_when_ready(argv: list[str], cwd: Path, ready, timeout_s: float = 600) -> tuple[int, str]:
    """`memshard ARGV` in a process of its own (its own local Ray instance), sent SIGTERM once `ready()`;
    returns its exit code and stderr, once every process it started has ended."""
    marker = f"MEMSHARD_SIGNAL_TEST={os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    env.pop("RAY_ADDRESS", None)
    err = (cwd / "stderr.txt").open("w+")
    command = subprocess.Popen([sys.executable, "-m", "memshard.commands.cli", *argv], cwd=cwd, env=env,
                               stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert command.poll() is None, (cwd / "stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "never ready"
            time.sleep(1)
        command.send_signal(signal.SIGTERM)
        code = command.wait(timeout=180)
        deadline = time.monotonic() + 60  # Ray's processes end as it shuts down
        while processes_holding(marker) and time.monotonic() < deadline:
            time.sleep(1)
        assert not processes_holding(marker), "processes left behind"
        return code, (cwd / "stderr.txt").read_text()
    finally:
        if command.poll() is None:
            command.kill()
        err.close()


def running_runs(store: str, **tags: str) -> list:
    return [r for r in all_runs(store) if r.info.status == "RUNNING"
            and all(r.data.tags.get(k) == v for k, v in tags.items())]


def assert_one_line_and_runs_ended(code: int, err: str, store: str) -> None:
    assert code == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "terminated", err[-3000:]
    for dump in ("Traceback", "Stack (most recent call first)", "*** SIG", "Fatal Python error", "Aborted"):
        assert dump not in err, err[-3000:]
    runs = all_runs(store)
    assert runs and all(r.info.status in ("FAILED", "KILLED") for r in runs), [r.info.status for r in runs]


@pytest.mark.integration  # a fresh process: its own local Ray and an MLflow store
def test_sigterm_ends_train_as_sigint_does(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"

    def training() -> bool:  # a round done: the run is open and its actors work
        return "round 1/" in (tmp_path / "stderr.txt").read_text()

    code, err = terminate_when_ready(["train", "--preset", "tiny", "--no-progress", "--rounds", "200",
                                      "--set", f"mlflow.tracking_uri={store}"], tmp_path, training)
    assert_one_line_and_runs_ended(code, err, store)


@pytest.mark.integration
def test_sigterm_ends_tune_and_its_trial_as_sigint_does(tmp_path):
    from memshard.tuning.trial import TRIAL_TAG

    store = f"sqlite:///{tmp_path}/mlflow.db"

    def trial_training() -> bool:  # the trial started (the store is made by then) and its training run is open
        return "t00 started" in (tmp_path / "stderr.txt").read_text() and bool(running_runs(store, **{TRIAL_TAG: "t00"}))

    code, err = terminate_when_ready(["tune", "--preset", "tiny", "--trials", "1", "--num-images", "16",
                                      "--sampling-steps", "2", "--set", "iet.rounds=200",
                                      "--set", f"mlflow.tracking_uri={store}"], tmp_path, trial_training)
    assert_one_line_and_runs_ended(code, err, store)
# ---------------------------------------------------------------- issue 29 item 7: small files that would use gigabytes

# The child's own peak: VmHWM belongs to its address space since exec (ru_maxrss keeps the forking
# parent's, the test process's, and that holds the hostile buffers these tests build).
PEAK_MEMORY_CHILD = (
    "import re, sys\n"
    "from memshard.commands.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "with open('/proc/self/status') as status:\n"
    "    print(int(re.search(r'VmHWM:\\s*(\\d+) kB', status.read()).group(1)) * 1024)\n"
    "sys.exit(code)\n"
)


def peak_memory_of(argv: list[str], cwd: Path) -> tuple[int, str, int]:
    """`memshard ARGV` in a fresh process: (exit code, its stderr, its peak resident memory in bytes)."""
    completed = subprocess.run([sys.executable, "-c", PEAK_MEMORY_CHILD, *argv], cwd=cwd, capture_output=True,
                               text=True, timeout=300, env={**os.environ, "MEMSHARD_WORKSPACE": str(cwd)})
    return completed.returncode, completed.stderr, int(completed.stdout.strip().splitlines()[-1])


def zeros(size: int) -> pa.Buffer:
    """`size` zero bytes without touching them: numpy's zeros are pages the kernel maps on first write."""
    return pa.py_buffer(np.zeros(size, np.uint8))


def assert_one_line_refusal(code: int, err: str, message: str) -> None:
    assert code == 2 and "Traceback" not in err, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err[-2000:]


@pytest.mark.integration  # runs memshard in a fresh process (imports torch, diffusers, Ray)
def test_a_small_parquet_file_that_decompresses_to_a_gigabyte_is_refused_in_bounded_memory(tmp_path):
    """One compressed row of 1 GiB of zeros (a few KB on disk): refused from its metadata before it is
    decompressed, while a valid file of the same layout prepares with the same peak give or take 200 MiB."""
    size = 1 << 30
    row = pa.BinaryArray.from_buffers(pa.binary(), 1, [None, pa.array([0, size], pa.int32()).buffers()[1], zeros(size)])
    images = pa.StructArray.from_arrays([row, pa.array([None], pa.string())], names=["bytes", "path"])
    pq.write_table(pa.table({"image": images}), tmp_path / "bomb.parquet", compression="zstd", use_dictionary=False)
    assert (tmp_path / "bomb.parquet").stat().st_size < 100_000
    hf_parquet(tmp_path / "ok.parquet", [0, 1, 2, 3])

    code, err, baseline = peak_memory_of(["data", "prepare", str(tmp_path / "ok.parquet"), "--out", "ok"], tmp_path)
    assert code == 0, err[-2000:]
    code, err, peak = peak_memory_of(["data", "prepare", str(tmp_path / "bomb.parquet"), "--out", "bomb"], tmp_path)
    assert_one_line_refusal(code, err, "would take 1,024 MiB to read but holds")
    assert peak < baseline + (200 << 20), (peak, baseline)  # unbounded, it decompresses 1 GiB (and copies it)


@pytest.mark.integration  # runs memshard in a fresh process (imports torch, diffusers, Ray)
def test_a_tiny_dataset_declaring_gigabytes_of_images_is_refused_before_train_allocates_them(tmp_path):
    """A prepared dataset whose metadata declares 1,000 images of 3x1024x1024 (3 GiB) in a file of a few KB:
    `train` refuses it from the declared size, before it allocates the images or reads a row."""
    count, width = 1000, 3 * 1024 * 1024
    images = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), count, [None, zeros(count * width)])
    ids = [f"s{i}" for i in range(count)]
    metadata = {"format_version": "1", "resolution": "1024", "channels": "3", "count": str(count),
                "label_names": "[]", "image_shape": "[3, 1024, 1024]", "fingerprint": "0" * 64}
    table = pa.table({"sample_id": pa.array(ids), "image": images, "label": pa.array([0] * count, pa.int64()),
                      "source": pa.array(ids), "content_hash": pa.array(["0" * 64] * count)})
    (tmp_path / "huge").mkdir()
    pq.write_table(table.replace_schema_metadata({f"memshard.{k}".encode(): v.encode() for k, v in metadata.items()}),
                   tmp_path / "huge" / "images.parquet", compression="zstd")
    assert (tmp_path / "huge" / "images.parquet").stat().st_size < 100_000

    code, err, peak = peak_memory_of(["train", "--preset", "tiny", "--no-progress", "--data", str(tmp_path / "huge"),
                                      "--set", "data.resolution=1024", "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"],
                                     tmp_path)
    assert_one_line_refusal(code, err, "would take 3,000 MiB to read but holds")
    assert peak < 1536 << 20, peak  # the imports of train take about 0.6 GiB; the declared images alone 3 GiB
    assert not all_runs(f"sqlite:///{tmp_path}/mlflow.db")


# ---------------------------------------------------------------- issue 29 item 5: unlearning that would keep too little


def test_forgetting_that_would_keep_too_few_images_is_refused_before_any_work(ray_cluster, mlflow_store, tmp_path, capsys):
    """A model trained on 2 images; forgetting one keeps 1: SISS's audit needs 4 kept images (2 with
    audit.quality=false), a retrain 2 (one per shard). One line naming both counts, no new run, in seconds."""
    from memshard.data import load_dataset
    from memshard.orchestrator.train import train

    np.save(tmp_path / "two.npy", np.stack([np.full((8, 8), 40, np.uint8), np.full((8, 8), 200, np.uint8)]))
    cfg = build_config("tiny", overrides={"mlflow.tracking_uri": mlflow_store, "iet.rounds": 1,
                                          "data.path": str(tmp_path / "two.npy")}, sets=["mlflow.register_as=two"])
    source = train(cfg, show_progress=False)
    forget = str(load_dataset(all_runs(mlflow_store)[0].data.params["dataset.path"]).sample_ids[0])
    runs = len(all_runs(mlflow_store))
    capsys.readouterr()  # the training's own output
    base = ["unlearn", "models:/two/1", "--forget", forget, "--set", f"mlflow.tracking_uri={mlflow_store}"]
    for extra, message in [
        ([], "forgetting 1 of the 2 training images would keep 1, but the audit needs at least 4"),
        (["--set", "audit.quality=false"], "the audit needs at least 2 (a Gaussian fit of 2 images or more"),
        (["--method", "retrain"], "retraining needs at least 2 (2 to train, and one per shard: iet.shards = 2)"),
    ]:
        started = time.monotonic()
        code = main([*base, *extra])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "forget fewer images" in lines[0], err
        assert "unlearn-" not in lines[0]  # never the retrain's internal cache folder
        assert time.monotonic() - started < 20
    assert len(all_runs(mlflow_store)) == runs and source.registered_version == "1"


# ---------------------------------------------------------------- issue 29 item 8: disk full while writing a checkpoint


def test_a_checkpoint_the_disk_has_no_room_for_is_one_line_and_the_last_one_stands(ray_cluster, mlflow_store, tmp_path):
    """Simulates a full disk with RLIMIT_FSIZE on the driver's process (a write past 4 MB fails with EFBIG,
    as ENOSPC would on a full disk; the actors, in the Ray cluster, are not limited): round 1 is
    checkpointed, the driver dies, and a resume under the limit cannot write round 2's checkpoint.pt."""
    import resource

    from mlflow.tracking import MlflowClient
    from test_reliability import train_until_the_driver_dies_after_round_one

    from memshard.orchestrator.checkpoint import check_worker_files
    from memshard.orchestrator.train import checkpoint_dir, resume_config, train

    wide = "model.block_out_channels=[64, 128]"  # a checkpoint.pt of about 10 MB: past the limit, the store not
    train_until_the_driver_dies_after_round_one(ray_cluster, mlflow_store, tmp_path, wide)
    run = all_runs(mlflow_store)[0]

    def four_megabytes_per_file():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {key: value for key, value in os.environ.items() if key != "MEMSHARD_TEST_FAULTS"}
    completed = subprocess.run(
        [sys.executable, "-m", "memshard.commands.cli", "train", "--resume", run.info.run_id, "--no-progress",
         "--set", f"mlflow.tracking_uri={mlflow_store}"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**env, "RAY_ADDRESS": ray_cluster.address}, preexec_fn=four_megabytes_per_file)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr, completed.stderr[-3000:]
    line = completed.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot write the checkpoint file ") and "(File too large)" in line, line
    assert f"the last complete checkpoint is kept: free space, then continue with memshard train --resume " \
           f"{run.info.run_id}" in line

    directory = checkpoint_dir(resume_config(run.info.run_id, {}, []), run.info.run_id)
    state = load_checkpoint(directory)  # round 1's, whole, with its proxies' files
    assert state["driver"]["rounds_done"] == 1
    check_worker_files(directory, state["driver"]["worker_files"])
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith("round_")) == ["round_0001"]
    assert not [p for p in directory.rglob("*") if p.name.endswith(".partial")]
    assert MlflowClient(mlflow_store).get_run(run.info.run_id).info.status == "FAILED"
    # With room again, the run continues from round 1.
    result = train(resume_config(run.info.run_id, {}, []), show_progress=False, resume_run_id=run.info.run_id)
    assert load_checkpoint(directory)["driver"]["rounds_done"] == 3 and result.run_id == run.info.run_id
