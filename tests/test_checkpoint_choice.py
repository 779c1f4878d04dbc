"""`memshard train`'s checkpoint choice: the rule on constructed curves, then real runs that register the
round the rule chose (an earlier one than the last) or, with --register-last-round, the last."""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from memshard.commands.checkpoint_choice import CheckpointChoice, measured_rounds
from memshard.config import build_config
from memshard.errors import MemshardError
from memshard.tuning.choice import Point, best_quality_budget, choose


def curve(*rounds: tuple[int, float, float]) -> list[Point]:
    """(round, training images nearly copied, Fréchet) of one run of 2 shards x 10 steps a round."""
    return [Point("run", r, near, near / 100, frechet, 1.0, 2, 20.0 * r) for r, near, frechet in rounds]


def chosen_round(points: list[Point], max_quality_loss: float = 0.10) -> int | None:
    choice = choose(points, best_quality_budget(points, max_quality_loss))
    return None if choice.chosen is None else choice.chosen.round


def test_the_round_that_copies_least_within_the_budget_of_the_best_quality_is_chosen():
    points = curve((2, 0, 300.0), (4, 1, 109.0), (6, 3, 104.0), (8, 5, 100.0))
    assert chosen_round(points) == 4  # round 2 copies less but is 3x the best Fréchet: over budget
    assert chosen_round(points, max_quality_loss=0.05) == 6  # 109 > 105: round 4 drops out
    assert chosen_round(points, max_quality_loss=0.0) == 8
    assert chosen_round(points, max_quality_loss=2.0) == 2


def test_the_best_quality_round_that_copies_most_is_passed_over():
    points = curve((3, 2, 95.0), (6, 9, 90.0))
    assert chosen_round(points) == 3
    assert best_quality_budget(points, 0.1).reference.round == 6


def test_ties_in_copying_go_to_the_earlier_round_within_the_budget():
    points = curve((2, 1, 150.0), (4, 1, 108.0), (6, 1, 101.0), (8, 1, 100.0))
    assert chosen_round(points) == 4  # round 2 copies as little, but is over budget
    same = curve((1, 0, 100.0), (2, 0, 100.0), (3, 0, 100.0))
    assert chosen_round(same) == 1


def test_worse_class_coverage_than_the_best_round_is_over_budget():
    points = curve((4, 0, 101.0), (8, 2, 100.0))
    points[0] = Point("run", 4, 0, 0.0, 101.0, 0.5, 2, 80.0)  # within +10% of Fréchet, but half the classes drawn
    assert chosen_round(points) == 8


def test_a_curve_without_a_finite_frechet_has_no_budget():
    assert best_quality_budget(curve((2, 0, math.nan), (4, 1, math.inf)), 0.1) is None
    assert best_quality_budget([], 0.1) is None


def test_measured_rounds_are_every_eth_and_the_last():
    assert measured_rounds(build_config("tiny", sets=["selection.every=2", "iet.rounds=5"])) == {2, 4, 5}
    assert measured_rounds(build_config("tiny", sets=["iet.rounds=5"])) == set()  # the tiny preset measures nothing
    assert measured_rounds(build_config(sets=["iet.rounds=10"])) == {2, 4, 6, 8, 10}


@pytest.mark.parametrize("sets, message", [
    (["selection.every=-1"], "selection.every = -1"),
    (["selection.max_quality_loss=11"], "selection.max_quality_loss = 11"),
    (["selection.register=first"], "selection.register = 'first'"),
    (["selection.num_images=1"], "selection.num_images = 1"),
    (["selection.sampling_steps=5000"], "selection.sampling_steps = 5000"),
])
def test_bad_selection_settings_are_one_line_errors(sets, message):
    with pytest.raises(MemshardError, match=message.replace("(", r"\(")):
        build_config("tiny", sets=sets)


def few_templates(root) -> str:
    """12 distinct 8x8 images (4 labelled shapes, 3 variants each, 8 copies of each): a small model copies
    them within a few rounds, so the later rounds copy more than the first (0, 3, 4 images at 50 steps)."""
    from memshard.data import prepare_dataset

    rng = np.random.default_rng(0)
    shapes = [np.zeros((8, 8), np.uint8) for _ in range(4)]
    shapes[0][:, 3:5] = 255
    shapes[1][3:5, :] = 255
    np.fill_diagonal(shapes[2], 255)
    np.fill_diagonal(shapes[2][:, 1:], 255)
    shapes[3][1:7, 1] = shapes[3][1:7, 6] = shapes[3][1, 1:7] = shapes[3][6, 1:7] = 255
    images, labels = [], []
    for label, shape in enumerate(shapes):
        for _ in range(3):
            variant = shape.copy()
            spots = rng.choice(64, 4, replace=False)
            variant.flat[spots] = 255 - variant.flat[spots]
            images += [variant] * 8
            labels += [label] * 8
    np.savez(root / "shapes.npz", images=np.array(images), labels=np.array(labels))
    return str(prepare_dataset(str(root / "shapes.npz"), root / "shapes"))


CURVE_SETTINGS = ["selection.every=1", "selection.num_images=40", "selection.sampling_steps=20",
                  "selection.batch_size=20", "training.learning_rate=0.002"]


