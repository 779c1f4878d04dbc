"""Property-based hostile input (issue 16), in the fast lane (no Ray, no MLflow store).

Configurations and `--set` values are generated from the config schema (the dataclasses in
memshard/config.py): well-typed values at and past their limits, and values of every other type.
Datasets are corrupted from one valid prepared dataset (bytes flipped, the file cut, metadata
rewritten) and sources from valid ones. Whatever comes in, the outcome is success or a
MemshardError whose message is one line of bounded length: never another exception.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import string
import tempfile
import types
import typing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from memshard.commands.cli import main
from memshard.config import Config, build_config, from_dict, to_dict
from memshard.data import inspect_dataset, load_dataset, prepare_dataset
from memshard.errors import MAX_MESSAGE_CHARS, MemshardError
from memshard.model import build_scheduler
from memshard.orchestrator.settings import check

# Deterministic (the same examples on every run, so CI is not flaky), no example database, and a few
# seconds per property. MEMSHARD_FUZZ_EXAMPLES=5000 explores further, with fresh random examples.
_DEEP = int(os.environ.get("MEMSHARD_FUZZ_EXAMPLES", "0"))
FAST = settings(max_examples=_DEEP or 150, deadline=None, derandomize=not _DEEP, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def assert_one_line(error: MemshardError) -> None:
    message = str(error)
    assert message and len(message) <= MAX_MESSAGE_CHARS and message.splitlines() == [message], message


def outcome(action) -> object:
    """Run `action`: its result, or None after a MemshardError that is one bounded line."""
    try:
        return action()
    except MemshardError as error:
        assert_one_line(error)
        return None


# ---------------------------------------------------------------- values from the config schema

SCHEMA = {name: typing.get_type_hints(kind) for name, kind in typing.get_type_hints(Config).items()}

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    | st.sampled_from(["", "auto", "nan", "-inf", "1e400", "&a", "*a", "!!python/object:os.system", "a\nb"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
edge_ints = st.sampled_from([0, 1, -1, 2, 3, 7, 8, 16, 64, 1024, 2**31, 2**63 - 1, 2**63, -(2**63), 10**30])
edge_floats = st.sampled_from([0.0, -0.0, 1e-12, 0.5, 0.999, 1.0, 1.5, 2.0, -1.0, 1e308, float("inf"), float("nan")])


def typed(hint) -> st.SearchStrategy:
    """Values of the field's own type, at and past its limits."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[typed(option) for option in typing.get_args(hint)])
    if hint is type(None):
        return st.none()
    if origin is tuple:
        return st.lists(edge_ints | st.integers(-4, 300), max_size=5)
    if origin is dict:
        return st.dictionaries(st.sampled_from(["worker_slot", "CPU", "", "gpu_big"]), edge_floats | edge_ints, max_size=2)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return edge_ints | st.integers(-10, 5000)
    if hint is float:
        return edge_floats | st.floats(-10, 10)
    return st.sampled_from(["auto", "cpu", "cuda", "linear", "sigmoid", "ring", "every", "PACK", "no", "bf16",
                            "iet", "ddpm", "iet-agc-plus", "0.5", "0", "bogus", "", "a/b", "x" * 300]) | st.text(max_size=20)


@st.composite
def config_trees(draw) -> dict:
    """A partial config tree: a few settings of the schema, typed or not, and now and then unknown ones."""
    tree: dict = {}
    for _ in range(draw(st.integers(0, 6))):
        section = draw(st.sampled_from(sorted(SCHEMA)))
        key = draw(st.sampled_from(sorted(SCHEMA[section])))
        value = draw(typed(SCHEMA[section][key]) | junk)
        tree.setdefault(section, {})[key] = value
    if draw(st.integers(0, 9)) == 0:
        tree[draw(st.text(string.ascii_lowercase, min_size=1, max_size=6))] = draw(junk)
    return tree


def check_built(cfg: Config) -> None:
    """A configuration that validates is usable as far as the fast lane can go: it round-trips through
    what checkpoints and config.json hold, it passes or fails the entry points' check in one line and its
    noise schedule builds."""
    assert from_dict(to_dict(cfg)) == cfg
    outcome(lambda: check(cfg))
    build_scheduler(cfg)  # validated: never raises


