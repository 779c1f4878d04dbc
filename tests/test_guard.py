"""The copy guard's core (memshard/guard.py): guidance steers a trajectory that would land on a training
image, rejection redraws exactly the near copies, the threshold is never looser than the calibration,
and a model's reference to its training set is checked."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from conftest import untrained_tiny_pipeline

from memshard.config import NEAR_COPY_QUANTILE, GuardConfig, build_config
from memshard.data import load_dataset, resolve_dataset
from memshard.errors import MemshardError
from memshard.guard import (
    Guard,
    GuardLog,
    build_guard,
    load_guard,
    near_copy_threshold,
    read_guard_settings,
    redraw_seed,
    write_guard_reference,
)
from memshard.pipeline import SamplingPlan, generate_batch, use_sampler

SEED = 11  # the batch's torch seed


@pytest.fixture(scope="module")
def pipeline():
    """An untrained tiny pipeline: its images are noise-like, but seeded."""
    return untrained_tiny_pipeline()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return load_dataset(resolve_dataset("digits", 8, None, str(tmp_path_factory.mktemp("cache"))))


def plain_batch(pipeline, sampler: str, count: int = 6) -> tuple[SamplingPlan, np.ndarray]:
    plan = SamplingPlan(count, sampler, 10, count, 3)
    use_sampler(pipeline, sampler)
    return plan, generate_batch(pipeline, plan, count, SEED)


def sq_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a.astype(np.float64) - b.astype(np.float64)) / 255).reshape(len(a), -1).__pow__(2).sum(axis=1)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guidance_that_never_triggers_is_the_plain_sampler_bit_for_bit(pipeline, sampler):
    plan, plain = plain_batch(pipeline, sampler)
    guarded, log = Guard(GuardConfig(mode="guidance"), 0.0, plain).batch(pipeline, plan, len(plain), SEED)
    np.testing.assert_array_equal(guarded, plain)
    assert log.steered == 0 and sum(log.steered_at_step) == 0 and len(log.steered_at_step) == plan.steps


def test_a_guarded_plan_is_its_batches_in_order(pipeline):
    """`Guard.plan` (the registered model's predict, tune's and the bench's guarded measurements): the
    plan's batches and seeds, so with nothing to reject it is `generate_plan`'s images."""
    from memshard.pipeline import generate_plan

    plan = SamplingPlan(5, "ddim", 4, 2, 9)  # batches of 2, 2, 1
    plain = generate_plan(pipeline, plan)
    unreachable = Guard(GuardConfig(mode="reject"), 0.0, plain)
    images, log = unreachable.plan(pipeline, plan)
    np.testing.assert_array_equal(images, plain)
    assert (log.generations, log.redrawn) == (5, 0)
    copying = Guard(GuardConfig(mode="reject"), 1e-6, plain[[3]])  # only generation 3 is a copy
    images, log = copying.plan(pipeline, plan, plain)
    np.testing.assert_array_equal(np.delete(images, 3, axis=0), np.delete(plain, 3, axis=0))
    assert log.redrawn == 1 and not np.array_equal(images[3], plain[3])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guidance_moves_a_trajectory_that_would_land_on_a_training_image(pipeline, sampler):
    """The plain batch's own images are the 'training set': unguarded, every generation is an exact copy.
    Guided, each is steered in the last steps and ends near the threshold distance, not on its image."""
    plan, plain = plain_batch(pipeline, sampler)
    threshold = float(np.median(sq_distance(plain, np.roll(plain, 1, axis=0)))) / 4  # a quarter of the spread
    guard = Guard(GuardConfig(mode="guidance", scale=2.0), threshold, plain)
    assert guard.near_copies(plain).all()
    guarded, log = guard.batch(pipeline, plan, len(plain), SEED)
    assert log.steered == len(plain) and max(log.steered_at_step) == len(plain)
    assert log.steered_at_step[0] == 0  # the first x0-hat is a blur far from any image: not steered
    assert (sq_distance(guarded, plain) > threshold / 2).all(), sq_distance(guarded, plain)
    assert log.unresolved == int(guard.near_copies(guarded).sum()) < len(plain) / 2
    np.testing.assert_array_equal(guarded, guard.batch(pipeline, plan, len(plain), SEED)[0])  # seeded


def test_rejection_redraws_exactly_the_near_copies_from_the_seed_schedule(pipeline):
    plan, plain = plain_batch(pipeline, "ddim")
    training = plain[[0, 2]]  # generations 0 and 2 copy the training set, the other four do not
    threshold = float(sq_distance(plain[[1, 3, 4, 5]], plain[[0, 0, 0, 0]]).min()) / 2
    guard = Guard(GuardConfig(mode="reject"), threshold, training)
    guarded, log = guard.batch(pipeline, plan, len(plain), SEED)
    np.testing.assert_array_equal(guarded[[1, 3, 4, 5]], plain[[1, 3, 4, 5]])
    redraw = generate_batch(pipeline, plan, 2, redraw_seed(SEED, 1))  # round 1: two images, the schedule's seed
    np.testing.assert_array_equal(guarded[[0, 2]], redraw)
    assert (log.redrawn, log.rejected_draws, log.extra_images, log.unresolved) == (2, 2, 2, 0)
    again, _ = guard.batch(pipeline, plan, len(plain), SEED, plain=plain)  # from the plain batch made already
    np.testing.assert_array_equal(again, guarded)


def test_rejection_reports_what_it_cannot_resolve(pipeline):
    """A threshold no draw can escape: every round redraws all, and all are reported unresolved."""
    plan, plain = plain_batch(pipeline, "ddim", count=3)
    guard = Guard(GuardConfig(mode="reject", max_redraws=2), 1e9, plain)
    guarded, log = guard.batch(pipeline, plan, 3, SEED)
    assert (log.redrawn, log.rejected_draws, log.extra_images, log.unresolved) == (3, 9, 6, 3)
    np.testing.assert_array_equal(guarded, generate_batch(pipeline, plan, 3, redraw_seed(SEED, 2)))


def test_logs_add_up_and_a_guard_travels_by_pickle(pipeline):
    a = GuardLog("guidance", 4, 1, [0, 1, 1], unresolved=1)
    b = GuardLog("guidance", 2, 2, [0, 0, 2, 2], unresolved=0)
    merged = a.merge(b)
    assert (merged.generations, merged.steered, merged.steered_at_step, merged.unresolved) == (6, 3, [0, 1, 3, 2], 1)
    assert merged.metrics()["guard.first_steered_step"] == 1 and merged.metrics()["guard.last_steered_step"] == 3
    _, plain = plain_batch(pipeline, "ddim", count=3)
    guard = Guard(GuardConfig(mode="guidance", scale=1.5), 0.25, plain)
    copy = pickle.loads(pickle.dumps(guard))
    assert copy.describe() == guard.describe()
    np.testing.assert_array_equal(copy.images, plain)


def test_the_threshold_is_the_calibration_or_stricter_never_looser(digits):
    calibrated = near_copy_threshold(digits, seed=0)
    assert build_guard(GuardConfig(mode="reject"), digits).threshold == calibrated
    stricter = build_guard(GuardConfig(mode="reject", quantile=0.2), digits).threshold
    assert stricter > calibrated  # flags more generations
    with pytest.raises(MemshardError, match="guard.quantile = 0.01"):
        build_guard(GuardConfig(mode="reject", quantile=0.01), digits)
    with pytest.raises(MemshardError, match="looser than the calibration"):
        near_copy_threshold(digits, seed=0, quantile=NEAR_COPY_QUANTILE / 2)
    for bad, message in [({"mode": "on"}, "guard.mode"), ({"scale": 0.0}, "guard.scale"),
                         ({"max_redraws": -1}, "guard.max_redraws"), ({"carry": "weights"}, "guard.carry")]:
        with pytest.raises(MemshardError, match=message):
            build_config("tiny", sets=[f"guard.{k}={v}" for k, v in bad.items()])


def test_a_model_references_its_training_set_and_refuses_a_changed_one(digits, tmp_path):
    from memshard.data import DATASET_FILE
    from memshard.unlearning.runner import write_subset

    data = load_dataset(write_subset(digits, np.arange(60), tmp_path / "data"))
    folder = write_guard_reference(GuardConfig(mode="reject"), data, tmp_path / "model")
    assert read_guard_settings(folder).mode == "reject"
    assert not (folder / "guard_images.npy").exists()  # a reference, not the images
    guard = load_guard(folder)
    assert guard.mode == "reject" and guard.threshold == near_copy_threshold(data, seed=0)
    assert load_guard(folder, "off") is None and load_guard(folder, "guidance").mode == "guidance"

    write_subset(digits, np.arange(1, 61), tmp_path / "data")  # prepared again: one image out, another in
    with pytest.raises(MemshardError, match="has changed since the model was trained") as changed:
        load_guard(folder)
    assert "\n" not in str(changed.value)
    (tmp_path / "data" / DATASET_FILE).unlink()
    with pytest.raises(MemshardError, match="missing or unreadable"):
        load_guard(folder)


def test_a_model_may_carry_its_images_when_asked(digits, tmp_path):
    from memshard.data import DATASET_FILE
    from memshard.unlearning.runner import write_subset

    data = load_dataset(write_subset(digits, np.arange(60), tmp_path / "data"))
    folder = write_guard_reference(GuardConfig(mode="guidance", carry="images"), data, tmp_path / "model")
    (tmp_path / "data" / DATASET_FILE).unlink()
    guard = load_guard(folder)
    assert guard.mode == "guidance" and guard.threshold == near_copy_threshold(data, seed=0)
    assert len(guard.images) == len(np.unique(data.content_hashes))
