"""`memshard evaluate` and `memshard compare` on tiny models trained here, logging to a real MLflow store."""

from __future__ import annotations

import json
import time

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from memshard.commands.cli import main
from memshard.commands.evaluate import evaluate_model
from memshard.config import build_config
from memshard.evaluation.evaluate import EvaluateSettings
from memshard.evaluation.memorization import THRESHOLDS
from memshard.orchestrator.train import train

SPACE = "pixels-random-projection-64"  # offline: no Inception weights on a test machine
SETTINGS = EvaluateSettings(num_images=32, sampler="ddim", sampling_steps=4, batch_size=16, seed=3, feature_space=SPACE)
ARTIFACTS = {"r_histogram.png", "most_r_copied.png", "samples.png", "report.json", "copies_per_sample.parquet"}


@pytest.fixture(scope="module")
def store(ray_cluster, tmp_path_factory):
    """One store for the module: two tiny models at equal compute, each evaluated once."""
    root = tmp_path_factory.mktemp("evaluate")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMSHARD_WORKSPACE", str(root))  # checkpoints, caches and MLflow's artifacts land in the temp dir
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        previous = mlflow.get_tracking_uri()
        trained = {}
        for method in ("ddpm", "iet-agc-plus"):
            cfg = build_config("tiny", overrides={"mlflow.tracking_uri": uri, "iet.method": method,
                                                  "mlflow.register_as": f"eval-{method}"})
            trained[method] = train(cfg, show_progress=False)
        evaluated = {method: evaluate_model(f"models:/eval-{method}/1", SETTINGS, tracking_uri=uri, show_progress=False)
                     for method in trained}
        yield {"uri": uri, "root": root, "trained": trained, "evaluated": evaluated}
        if mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(previous)


def test_evaluation_run_is_finished_linked_to_its_training_run_and_has_metrics_and_artifacts(store):
    client = MlflowClient(store["uri"])
    for method, result in store["evaluated"].items():
        source = store["trained"][method]
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["memshard.source_run_id"] == source.run_id == result.source_run_id
        assert run.info.experiment_id == client.get_run(source.run_id).info.experiment_id
        assert run.data.params["dataset.path"] == client.get_run(source.run_id).data.params["dataset.path"]
        assert run.data.params["dataset.matches_training_run"] == "true"
        assert run.data.params["feature_space"] == SPACE and run.data.params["num_images"] == "32"
        expected = {f"mq_{t}_{kind}" for t in THRESHOLDS for kind in ("count", "fraction")}
        expected |= {"nn_ratio_copy_count", "nn_ratio_copy_fraction", "r_copied_training_samples",
                     "near_copied_training_samples", f"fid.{SPACE}"}
        assert expected <= set(run.data.metrics)
        assert np.isfinite(run.data.metrics[f"fid.{SPACE}"]) and run.data.metrics[f"fid.{SPACE}"] > 0
        assert ARTIFACTS <= {a.path for a in client.list_artifacts(result.run_id)}