@FAST
@given(tree=config_trees(), preset=st.sampled_from(["tiny", "digits", "cifar32"]))
def test_generated_config_files_build_or_fail_in_one_line(tree, preset):
    try:
        text = yaml.safe_dump(tree, allow_unicode=True)
    except yaml.YAMLError:
        assume(False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(text)
        cfg = outcome(lambda: build_config(preset, path))
    if cfg is not None:
        check_built(cfg)


@FAST
@given(tree=config_trees(), raw=st.lists(st.text(max_size=40), max_size=2))
def test_generated_set_values_build_or_fail_in_one_line(tree, raw):
    """`--set section.key=value` as a user types it: YAML flow text for each value, and free text."""
    sets = [f"{section}.{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()}"
            .removesuffix("\n...").removesuffix("...").strip()
            for section, values in tree.items() if isinstance(values, dict) for key, value in values.items()]
    cfg = outcome(lambda: build_config("tiny", sets=sets + raw))
    if cfg is not None:
        check_built(cfg)


@FAST
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
       suffix=st.sampled_from([".yaml", ".toml"]))
def test_any_config_file_text_builds_or_fails_in_one_line(text, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"run{suffix}"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        outcome(lambda: build_config("tiny", path))


# ---------------------------------------------------------------- corrupt datasets


@pytest.fixture(scope="module")
def valid_dataset(tmp_path_factory) -> Path:
    """A small prepared dataset: 24 labelled 8x8 grayscale images, with one duplicate pair."""
    root = tmp_path_factory.mktemp("valid")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 8, 8), dtype=np.uint8)
    images[5] = images[4]
    np.savez(root / "source.npz", images=images, labels=np.arange(24) % 3)
    return prepare_dataset(str(root / "source.npz"), root / "ds")


def cli(argv: list[str]) -> None:
    """`memshard ARGV` in-process: exit 0, or exit 2 with exactly one bounded `error:` line."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    lines = err.getvalue().splitlines()
    assert code in (0, 2) and "Traceback" not in err.getvalue(), err.getvalue()
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) <= MAX_MESSAGE_CHARS + 7, lines


def read_everything(folder: Path) -> None:
    cli(["data", "inspect", str(folder)])
    dataset = outcome(lambda: load_dataset(folder))
    if dataset is not None:
        assert dataset.images.shape[0] == len(dataset.sample_ids) == len(dataset.labels)
    outcome(lambda: inspect_dataset(folder))


mutations = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                        min_size=1, max_size=8)),
    st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("zero"), st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 4096))),
)


def mutated(data: bytes, mutation: tuple) -> bytes:
    """`data` with bytes flipped at relative positions, cut at one, or a run of them zeroed."""
    data = bytearray(data)
    kind, how = mutation
    if kind == "flip":
        for where, mask in how:
            data[int(where * len(data))] ^= mask
    elif kind == "cut":
        data = data[:int(how * len(data))]
    else:
        start = int(how[0] * len(data))
        data[start:start + how[1]] = bytes(len(data[start:start + how[1]]))
    return bytes(data)


@FAST
@given(mutation=mutations)
def test_corrupted_dataset_bytes_are_read_or_refused_in_one_line(valid_dataset, mutation):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "images.parquet").write_bytes(mutated((valid_dataset / "images.parquet").read_bytes(), mutation))
        read_everything(Path(tmp))


METADATA_KEYS = ["format_version", "resolution", "channels", "count", "label_names", "image_shape", "fingerprint"]


@FAST
@given(changes=st.dictionaries(st.sampled_from(METADATA_KEYS),
                               st.one_of(st.text(max_size=30), junk.map(json.dumps),
                                         st.integers(-5, 2**40).map(str)), min_size=1, max_size=3),
       drop=st.lists(st.sampled_from(["sample_id", "label", "source", "content_hash"]), max_size=2),
       retype=st.booleans())
def test_rewritten_dataset_metadata_and_columns_are_read_or_refused_in_one_line(valid_dataset, changes, drop, retype):
    table = pq.read_table(valid_dataset / "images.parquet")
    metadata = {**table.schema.metadata, **{f"memshard.{k}".encode(): v.encode("utf-8", "surrogatepass")
                                            for k, v in changes.items()}}
    for column in drop:
        if column in table.column_names:
            table = table.drop_columns([column])
    if retype and "label" in table.column_names:
        table = table.set_column(table.column_names.index("label"), "label",
                                 pa.array([str(v) for v in table.column("label").to_pylist()]))
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(table.replace_schema_metadata(metadata), Path(tmp) / "images.parquet")
        read_everything(Path(tmp))


def hf_table(count: int, rng: np.random.Generator) -> pa.Table:
    from PIL import Image

    blobs = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    features = {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": ["a", "b"]}}}}
    return pa.table({"image": pa.array([{"bytes": b, "path": None} for b in blobs]),
                     "label": pa.array([i % 2 for i in range(count)], pa.int64())}
                    ).replace_schema_metadata({b"huggingface": json.dumps(features).encode()})


@pytest.fixture(scope="module")
def valid_sources(tmp_path_factory) -> dict[str, bytes]:
    """One valid source file of each kind `data prepare` reads, as bytes."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    np.savez(root / "a.npz", images=images, labels=np.arange(6))
    np.save(root / "a.npy", images)
    pq.write_table(hf_table(6, rng), root / "a.parquet")
    from PIL import Image

    Image.fromarray(images[0]).save(root / "a.png")
    return {p.suffix: p.read_bytes() for p in root.iterdir()}