def test_a_run_registers_an_earlier_round_that_copies_less_within_the_budget(ray_cluster, mlflow_store, tmp_path):
    from memshard.data import load_dataset
    from memshard.evaluation.curve_point import Data, measure
    from memshard.evaluation.evaluate import EvaluateSettings
    from memshard.evaluation.quality import default_quality_space
    from memshard.orchestrator.train import train
    from memshard.pipeline import load_pipeline

    data = few_templates(tmp_path)
    # A budget of 11x the best Fréchet: every round of this short run is within it, so copying decides.
    cfg = build_config("tiny", overrides={"mlflow.tracking_uri": mlflow_store, "data.path": data, "iet.rounds": 3,
                                          "iet.shards": 1, "iet.local_steps": 50, "iet.method": "ddpm"},
                       sets=[*CURVE_SETTINGS, "selection.max_quality_loss=10"])
    choice = CheckpointChoice(cfg, say=lambda line: None)
    choice.prepare()
    result = train(cfg, show_progress=False, hooks=choice.hooks())
    choice.remove_candidates()

    points = {p.round: p for p in choice.points.values()}
    assert sorted(points) == [1, 2, 3]
    chosen = choice.registered_round
    assert chosen < 3 and points[chosen].near_copied < points[3].near_copied, points
    client = MlflowClient(mlflow_store)
    run = client.get_run(result.run_id)
    assert run.data.tags["memshard.registered_round"] == str(chosen)
    assert [m.step for m in client.get_metric_history(result.run_id, "selection.frechet")] == [1, 2, 3]
    logged = json.loads(open(mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="selection.json", tracking_uri=mlflow_store)).read())
    assert logged["registered_round"] == logged["chosen_round"] == chosen and len(logged["points"]) == 3
    assert not (result.local_pipeline.parent / "selection").exists()  # the kept weights are gone once logged

    # The registered model is the chosen round's: measured again, in this process, it gives that round's point.
    mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{cfg.mlflow.register_as}/{result.registered_version}",
                                        dst_path=str(tmp_path / "registered"), tracking_uri=mlflow_store)
    registered = load_pipeline(next((tmp_path / "registered").rglob("model_index.json")).parent)
    weights = {k: v.numpy() for k, v in registered.unet.state_dict().items()}
    dataset = load_dataset(data)
    sel = cfg.selection
    again = measure(cfg, weights, Data(dataset, dataset, "full"),
                    EvaluateSettings(protocol="quick", num_images=sel.num_images, sampler=sel.sampler,
                                     sampling_steps=sel.sampling_steps, batch_size=sel.batch_size,
                                     seed=cfg.training.seed, feature_space=None),
                    default_quality_space(dataset, "cpu").space, "cpu").figures
    assert again["copied_near"] == points[chosen].near_copied
    assert math.isclose(again["frechet"], points[chosen].frechet, rel_tol=1e-6)


def test_register_last_round_registers_the_last_round(ray_cluster, mlflow_store, tmp_path, capsys):
    from memshard.commands.cli import main

    data = few_templates(tmp_path)
    code = main(["train", "--preset", "tiny", "--data", data, "--rounds", "2", "--local-steps", "3",
                 "--register-last-round", "--max-quality-loss", "1000%", "--no-progress",
                 "--set", f"mlflow.tracking_uri={mlflow_store}",
                 *[arg for setting in CURVE_SETTINGS for arg in ("--set", setting)]])
    out = capsys.readouterr().out
    assert code == 0, out
    # Three steps barely move the model: both rounds copy alike, so the rule would take round 1.
    assert "registered the last round (round 2, --register-last-round); the rule would choose round 1" in out, out
    client = MlflowClient(mlflow_store)
    version = client.search_model_versions("name='memshard-tiny'")[0]
    run = client.get_run(version.run_id)
    assert run.data.tags["memshard.registered_round"] == "2"
    assert run.data.params["selection.register"] == "last"


def test_the_shard_actors_generate_the_images_one_process_makes(ray_cluster):
    from memshard.data import load_dataset, resolve_dataset
    from memshard.orchestrator.rounds import start_shard_driver
    from memshard.orchestrator.sharding import split_into_shards
    from memshard.pipeline import SamplingPlan, build_pipeline, generate_plan

    cfg = build_config("tiny", overrides={"iet.shards": 2})
    dataset = load_dataset(resolve_dataset(cfg.data.path, cfg.data.resolution, cfg.data.channels, cfg.data.cache_dir))
    plan = SamplingPlan(num_images=5, sampler="ddim", steps=4, batch_size=2, seed=3)  # 3 batches over 2 proxies
    with start_shard_driver(cfg, dataset.images, split_into_shards(len(dataset), 2, 0)) as (driver, _):
        driver.run_round(1, is_last=False)
        made = driver.generate(driver.model_weights, plan)
        here = generate_plan(build_pipeline(cfg, dataset.channels, driver.model_weights), plan)
    assert made.dtype == np.uint8 and made.shape == (5, 1, 8, 8)
    np.testing.assert_array_equal(made, here)
