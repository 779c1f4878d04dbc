"""The efficacy bench's duplicated-image regime (issue 24 regime b): the training set it writes and the
count of each planted image's reproductions. The curves are a benchmark; what builds and reads them is tested."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from memshard.config import build_config
from memshard.guard import near_copy_threshold

BENCH = Path(__file__).resolve().parents[1] / "bench" / "efficacy_curves.py"


def load_bench(path: Path):
    """A bench script as a module, registered under its name (dataclasses look their module up by name)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench(BENCH)


@pytest.fixture(scope="module")
def duplicated(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    cfg = build_config("digits", sets=[f"data.cache_dir={root / 'cache'}"])
    return bench.load_data(cfg, None, duplicates=True)


def test_one_pixel_shift_moves_the_image_and_fills_the_edge_with_background(bench):
    image = np.arange(1, 10, dtype=np.uint8).reshape(1, 3, 3)
    assert bench.shift_one_pixel(image, 1, 0).tolist() == [[[0, 0, 0], [1, 2, 3], [4, 5, 6]]]
    assert bench.shift_one_pixel(image, 0, -1).tolist() == [[[2, 3, 0], [5, 6, 0], [8, 9, 0]]]


def test_each_planted_image_appears_as_often_as_planned_and_nothing_else_changes(bench, duplicated):
    full, train = duplicated.quality, duplicated.train
    assert duplicated.regime == "duplicated"
    assert len(train) == len(full) + sum(p.times - 1 for p in bench.PLANTS)
    np.testing.assert_array_equal(train.images[:len(full)], full.images)  # the whole data first, unchanged
    groups = bench.planted_rows(train, full)
    for plant in bench.PLANTS:
        rows = groups[plant.name]
        assert len(rows) == plant.times and plant.row in rows
        assert (train.labels[rows] == full.labels[plant.row]).all()
        exact = (train.images[rows] == full.images[plant.row]).all(axis=(1, 2, 3))
        assert exact.sum() == (1 if plant.shifted else plant.times)  # shifted copies differ from the original
    assert len(set(train.sample_ids)) == len(train)


def test_a_reproduction_is_a_near_copy_of_the_plant_or_of_one_of_its_copies(bench, duplicated):
    full, train = duplicated.quality, duplicated.train
    groups = bench.planted_rows(train, full)
    threshold = near_copy_threshold(train, seed=0)
    exact_100, shifted_100 = (groups[name] for name in ("exact_100x", "shifted_100x"))
    generated = np.stack([
        train.images[exact_100[-1]],  # a copy of the 100x image
        train.images[shifted_100[-1]],  # one of the shifted copies of the other
        train.images[shifted_100[-2]],
        full.images[500],  # an ordinary training image: a near copy, of no plant
        np.zeros_like(full.images[0]),  # nothing like any digit
    ])
    counts = bench.planted_reproductions(generated, train, groups, threshold, "cpu")
    assert counts == {"reproduced_exact_10x": 0, "reproduced_exact_100x": 1, "reproduced_shifted_10x": 0,
                      "reproduced_shifted_100x": 2}
    assert set(counts) == set(bench.PLANTED_FIELDS) and set(bench.PLANTED_FIELDS) <= set(bench.CSV_FIELDS)


@pytest.fixture(scope="module")
def guard_bench():
    return load_bench(BENCH.with_name("copy_guard.py"))


def guard_run(models: list[str], **settings) -> dict:
    """A copy-guard bench result as the bench writes it, one point per model and setting."""
    return {"environment": {"command": "bench/copy_guard.py"},
            "settings": {"regime": "duplicated", "num_images": 500, "sampler": "ddim", "sampling_steps": 50,
                         "eval_seed": 0, "guards": ["reject"], "models": models, **settings},
            "points": [{"model": m, "setting": s, "generations_near_copies": 0.1 if s == "none" else 0.0,
                        "reproduced_exact_100x": 4 if s == "none" else 0, "real_frechet": 7.0}
                       for m in models for s in ("none", "reject")]}


def test_the_guard_bench_merges_runs_of_one_measurement_and_refuses_any_other(guard_bench, tmp_path):
    merged = guard_bench.merge_results([guard_run(["s0"]), guard_run(["s1", "s2"])])
    assert merged["settings"]["models"] == ["s0", "s1", "s2"] and len(merged["points"]) == 6
    guard_bench.write_outputs(tmp_path, merged, merged["settings"]["guards_measured"])
    none, reject = merged["summary"]
    assert (none["setting"], none["models"], none["reproduced_exact_100x"]) == ("none", 3, 4.0)
    assert reject["reproduced_exact_100x"] == 0.0
    assert "reproduced_exact_100x |" in (tmp_path / "summary.md").read_text()  # the planted image's column
    with pytest.raises(SystemExit, match="differ in num_images"):
        guard_bench.merge_results([guard_run(["s0"]), guard_run(["s1"], num_images=100)])
    with pytest.raises(SystemExit, match="a model is in two runs"):
        guard_bench.merge_results([guard_run(["s0"]), guard_run(["s0"])])
