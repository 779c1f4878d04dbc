"""`memshard evaluate --guard`: the plain and the guarded generations of one plan, measured the same way
in one run, on real Ray workers and a real MLflow store; guarded generation is the same for any number
of workers.

The model is an untrained tiny pipeline (it draws noise) and the data it is scanned against is the
digits plus that model's own plain generations: every plain generation is then an exact copy of a
"training" image, and a working guard must leave fewer."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits

from memshard.commands.cli import main
from memshard.config import GuardConfig
from memshard.data import load_dataset, resolve_dataset
from memshard.evaluation.evaluate import (
    GUARDED_PREFIX,
    EvaluateSettings,
    Generation,
    GuardedGeneration,
    evaluate,
    evaluation_guard,
    sampling_plan,
)
from memshard.evaluation.quality import QualitySpaceChoice
from memshard.guard import GuardLog, guard_over, write_guard_reference
from memshard.model import build_unet, state_to_numpy
from memshard.orchestrator.generation import generate_on_ray, plan_workers
from memshard.pipeline import SamplingPlan, build_pipeline, generate_plan, save_pipeline, use_sampler

PLAN = SamplingPlan(num_images=16, sampler="ddim", steps=4, batch_size=8, seed=3)  # 2 batches
PLAN_FLAGS = ["--num-images", "16", "--sampler", "ddim", "--sampling-steps", "4", "--batch", "8", "--seed", "3"]
SPACE = "pixels-random-projection-64"  # offline: no Inception weights on a test machine
PATIENT = EvaluateSettings().batch_timeout_s


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained tiny pipeline saved as a folder, its plan's plain generations, and the data file
    (digits + those generations) to scan it against."""
    from memshard.config import build_config

    root = tmp_path_factory.mktemp("guard-evaluate")
    cfg = build_config("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_unet(cfg, 1)
    pipeline = build_pipeline(cfg, 1, state_to_numpy(unet))
    folder = save_pipeline(pipeline, root / "model")
    plain = generate_plan(copy.deepcopy(pipeline), PLAN)
    digits = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    data = root / "digits_and_copies.npy"
    np.save(data, np.concatenate([digits, plain[:, 0]]))
    return {"pipeline": pipeline, "folder": folder, "plain": plain, "data": str(data), "root": root}


def run_evaluate(args: list[str], store: str, capsys) -> tuple[str, dict, dict]:
    code = main(["evaluate", *args, *PLAN_FLAGS, "--tracking-uri", store, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    run = MlflowClient(store).get_run(out.split("evaluation run id: ", 1)[1].split()[0])
    return out, run.data.metrics, run.data.params


def test_guarded_figures_sit_beside_the_plain_ones_in_one_run_and_the_plain_ones_are_unchanged(
    ray_cluster, model, mlflow_store, capsys, tmp_path
):
    given = [str(model["folder"]), "--data", model["data"], "--feature-space", SPACE, "--workers", "2"]
    out, metrics, params = run_evaluate([*given, "--guard", "reject"], mlflow_store, capsys)
    assert metrics["near_copy_count"] == 16 and metrics["near_copy_fraction"] == 1.0  # every plain one is a copy
    assert metrics[f"{GUARDED_PREFIX}.near_copy_count"] < metrics["near_copy_count"]
    assert metrics[f"{GUARDED_PREFIX}.near_copy_count"] == metrics["guard.unresolved"]  # one threshold: the same count
    assert metrics["guard.redrawn"] == 16 and metrics["guard.generations"] == 16 and metrics["guard.rejected_draws"] >= 16
    assert {f"{GUARDED_PREFIX}.fid.{SPACE}", f"{GUARDED_PREFIX}.mq_0.5_fraction",
            f"{GUARDED_PREFIX}.near_copied_training_samples", "guard.seconds", "guard.plain_seconds"} <= set(metrics)
    assert not any(key.startswith(f"{GUARDED_PREFIX}.real_heldout") or ".real." in key and key.startswith(GUARDED_PREFIX)
                   for key in metrics)  # the real references are the plain run's, not logged twice
    assert params["guard.mode"] == "reject" and params["guard.quantile"] == "0.05"
    assert float(params["guard.sq_distance"]) == pytest.approx(metrics["near_copy_sq_distance"])  # the same threshold
    assert "guard: reject (--guard)" in out
    table = out[out.index("guard reject, 16 generations each:"):].splitlines()
    assert table[1].split() == ["measure", "unguarded", "guarded"]
    near = next(line for line in table if line.strip().startswith("near copies"))
    assert "16 (100.00%)" in near and any(line.strip().startswith(f"FID [{SPACE}]") for line in table)
    assert "the guard redrew 16 generations" in out

    client = MlflowClient(mlflow_store)
    run_id = out.split("evaluation run id: ", 1)[1].split()[0]
    assert {"guarded_samples.png", "report.json"} <= {a.path for a in client.list_artifacts(run_id)}
    report = json.loads(open(client.download_artifacts(run_id, "report.json", str(tmp_path))).read())
    assert report["guard"]["settings"]["guard.mode"] == "reject" and report["guard"]["did"]["redrawn"] == 16
    assert report["guard"]["metrics"][f"{GUARDED_PREFIX}.near_copy_count"] == metrics[f"{GUARDED_PREFIX}.near_copy_count"]
    assert report["generation"]["guard_batch_seconds"] > 0

    # No guard (the model carries none): the plain figures exactly, and nothing of the guard.
    _, plain_metrics, plain_params = run_evaluate(given, mlflow_store, capsys)
    assert plain_metrics == {key: value for key, value in metrics.items()
                             if not key.startswith((f"{GUARDED_PREFIX}.", "guard."))}
    assert not any(key.startswith("guard.") for key in plain_params)


def test_the_models_own_guard_section_is_the_default_and_a_flag_makes_it_stricter(ray_cluster, model, mlflow_store,
                                                                                  capsys):
    folder = model["root"] / "guarded-model"
    if not folder.exists():
        shutil.copytree(model["folder"], folder / "pipeline")
        dataset = load_dataset(resolve_dataset(model["data"], 8, 1, model["root"] / "cache"))
        write_guard_reference(GuardConfig(mode="reject", quantile=0.1), dataset, folder / "guard")
    given = [str(folder), "--data", model["data"], "--feature-space", "none", "--workers", "1"]
    out, metrics, params = run_evaluate(given, mlflow_store, capsys)
    assert "guard: reject (the model's guard section)" in out
    assert params["guard.mode"] == "reject" and params["guard.quantile"] == "0.1"
    assert float(params["guard.sq_distance"]) > metrics["near_copy_sq_distance"]  # stricter: a larger threshold
    _, _, params = run_evaluate([*given, "--guard-quantile", "0.2"], mlflow_store, capsys)
    assert params["guard.quantile"] == "0.2"
    _, metrics, params = run_evaluate([*given, "--guard", "off"], mlflow_store, capsys)
    assert not any(key.startswith(("guard.", f"{GUARDED_PREFIX}.")) for key in [*metrics, *params])


def test_bad_guard_flags_are_one_line_before_any_work(cli_rejects, mlflow_store):
    for args, message in (
        (["--guard", "foo"], "--guard 'foo': choose one of off, reject, guidance"),
        (["--guard", "reject", "--guard-quantile", "0.01"], "--guard-quantile 0.01: guard.quantile = 0.01: give 0.05"),
        (["--guard", "guidance", "--guard-scale", "0"], "--guard-scale 0.0: guard.scale = 0.0: give a number in (0, 100]"),
        (["--guard", "off", "--guard-scale", "2"], "--guard-scale set a guard, but the guard is off (--guard off)"),
    ):
        cli_rejects(["evaluate", "models:/any/1", *args, "--tracking-uri", mlflow_store, "--no-progress"], message)
    assert not MlflowClient(mlflow_store).search_experiments(filter_string="name = 'memshard'")  # nothing logged


def test_a_guard_flag_on_a_model_without_a_guard_needs_a_mode(cli_rejects, mlflow_store, model):
    cli_rejects(["evaluate", str(model["folder"]), "--data", model["data"], "--guard-quantile", "0.2",
                 "--tracking-uri", mlflow_store, "--no-progress"],
                "--guard-quantile set a guard, but the guard is off (the model carries no guard): add --guard reject")


@pytest.mark.parametrize("mode", ["reject", "guidance"])
def test_guarded_generation_is_bitwise_the_same_for_one_and_two_workers(ray_cluster, model, mode):
    """The guard keeps generations away from the plan's own plain images: reject redraws every one,
    guidance steers every one; both give the images the guard makes in this process, for 1 and 2 workers."""
    pipeline, plain = model["pipeline"], model["plain"]
    guard = guard_over(GuardConfig(mode=mode, max_redraws=2), plain)
    made = [generate_on_ray(copy.deepcopy(pipeline), PLAN, plan_workers(count, "cpu", 2), batch_timeout_s=PATIENT,
                            show_progress=False, guard=guard) for count in (1, 2)]
    here = use_sampler(copy.deepcopy(pipeline), PLAN.sampler)
    batches = [guard.batch(here, PLAN, count, seed) for count, seed in PLAN.batches()]
    expected = np.concatenate([images for images, _ in batches])
    for result in made:
        np.testing.assert_array_equal(result.images, plain)  # the plain images as without a guard
        np.testing.assert_array_equal(result.guarded, expected)  # bitwise, on CPUs, in batch order
        assert result.guard_log == batches[0][1].merge(batches[1][1]) and result.guard_log.generations == 16
        assert result.guard_seconds > 0 and result.plain_batch_seconds > 0
    assert not np.array_equal(expected, plain)
    assert (made[0].guard_log.redrawn if mode == "reject" else made[0].guard_log.steered) == 16


def test_evaluate_measures_the_guarded_generations_as_it_measures_the_plain_ones(model, tmp_path):
    """The library alone: the plain figures do not change with a guard beside them; the guarded ones
    are the same measures, under GUARDED_PREFIX, counted at the same threshold."""
    dataset = load_dataset(resolve_dataset(model["data"], 8, 1, tmp_path / "cache"))
    settings = EvaluateSettings(num_images=16, batch_size=8, sampler="ddim", sampling_steps=4, seed=3,
                                feature_space=None, guard="reject")
    guard = evaluation_guard(settings.guard_settings(None), dataset, settings.seed)
    plain = model["plain"]
    fresh = np.ascontiguousarray(np.flip(plain, axis=3))  # mirrored noise: no near copies
    log = GuardLog("reject", generations=16, redrawn=16, rejected_draws=16, extra_images=16)
    guarded = GuardedGeneration(fresh, log, guard.describe(), {"plain_batches": 1.0, "guarded_batches": 0.5})
    choice, space = sampling_plan(settings, 1000, gpu=False), QualitySpaceChoice(None, "none")
    with_guard = evaluate(choice, dataset, lambda plan: Generation(plain, "cpu", {}, guarded), settings, space)
    without = evaluate(choice, dataset, lambda plan: Generation(plain, "cpu", {}), settings, space)
    assert guard.threshold == with_guard.near_copy_threshold  # the evaluation's threshold, at the default quantile
    metrics = with_guard.metrics()
    assert without.metrics() == {k: v for k, v in metrics.items() if not k.startswith((f"{GUARDED_PREFIX}.", "guard."))}
    assert metrics["near_copy_count"] == 16 and metrics[f"{GUARDED_PREFIX}.near_copy_count"] == 0
    assert metrics["guard.redrawn"] == 16 and metrics["guard.seconds"] == 0.5
    assert with_guard.params()["guard.mode"] == "reject" and "guard.mode" not in without.params()
    assert "guard" in with_guard.summary(dataset) and "guard" not in without.summary(dataset)