@FAST
@given(suffix=st.sampled_from([".npz", ".npy", ".parquet", ".png"]), mutation=mutations)
def test_corrupted_sources_prepare_or_fail_in_one_line(valid_sources, suffix, mutation):
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "images" / f"source{suffix}"
        source.parent.mkdir()
        source.write_bytes(mutated(valid_sources[suffix], mutation))
        target = source if suffix != ".png" else source.parent
        cli(["data", "prepare", str(target), "--out", str(Path(tmp) / "out")])
        shutil.rmtree(Path(tmp) / "out", ignore_errors=True)


# ---------------------------------------------------------------- tracking URIs, paths and register names (issue 29)


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    """Paths of every kind a user could give: a folder, a text file, a FIFO, devices, unwritable places."""
    root = tmp_path_factory.mktemp("places")
    (root / "dir").mkdir()
    (root / "file.txt").write_text("text")
    os.mkfifo(root / "fifo")
    return {"root": root, "dir": root / "dir", "file": root / "file.txt", "fifo": root / "fifo",
            "missing": root / "missing" / "deeper" / "x", "proc": Path("/proc/memshard-x"), "null": Path("/dev/null"),
            "under_null": Path("/dev/null/x"), "zero": Path("/dev/zero")}


PLACES = ["dir", "file", "fifo", "missing", "proc", "null", "under_null", "zero"]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@FAST
@given(scheme=st.sampled_from(["sqlite", "SQLite", "postgresql", "postgresql+psycopg2", "mysql", "mssql", "file", "http",
                               "https", "databricks", "foo", "", "sqlite+nodriver"]),
       host=st.sampled_from(["", "localhost", "user:pw@host", "[::1", "h"]) | st.text(max_size=8),
       port=st.none() | st.integers(-5, 10**6).map(str) | st.sampled_from(["", "x", "65535", "65536"]),
       place=st.sampled_from(PLACES) | st.text(max_size=20), allow_file_store=st.booleans())
def test_generated_tracking_uris_pass_or_fail_in_one_line_and_change_nothing(places, scheme, host, port, place,
                                                                              allow_file_store):
    from memshard.orchestrator.tracking import check_store_location

    path = str(places[place]) if place in places else place
    uri = f"{scheme}://{host}{'' if port is None else ':' + port}/{path}" if scheme else path
    before = listing(places["root"])
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = str(allow_file_store).lower()
    try:
        outcome(lambda: check_store_location(uri))
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]
    assert listing(places["root"]) == before


@FAST
@given(place=st.sampled_from(PLACES), kind=st.sampled_from(["file", "directory"]))
def test_a_place_to_write_is_accepted_or_refused_in_one_line_and_nothing_is_left(places, place, kind):
    from memshard.files import check_writable_target

    before = listing(places["root"])
    accepted = outcome(lambda: check_writable_target(places[place], "--out", kind))
    assert listing(places["root"]) == before
    assert (accepted is not None) == ((place, kind) in {("dir", "directory"), ("file", "file"), ("missing", "file"),
                                                         ("missing", "directory")})


