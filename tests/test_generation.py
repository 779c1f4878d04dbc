"""Generation on Ray workers (orchestrator.generation) and the defaults `memshard evaluate` chooses:
the images do not depend on the number of workers, an impossible worker count is one line, the
protocol follows the hardware, and the quality space is chosen without an error."""

from __future__ import annotations

import copy
import dataclasses
import json
import time

import numpy as np
import pytest
from conftest import untrained_tiny_pipeline

from memshard.commands.cli import build_parser
from memshard.commands.evaluate import evaluate_settings
from memshard.data import load_dataset, prepare_dataset
from memshard.errors import MemshardError
from memshard.evaluation.evaluate import EvaluateSettings, choose_quality_space, sampling_plan
from memshard.orchestrator.cluster import node_resources
from memshard.orchestrator.generation import generate_on_ray, plan_workers
from memshard.pipeline import SAMPLERS, SamplingPlan, generate_plan, use_sampler
from memshard.shard_worker.faults import FAULTS_ENV

PLAN = SamplingPlan(num_images=10, sampler="ddim", steps=3, batch_size=3, seed=7)  # 4 batches, the last of 1
PATIENT = EvaluateSettings().batch_timeout_s


@pytest.fixture(scope="module")
def pipeline():
    """An untrained tiny pipeline: what it draws does not matter, only that it draws the same."""
    return untrained_tiny_pipeline()


def in_process(pipeline, plan: SamplingPlan) -> np.ndarray:
    return generate_plan(copy.deepcopy(pipeline), plan)


def test_the_batches_and_their_seeds_are_fixed_by_the_plan_alone():
    batches = PLAN.batches()
    assert [count for count, _ in batches] == [3, 3, 3, 1]
    assert batches == dataclasses.replace(PLAN, sampler="ddpm", steps=9).batches()  # seeds: (M, B, seed) only
    assert len({seed for _, seed in batches}) == 4
    assert [seed for _, seed in dataclasses.replace(PLAN, num_images=4).batches()] == [batches[0][1], batches[1][1]]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_makes_seeded_images_on_the_training_schedule(pipeline, sampler):
    plan = dataclasses.replace(PLAN, sampler=sampler, num_images=4)
    images = in_process(pipeline, plan)
    assert images.shape == (4, 1, 8, 8) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, in_process(pipeline, plan))
    switched = use_sampler(copy.deepcopy(pipeline), sampler).scheduler
    assert switched.config.num_train_timesteps == pipeline.scheduler.config.num_train_timesteps
    assert switched.config.beta_schedule == pipeline.scheduler.config.beta_schedule
    if sampler == "dpm-solver++":
        assert switched.config.algorithm_type == "dpmsolver++" and switched.config.solver_order == 2
    with pytest.raises(MemshardError, match="unknown sampler 'euler'"):
        use_sampler(copy.deepcopy(pipeline), "euler")


def test_two_workers_make_bitwise_the_images_one_worker_makes(ray_cluster, pipeline, capsys):
    one = generate_on_ray(copy.deepcopy(pipeline), PLAN, plan_workers(1, "cpu", 4), batch_timeout_s=PATIENT,
                          show_progress=False)
    two = generate_on_ray(copy.deepcopy(pipeline), PLAN, plan_workers(2, "cpu", 4), batch_timeout_s=PATIENT,
                          show_progress=False)
    assert one.workers.count == 1 and two.workers.count == 2 and len(two.placement) == 2
    assert two.images.shape == (10, 1, 8, 8) and two.images.dtype == np.uint8
    np.testing.assert_array_equal(one.images, two.images)  # bitwise, on CPUs
    np.testing.assert_array_equal(two.images, in_process(pipeline, PLAN))  # and the plan's batches, in order
    assert all(p["device"] == "cpu" for p in two.placement) and two.details()["workers"] == 2
    printed = capsys.readouterr().out
    assert printed.count("first batch: 3 images in ") == 2 and "estimated generation time for 10 images" in printed