def test_report_table_and_figures_agree_with_the_metrics(store, tmp_path):
    result = store["evaluated"]["iet-agc-plus"]
    local = mlflow.artifacts.download_artifacts(run_id=result.run_id, dst_path=str(tmp_path), tracking_uri=store["uri"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fid"]["feature_space"] == SPACE and report["fid"]["value"] == result.metrics[f"fid.{SPACE}"]
    quality = report["quality"]  # the space, why, and the real-data reference beside the generations' figures
    assert quality["space"] == SPACE and "--feature-space" in quality["why"] and "training images" in quality["real_reference"]
    assert quality["generated"]["frechet"] == result.metrics[f"quality.{SPACE}.frechet"] == report["fid"]["value"]
    assert quality["real"]["frechet"] == result.metrics[f"quality.{SPACE}.real.frechet"]
    assert report["generation"]["workers"] == 2 and report["generation"]["protocol"] == "quick"  # 2 batches, 2 workers
    assert report["generation"]["sampler"] == "ddim" and report["generation"]["sampling_steps"] == 4
    assert "r < 0.5" in report["definitions"]["r_copy"] and sum(report["r_histogram"]["counts"]) == 32
    assert "near copy" in report["definitions"]["near_copy"]
    table = pq.read_table(tmp_path / "copies_per_sample.parquet").to_pandas()
    assert list(table.columns) == ["sample_id", "r_copies", "near_copies", "min_r"]
    assert len(table) == 1797 and table.sample_id.is_unique
    assert table.r_copies.sum() == result.metrics["mq_0.5_count"]  # an r-copy is r < 0.5, the MQ@0.5 condition
    assert table.near_copies.sum() == result.metrics["near_copy_count"]
    assert (table.near_copies > 0).sum() == result.metrics["near_copied_training_samples"]
    assert (table.r_copies > 0).sum() == result.metrics["r_copied_training_samples"]
    assert table.min_r.notna().sum() <= 32 and table.min_r.min() == pytest.approx(report["most_r_copied"][0]["min_r"])
    for name in ("r_histogram.png", "most_r_copied.png", "samples.png"):
        with Image.open(f"{local}/{name}") as image:
            assert image.width > 100 and image.height > 100


def test_the_same_seed_gives_the_same_numbers_from_a_runs_uri_and_a_local_checkpoint(store):
    source = store["trained"]["ddpm"]
    by_run = evaluate_model(f"runs:/{source.run_id}/model", SETTINGS, tracking_uri=store["uri"], show_progress=False)
    by_dir = evaluate_model(str(source.local_pipeline), SETTINGS, tracking_uri=store["uri"], show_progress=False)
    assert by_run.source_run_id == by_dir.source_run_id == source.run_id  # the checkpoint dir names its run
    assert by_run.metrics == by_dir.metrics == store["evaluated"]["ddpm"].metrics


def test_compare_two_training_runs_at_equal_compute(store, capsys, tmp_path):
    trained = store["trained"]
    out = tmp_path / "compare.md"
    code = main(["compare", trained["ddpm"].run_id, trained["iet-agc-plus"].run_id,
                 "--tracking-uri", store["uri"], "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    lines = printed.splitlines()
    assert lines[0].split()[:3] == ["method", "train", "run"] and f"FID [{SPACE}]" in lines[0]
    rows = [line for line in lines if line.startswith(("ddpm ", "iet-agc-plus "))]
    assert len(rows) == 2 and all(" 12 " in row for row in rows)  # 1 x 2 x 6 and 2 x 2 x 3 optimizer steps
    assert "not like for like" not in printed  # same M, seed, sampler, data and compute
    markdown = out.read_text()
    assert markdown.count("\n| ddpm |") == 1 and markdown.count("\n| iet-agc-plus |") == 1
    compare_id = printed.rsplit("compare run id: ", 1)[1].split()[0]
    client = MlflowClient(store["uri"])
    run = client.get_run(compare_id)
    assert run.info.status == "FINISHED" and run.data.tags["memshard.kind"] == "compare"
    assert client.download_artifacts(compare_id, "compare.md", str(tmp_path / "dl")).endswith("compare.md")
    assert (tmp_path / "dl" / "compare.md").read_text() == markdown


def test_cli_evaluate_prints_the_numbers(store, capsys):
    code = main(["evaluate", "models:/eval-iet-agc-plus/1", "--num-images", "8", "--sampler", "ddpm",
                 "--sampling-steps", "3", "--feature-space", "none", "--tracking-uri", store["uri"], "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "MQ@0.5: " in out and "of 8" in out and "FID" not in out
    mq = next(line for line in out.splitlines() if line.startswith("MQ@0.5: "))
    assert "; real held-out images: " in mq and "(real held-out images: a seeded 20%" in out, out
    assert "near copies (nearer to a training image than 95% of real images" in out and "about 5% by construction" in out
    assert "r-copies: training images some generation with r < 0.5 has as its nearest: " in out
    assert f"mlflow ui --backend-store-uri {store['uri']}" in out


def test_with_no_flags_the_quality_space_is_chosen_and_named_beside_every_figure(store, capsys):
    """No --feature-space: the training set's classifier (no torch-fidelity here), with a note saying why."""
    code = main(["evaluate", "models:/eval-ddpm/1", "--num-images", "20", "--sampling-steps", "3",
                 "--tracking-uri", store["uri"], "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    space = out.split("quality: ", 1)[1].split(":", 1)[0]
    assert space.startswith("trainset-classifier-cnn1-") and "the dataset has labels" in out
    assert "protocol quick (the Ray cluster has no GPU; given: --num-images, --sampling-steps): 20 generations, ddim 3" in out
    assert "first batch: 20 images in " in out and "estimated generation time" in out
    figures = [line for line in out.splitlines() if line.startswith(("FID", "mean classifier", "classes predicted"))]
    assert len(figures) == 3 and all(f"[{space}]" in line and "(real images: " in line for line in figures)
    run_id = out.split("evaluation run id: ", 1)[1].split()[0]
    metrics = MlflowClient(store["uri"]).get_run(run_id).data.metrics
    assert {f"fid.{space}", f"quality.{space}.mean_confidence", f"quality.{space}.real.frechet",
            f"quality.{space}.coverage", f"quality.{space}.real.coverage", "real_heldout.mq_0.5_fraction",
            "real_heldout.nn_ratio_copy_fraction"} <= set(metrics)


@pytest.mark.parametrize("args, message", [
    (["models:/no-such-model/1"], "could not be fetched"),
    (["models:/eval-ddpm/1", "--num-images", "1"], "need at least 2 images"),
    (["models:/eval-ddpm/1", "--sampling-steps", "5000"], "choose 1 to 1000"),
    (["models:/eval-ddpm/1", "--feature-space", "vgg"], "unknown feature space"),
    (["no/such/dir"], "neither an existing pipeline directory nor an MLflow model URI"),
    (["models:/eval-ddpm/1", "--workers", "99"], "99 generation workers needing {'CPU': 1.0} each do not fit"),
])
def test_bad_evaluate_input_is_one_line_and_logs_no_run(store, capsys, args, message):
    client = MlflowClient(store["uri"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    before = len(client.search_runs(experiments))
    code = main(["evaluate", "--feature-space", "none", *args, "--tracking-uri", store["uri"], "--no-progress"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert len(client.search_runs(experiments)) == before


def test_a_local_pipeline_without_a_run_needs_data_and_compare_needs_an_evaluation(store, tmp_path, capsys):
    pipeline = store["trained"]["ddpm"].local_pipeline
    copy = tmp_path / "loose"
    copy.symlink_to(pipeline.resolve(), target_is_directory=True)  # not under checkpoints/RUN_ID: no lineage
    assert main(["evaluate", str(copy), "--feature-space", "none", "--tracking-uri", store["uri"], "--no-progress"]) == 2
    assert "pass --data" in capsys.readouterr().err
    compare_run = store["evaluated"]["ddpm"].run_id  # an evaluation run is accepted as is; a training run
    assert main(["compare", compare_run, "--tracking-uri", store["uri"]]) == 0  # without evaluations is not:
    compare_id = capsys.readouterr().out.rsplit("compare run id: ", 1)[1].split()[0]
    assert main(["compare", compare_id, "--tracking-uri", store["uri"]]) == 2
    assert "run `memshard evaluate" in capsys.readouterr().err


def test_bad_settings_a_damaged_folder_and_a_dead_store_are_refused_before_any_work(cli_rejects, mlflow_store,
                                                                                     tmp_path):
    evaluate = ["evaluate", "--feature-space", "none", "--no-progress"]
    store = ["--tracking-uri", mlflow_store]
    cli_rejects([*evaluate, "models:/any/1", "--seed", "-1", *store], "--seed -1")
    cli_rejects([*evaluate, "models:/any/1", "--device", "bogus", *store], "'bogus'")
    for name, index in (("garbled", "{not json"), ("foreign", '{"_class_name": "StableDiffusionPipeline"}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(index)
        cli_rejects([*evaluate, str(tmp_path / name), *store], "model_index.json")
    started = time.monotonic()
    line = cli_rejects([*evaluate, "models:/any/1", "--tracking-uri", "http://u:PW@127.0.0.1:9"], "does not answer")
    assert time.monotonic() - started < 30 and "PW" not in line and "***@127.0.0.1:9" in line