@FAST
@given(source=st.sampled_from(["dir", "file", "fifo", "proc", "null", "under_null", "zero"]),
       out=st.sampled_from([*PLACES, "fresh"]))
def test_hostile_paths_to_data_prepare_fail_in_one_line_and_leave_no_temporary_folder(places, source, out):
    root = places["root"]
    before = listing(root)
    target = root / "fresh" if out == "fresh" else places[out]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["data", "prepare", str(places[source]), "--out", str(target)])
    assert code == 2 and "Traceback" not in err.getvalue() and len(err.getvalue().splitlines()) == 1, err.getvalue()
    made = set(listing(root)) - set(before)  # at most the output's folders, made before the source is read
    assert made <= {str(folder.relative_to(root)) for folder in target.parents if root in folder.parents}, made


model_names = st.text(max_size=12) | st.sampled_from([".", "..", "..a", "a..", ".a", " ", "a:b", "./a", "a/", "\t"])


@FAST
@given(name=model_names)
def test_register_names_are_refused_exactly_when_mlflow_would_refuse_them(name):
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name  # the registry's own rule: the oracle

    from memshard.config import check_model_name

    try:
        _validate_model_name(name)
        mlflow_takes_it = True
    except MlflowException:
        mlflow_takes_it = False
    assert (outcome(lambda: check_model_name(name, "--register-as") or True) is not None) == mlflow_takes_it


@pytest.fixture(scope="module")
def populated_store(tmp_path_factory):
    """A store holding a finished and a failed run, a logged model and a registered version; the
    workspace is its folder (checkpoints), restored afterwards."""
    import mlflow
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("populated")
    previous = {name: os.environ.get(name) for name in ("MEMSHARD_WORKSPACE", "MLFLOW_TRACKING_URI")}
    os.environ["MEMSHARD_WORKSPACE"] = str(root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("kept", artifact_location=(root / "artifacts").as_uri())
    finished = client.create_run(experiment_id)
    client.set_terminated(finished.info.run_id, "FINISHED")
    client.set_terminated(client.create_run(experiment_id).info.run_id, "FAILED")
    model = client.create_logged_model(experiment_id, name="model", source_run_id=finished.info.run_id)
    client.create_registered_model("kept-model")
    client.create_model_version("kept-model", model.artifact_location, run_id=finished.info.run_id)
    yield {"uri": uri, "run_id": finished.info.run_id, "root": root}
    mlflow.set_tracking_uri(None)
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def store_state(uri: str) -> tuple:
    """What a rejected command must leave as it was: run statuses, model versions, logged models."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return (sorted((r.info.run_id, r.info.status) for r in client.search_runs(experiments)),
            sorted((v.name, v.version, v.status) for v in client.search_model_versions()),
            sorted((m.model_id, m.status) for m in client.search_logged_models(experiments)))


@pytest.mark.integration  # a real MLflow store
@settings(max_examples=_DEEP or 25, deadline=None, derandomize=not _DEEP, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(command=st.sampled_from(["train-name", "tune-name", "compare-out", "train-data"]),
       name=model_names, place=st.sampled_from(PLACES))
def test_a_rejected_command_leaves_the_store_exactly_as_it_was(populated_store, places, command, name, place):
    from memshard.config import check_model_name

    uri, run_id = populated_store["uri"], populated_store["run_id"]
    if command.endswith("-name"):
        assume(outcome(lambda: check_model_name(name, "--register-as") or True) is None)  # refused names only
    where = ["--set", f"mlflow.tracking_uri={uri}", "--experiment", "kept"]
    argv = {"train-name": ["train", "--preset", "tiny", "--no-progress", "--register-as", name, *where],
            "tune-name": ["tune", "--preset", "tiny", "--trials", "1", "--register-as", name, *where],
            "compare-out": ["compare", run_id, "--tracking-uri", uri, "--out", str(places[place])],
            "train-data": ["train", "--preset", "tiny", "--no-progress", "--data", str(places[place]), *where]}[command]
    if command == "train-data":
        assume(place not in ("dir", "missing"))  # a folder of no images is refused by the data layer, later
    before = store_state(uri)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    assert code == 2 and "Traceback" not in err.getvalue(), err.getvalue()
    assert store_state(uri) == before