def test_a_stalled_generation_worker_is_replaced_after_the_batch_timeout_and_the_images_are_the_same(
    ray_cluster, pipeline, tmp_path, monkeypatch
):
    """Worker 1 sleeps for an hour on batch 1 (a real stall, test-only fault plan): after the timeout
    it is replaced, batches 1 and 3 (both sent to it) are made again, and the images are the plan's."""
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"stall_at_batches": [1], "marker_dir": str(tmp_path / "faults")}))
    started = time.monotonic()
    made = generate_on_ray(copy.deepcopy(pipeline), PLAN, plan_workers(2, "cpu", 4), batch_timeout_s=8,
                           show_progress=False)
    assert time.monotonic() - started < 120  # the timeout, a replacement and two batches: not the hour
    assert (tmp_path / "faults" / "stall-batch1").exists()  # the worker really stalled
    assert made.restarts == 1 and made.details()["worker_restarts"] == 1
    np.testing.assert_array_equal(made.images, in_process(pipeline, PLAN))  # bitwise, on CPUs

    monkeypatch.setenv(FAULTS_ENV, json.dumps({"stall_at_batches": [0], "marker_dir": str(tmp_path / "again")}))
    with pytest.raises(MemshardError) as error:
        generate_on_ray(copy.deepcopy(pipeline), PLAN, plan_workers(1, "cpu", 4), batch_timeout_s=8,
                        show_progress=False, max_restarts=0)
    message = str(error.value)
    assert "\n" not in message and message.startswith("generation worker 0 failed (no result within --batch-timeout = 8 s)")
    assert "raise --batch-timeout" in message


def test_the_default_worker_count_fills_the_cluster_and_an_impossible_one_is_one_line(ray_cluster):
    slots = sum(int(node.get("CPU", 0.0)) for node in node_resources())
    assert plan_workers(None, "auto", 1000).count == slots  # the test cluster: 2 + 1 + 1 CPUs
    assert plan_workers(None, "auto", 2).count == 2  # never more workers than batches
    assert plan_workers(1, "cpu", 10).resources.cpus == 2.0  # one worker takes the largest node's CPUs
    with pytest.raises(MemshardError) as error:
        plan_workers(slots + 5, "cpu", 1000)
    message = str(error.value)
    assert "\n" not in message and f"{slots + 5} generation workers needing {{'CPU': 1.0}} each do not fit" in message
    assert f"use --workers {slots} or fewer, or add nodes" in message
    if not any(node.get("GPU") for node in node_resources()):
        with pytest.raises(MemshardError, match="--device cuda, but the Ray cluster has no GPU"):
            plan_workers(None, "cuda", 10)


def parsed(*flags: str) -> EvaluateSettings:
    settings = evaluate_settings(build_parser().parse_args(["evaluate", "models:/m/1", *flags]))
    settings.check()
    return settings


def test_protocol_published_is_one_flag_away_and_the_cpu_default_is_sized_for_minutes():
    published = sampling_plan(parsed("--protocol", "published"), 1000, gpu=False)
    assert published.protocol == "published"
    assert (published.plan.num_images, published.plan.sampler, published.plan.steps) == (65_536, "ddpm", 1000)
    quick = sampling_plan(parsed(), 1000, gpu=False)
    assert quick.protocol == "quick" and quick.plan.num_images <= 2_000 and quick.plan.sampler in ("ddim", "dpm-solver++")
    assert "the Ray cluster has no GPU" in quick.note and "--protocol published" in quick.note
    assert sampling_plan(parsed(), 1000, gpu=True).plan == published.plan  # GPUs: the published protocol
    mixed = sampling_plan(parsed("--protocol", "published", "--num-images", "500", "--sampler", "dpm-solver++"), 1000, False)
    assert (mixed.plan.num_images, mixed.plan.sampler, mixed.plan.steps, mixed.plan.batch_size) == (500, "dpm-solver++", 20, 256)
    assert "given: --num-images, --sampler" in mixed.note
    assert sampling_plan(parsed("--sampler", "ddim"), 50, gpu=False).plan.steps == 50  # a default never exceeds the model
    with pytest.raises(MemshardError, match="choose 1 to 50"):
        sampling_plan(parsed("--sampling-steps", "100"), 50, gpu=False)
    with pytest.raises(MemshardError, match="--workers 0"):
        EvaluateSettings(workers=0).check()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return load_dataset(prepare_dataset("digits", tmp_path_factory.mktemp("data") / "digits16", resolution=16))


def test_the_default_quality_space_needs_no_optional_dependency(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(tmp_path))  # the classifier cache
    labelled = choose_quality_space(EvaluateSettings(), digits, "cpu")
    if labelled.space is None or labelled.space.name != "inception-v3":  # no torch-fidelity / weights here
        assert labelled.space.name.startswith("trainset-classifier-cnn1-") and "the dataset has labels" in labelled.reason
    unlabelled = dataclasses.replace(digits, labels=np.full(len(digits), -1, dtype=np.int64))
    choice = choose_quality_space(EvaluateSettings(), unlabelled, "cpu")
    if choice.space is None:
        assert choice.reason.startswith("no quality measure: ") and "the dataset has no labels" in choice.reason
        assert "\n" not in choice.reason
    none = choose_quality_space(EvaluateSettings(feature_space=None), digits, "cpu")
    assert none.space is None and "--feature-space none" in none.reason
