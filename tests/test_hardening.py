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
from memshard.config import build_config, flatten, from_dict, load_config_file, redact_uri, to_dict
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
    (["mlflow.register_as=a/b"], "cannot hold '/'"),
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
    """Train, evaluate, unlearn (SISS) and retrain against a real tracking server, the password given by
    flag and by environment; then search the server's store and artifacts, the local checkpoints and
    everything printed."""
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


@pytest.mark.parametrize("out", ["/proc/memshard-out", "/dev/null/x", "/proc/self/nonexistent/deeper"])
def test_an_unwritable_out_fails_before_any_image_is_read(rejects, out):
    started = time.monotonic()
    rejects(["data", "prepare", "digits", "--out", out], "is not a writable directory")
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
