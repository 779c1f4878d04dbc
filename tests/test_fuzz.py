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
