"""`memshard unlearn` end to end: a tiny model trained here on data with one planted image repeated
many times (so it copies that image), on the session's real Ray cluster and a real MLflow store."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.datasets import load_digits

from memshard.commands.cli import main
from memshard.commands.unlearn import parse_unlearn_sets, unlearn_model
from memshard.config import build_config
from memshard.data import content_hash, load_dataset, resolve_dataset
from memshard.errors import MemshardError
from memshard.guard import GUARD_FILE
from memshard.model import build_scheduler, build_unet
from memshard.orchestrator.train import train
from memshard.unlearning import methods
from memshard.unlearning.audit import AuditSettings
from memshard.unlearning.forget_check import CheckPoint, ForgetCheck
from memshard.unlearning.forget_set import parse_forget_spec
from memshard.unlearning.methods import METHODS, UnlearnSettings, combine_gradients, siss_log_weights, unlearn

PLANTED_COPIES = 60
AUDIT = ["audit.num_images=32", "audit.sampling_steps=20"]
# The tiny planted model (trained at 1e-3 for 300 steps) forgets in ~100 steps at 2e-4, checked every
# 20; the digits-measured defaults (1e-4, every 10) are slower on it than the tests' 200-step cap allows.
TINY = ["learning_rate=2e-4", "check_every=20"]


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process UNets here are tiny: one thread, so that a busy shared machine does not make
    two OpenMP threads spin against each other (50× slower at a load of 8 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted(ray_cluster, tmp_path_factory):
    """100 digits plus one digit repeated 60 times; a DDPM trained on it until it copies that digit."""
    root = tmp_path_factory.mktemp("planted")
    digits = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    rng = np.random.default_rng(0)
    others = rng.choice(np.arange(1, len(digits)), 100, replace=False)
    images = np.concatenate([digits[others], np.repeat(digits[:1], PLANTED_COPIES, axis=0)])
    labels = np.concatenate([load_digits().target[others], np.repeat(load_digits().target[:1], PLANTED_COPIES)])
    np.savez(root / "planted.npz", images=images, labels=labels)  # labelled: the audit measures quality
    store = f"sqlite:///{root}/mlflow.db"
    cfg = build_config("tiny", overrides={
        "data.path": str(root / "planted.npz"), "mlflow.tracking_uri": store, "iet.method": "ddpm",
        "iet.shards": 1, "iet.rounds": 1, "iet.local_steps": 300,
    }, sets=["training.batch_size=32", "training.learning_rate=0.001", "training.warmup_steps=10",
             f"mlflow.checkpoint_dir={root}/checkpoints", f"data.cache_dir={root}/cache", "mlflow.register_as=planted"])
    result = train(cfg, show_progress=False)
    dataset = load_dataset(MlflowClient(store).get_run(result.run_id).data.params["dataset.path"])
    Image.fromarray(digits[0]).save(root / "planted.png")
    return {"root": root, "store": store, "run_id": result.run_id, "dataset": dataset, "cfg": cfg,
            "pipeline": result.local_pipeline,
            "planted_ids": [str(i) for i in dataset.sample_ids[100:]], "sets": [f"mlflow.tracking_uri={store}"]}


def versions(store: str, name: str = "planted") -> list[int]:
    return sorted(int(v.version) for v in MlflowClient(store).search_model_versions(f"name='{name}'"))


def test_siss_forgets_the_planted_image_and_keeps_the_rest(planted, monkeypatch, tmp_path):
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(planted["root"]))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the system temp dir, for this process
    before_versions = versions(planted["store"])
    result = unlearn_model("models:/planted/1", str(planted["root"] / "planted.png"), "siss", steps=200,
                           sets=planted["sets"] + AUDIT + TINY + ["batch_size=32"])
    assert not list(tmp_path.rglob("config.json")) and not list(tmp_path.glob("memshard-*"))
    report = result.report
    assert report.forget_size == PLANTED_COPIES  # the image matched every duplicate by content hash
    assert report.before.pixel_matches > 0, "the trained model should copy the planted image"
    assert report.after.pixel_matches == 0, report.markdown()
    assert report.after.forget_loss > 1.5 * report.before.forget_loss
    assert report.after.keep_loss < 1.05 * report.before.keep_loss, report.markdown()  # the rest is kept
    compute = report.compute
    assert compute.stopped == "forgotten" and compute.steps < 200 and compute.steps % 20 == 0, compute
    assert [p.step for p in compute.trajectory] == list(range(0, compute.steps + 1, 20))
    assert 0 < compute.check_seconds < compute.seconds
    assert report.training.steps == 300 and report.training.seconds > 0
    assert report.steps_fraction == pytest.approx(compute.steps / 300)

    # The report: every field, the same numbers in JSON, markdown and MLflow, the exactness caveat.
    saved = json.loads((result.report_dir / "report.json").read_text())
    assert saved == json.loads(json.dumps(report.to_json())) and saved["before"]["pixel_matches"] == report.before.pixel_matches
    for side in ("before", "after"):
        assert set(saved[side]) >= {"forget_loss", "keep_loss", "pixel_matches", "generations", "pixel_match_fraction_mean",
                                    "pixel_match_fraction_max", "per_image", "fid", "fid_feature_space", "quality"}
        assert len(saved[side]["per_image"]) == 1 and saved[side]["per_image"][0]["duplicates_in_dataset"] == PLANTED_COPIES
        assert saved[side]["pixel_match_fraction_mean"] == saved[side]["per_image"][0]["pixel_match_fraction"]
        quality = saved[side]["quality"]
        assert quality["space"].startswith("trainset-classifier-") and quality["real"]["frechet"] > 0
    assert saved["compute"]["steps"] == compute.steps and saved["compute"]["stopped"] == "forgotten"
    assert len(saved["compute"]["trajectory"]) == len(compute.trajectory) and saved["retrain"] is None
    assert saved["compute"]["steps_fraction_of_training"] == pytest.approx(compute.steps / 300)
    assert "approximate" in saved["exactness"] and "only exact removal" in saved["exactness"]
    markdown = (result.report_dir / "report.md").read_text()
    for question in ("Did the forget images stop appearing?", "Is the model otherwise intact?",
                     "What did it cost?", "Exact or approximate?"):
        assert f"## {question}" in markdown
    assert f"{report.before.pixel_matches} of 32 before → 0 of 32 after" in markdown
    assert "Real reference in the same space" in markdown and "of its optimizer steps" in markdown
    client = MlflowClient(planted["store"])
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["memshard.source_run_id"] == planted["run_id"]
    assert run.data.tags["memshard.unlearn_method"] == "siss"
    assert run.data.tags["memshard.unlearn_steps"] == str(compute.steps)
    assert run.data.tags["memshard.unlearn_stopped"] == "forgotten"
    assert run.data.tags["memshard.forget_size"] == str(PLANTED_COPIES)
    assert run.data.metrics["forget_loss_after"] == pytest.approx(report.after.forget_loss)
    counted = [p for p in compute.trajectory if p.pixel_matches is not None]
    assert compute.trajectory[0] in counted and compute.trajectory[-1] in counted
    assert len(client.get_metric_history(result.run_id, "check_pixel_matches")) == len(counted)
    assert len(client.get_metric_history(result.run_id, "check_forget_loss")) == len(compute.trajectory)
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "audit")}
    assert artifacts == {"audit/report.json", "audit/report.md", "audit/nearest.png"}

    # A new version of the same registered model, carrying the tags.
    assert versions(planted["store"]) == before_versions + [before_versions[-1] + 1]
    version = client.get_model_version("planted", result.registered_version)
    assert version.run_id == result.run_id and version.tags["memshard.forget_hash"] == run.data.tags["memshard.forget_hash"]
    assert version.tags["memshard.unlearn_stopped"] == "forgotten"
    images = mlflow.pyfunc.load_model(f"models:/planted/{result.registered_version}").predict(
        {"num_images": 2, "seed": 0, "num_inference_steps": 3})
    assert images.shape == (2, 8, 8, 1)


def test_the_closed_loop_evaluate_then_unlearn_what_it_found(planted, monkeypatch, capsys, tmp_path):
    """As a user runs it: `memshard evaluate` finds the training images with near copies, `memshard
    unlearn --forget evaluation:RUN_ID` removes them, the audit shows no generation pixel-matching
    them and the rest intact, the new version is registered with its lineage, and evaluating it finds
    no near-exact r-copy left."""
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(planted["root"]))
    store = planted["store"]
    evaluate = ["--num-images", "64", "--sampler", "ddpm", "--sampling-steps", "20", "--feature-space", "none",
                "--tracking-uri", store, "--no-progress"]
    assert main(["evaluate", "models:/planted/1", *evaluate]) == 0
    evaluation = re.search(r"evaluation run id: (\w+)", capsys.readouterr().out).group(1)
    client = MlflowClient(store)

    def artifact(run_id: str, path: str) -> Path:
        (tmp_path / run_id).mkdir(exist_ok=True)
        return Path(client.download_artifacts(run_id, path, str(tmp_path / run_id)))

    first = pd.read_parquet(artifact(evaluation, "copies_per_sample.parquet")).set_index("sample_id")
    copied = first.index[first["near_copies"] > 0]  # what evaluation:RUN_ID forgets by default
    assert planted["planted_ids"][0] in set(copied), copied.tolist()  # credited to the first of the duplicates
    assert first.loc[planted["planted_ids"][0], "min_r"] < 0.15  # a near-exact copy (the strictest MQ threshold)

    before_versions = versions(store)
    code = main(["unlearn", "models:/planted/1", "--forget", f"evaluation:{evaluation}", "--steps", "200",
                 "--set", f"mlflow.tracking_uri={store}", "--set", "batch_size=32",
                 *[arg for setting in AUDIT + TINY for arg in ("--set", setting)]])
    out = capsys.readouterr().out
    assert code == 0, out
    run_id = re.search(r"run id: (\w+)", out).group(1)
    report = json.loads(artifact(run_id, "audit/report.json").read_text())
    # The forget set: what the evaluation found, every duplicate of the planted image with it.
    forgotten = set(artifact(run_id, "forget_ids.txt").read_text().split())
    assert set(planted["planted_ids"]) <= forgotten and set(copied) <= forgotten
    # The audit: no generation pixel-matches those images any more, the rest intact, the cost, the caveat.
    assert report["before"]["pixel_matches"] > 0 and report["after"]["pixel_matches"] == 0, report["after"]
    assert report["after"]["keep_loss"] < 1.05 * report["before"]["keep_loss"]
    assert report["compute"]["stopped"] == "forgotten" and report["compute"]["steps"] < 200
    assert "only exact removal" in report["exactness"]
    assert f"training images evaluation run {evaluation} found generations to be near-copies of" in out
    assert "generations pixel-matching a forget image (mean squared pixel distance < 0.01): " in out
    assert " -> 0/32" in out and "approximate" in out
    # Registered as the next version of the same model, with its lineage.
    (version,) = set(versions(store)) - set(before_versions)
    tags = client.get_model_version("planted", str(version)).tags
    assert tags["memshard.source_run_id"] == planted["run_id"] and tags["memshard.unlearn_method"] == "siss"
    assert tags["memshard.forget_size"] == str(len(forgotten)) and tags["memshard.unlearn_stopped"] == "forgotten"
    assert tags["memshard.forget_measure"] == "near-copies"

    # Evaluating the new version (its run carries the training data and config): no near-exact r-copy
    # of the planted image is left. (At the loose default r < 0.5 a model this small has r-copies of many ordinary
    # training images, a few generations still nearest to the planted 0 among them.)
    assert main(["evaluate", f"models:/planted/{version}", *evaluate]) == 0
    again = re.search(r"evaluation run id: (\w+)", capsys.readouterr().out).group(1)
    after = pd.read_parquet(artifact(again, "copies_per_sample.parquet")).set_index("sample_id")
    planted_row = planted["planted_ids"][0]
    assert after.loc[planted["planted_ids"], "r_copies"].sum() < first.loc[planted_row, "r_copies"] / 4
    assert not after.loc[planted_row, "min_r"] < 0.15, after.loc[planted_row]  # NaN: no generation nearest to it


def _planted_unet(planted):
    from memshard.pipeline import load_pipeline

    return load_pipeline(planted["pipeline"], "cpu").unet


def test_relative_scaling_keeps_the_rest_where_the_absolute_norm_breaks_it(planted):
    """Both forms run until the same stop rule says the planted image is forgotten; the keep loss
    barely moves with c_t = 0.1·‖g_x‖ and more than doubles with the fixed c = 5 (issue 14)."""
    dataset, cfg = planted["dataset"], planted["cfg"]
    keep, forget = dataset.images[:100], dataset.images[100:]
    runs = {}
    for mode in ("relative", "absolute"):
        settings = UnlearnSettings(batch_size=32, max_steps=200, forget_scale_mode=mode, seed=1, learning_rate=2e-4,
                                   check_every=20)
        runs[mode] = unlearn("siss", _planted_unet(planted), build_scheduler(cfg), keep, forget, settings)
    for mode, stats in runs.items():
        first, last = stats.trajectory[0], stats.trajectory[-1]
        assert first.pixel_matches > 0 and stats.stopped == "forgotten" and last.pixel_matches == 0, (mode, stats.trajectory)
        assert last.forget_loss >= last.keep_loss > 0, (mode, last)
    start = runs["relative"].trajectory[0].keep_loss
    assert runs["absolute"].trajectory[0].keep_loss == start  # the same model, the same fixed draws
    relative_move = runs["relative"].trajectory[-1].keep_loss - start
    absolute_move = runs["absolute"].trajectory[-1].keep_loss - start
    assert abs(relative_move) < abs(absolute_move), (relative_move, absolute_move)
    assert relative_move < 0.05 * start and absolute_move > 0.5 * start, (relative_move, absolute_move, start)


def test_early_stopping_stops_when_forgotten_and_at_the_cap_otherwise(planted):
    dataset, cfg = planted["dataset"], planted["cfg"]
    keep, forget = dataset.images[:100], dataset.images[100:]
    settings = UnlearnSettings(batch_size=32, max_steps=200, check_every=10, seed=2, learning_rate=2e-4)
    stopped = unlearn("siss", _planted_unet(planted), build_scheduler(cfg), keep, forget, settings)
    assert stopped.stopped == "forgotten" and stopped.steps < 200 and stopped.steps % 10 == 0, stopped.trajectory
    assert [p.step for p in stopped.trajectory] == list(range(0, stopped.steps + 1, 10))
    assert all(p.pixel_matches != 0 or p.forget_loss < p.keep_loss for p in stopped.trajectory[:-1])  # not earlier
    # Copies are counted at the first check and where the losses allow a stop, not at every check.
    assert stopped.trajectory[0].pixel_matches > 0
    assert all((p.pixel_matches is None) == (p.forget_loss < p.keep_loss) for p in stopped.trajectory[1:])
    # Fine-tuning on the kept data alone does not make the planted image unfamiliar in 30 steps: the cap.
    capped = unlearn("naive", _planted_unet(planted), build_scheduler(cfg), keep, forget,
                     UnlearnSettings(batch_size=32, max_steps=30, check_every=10, seed=2))
    assert capped.stopped == "max_steps" and capped.steps == 30, capped.trajectory
    assert [p.step for p in capped.trajectory] == [0, 10, 20, 30]
    assert capped.trajectory[-1].forget_loss < capped.trajectory[-1].keep_loss


@pytest.mark.parametrize("method", ["naive", "neggrad", "erasediff"])
def test_each_baseline_runs_through_the_same_interface(planted, monkeypatch, method):
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(planted["root"]))
    ids = ",".join(planted["planted_ids"][:3])
    result = unlearn_model("planted/1", ids, method, steps=5,
                           sets=planted["sets"] + ["audit.num_images=4", "audit.sampling_steps=2", "batch_size=8"])
    assert result.report.method == method and result.report.forget_size == 3
    run = MlflowClient(planted["store"]).get_run(result.run_id)
    assert run.data.tags["memshard.unlearn_method"] == method and run.info.status == "FINISHED"
    assert np.isfinite(result.report.after.forget_loss)


def test_retrain_is_the_exact_reference_and_later_reports_compare_to_it(planted, monkeypatch):
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(planted["root"]))
    ids = ",".join(planted["planted_ids"])
    small = planted["sets"] + ["audit.num_images=4", "audit.sampling_steps=2"]
    retrained = unlearn_model("models:/planted/1", ids, "retrain", sets=small + ["guard.mode=reject"])
    client = MlflowClient(planted["store"])
    run = client.get_run(retrained.run_id)
    assert run.data.params["dataset.count"] == "100"  # trained on X \ A only
    assert run.data.tags["memshard.unlearn_method"] == "retrain" and run.data.tags["memshard.unlearn_steps"] == "300"
    assert run.data.tags["memshard.source_run_id"] == planted["run_id"]
    kept = load_dataset(run.data.params["dataset.path"])
    assert set(kept.sample_ids) == set(planted["dataset"].sample_ids[:100])  # ids preserved
    assert client.get_model_version("planted", retrained.registered_version).tags["memshard.unlearn_method"] == "retrain"

    approx = unlearn_model("models:/planted/1", ids, "naive", steps=2, sets=small + ["batch_size=8"])
    assert approx.report.retrain.run_id == retrained.run_id
    assert approx.report.retrain.steps == 300 and approx.report.retrain.seconds > 0
    assert "retrained" in (approx.report_dir / "report.md").read_text()
    # Both versions' guards keep generations from the source's training set, the forgotten images included;
    # the retrain's mode is the one given to unlearn, the naive one's the source's (off).
    mlflow.set_tracking_uri(planted["store"])
    for result, mode in ((retrained, "reject"), (approx, "off")):
        model = mlflow.pyfunc.load_model(f"models:/planted/{result.registered_version}").unwrap_python_model()
        reference = json.loads((model.guard_dir / GUARD_FILE).read_text())
        assert reference["dataset"]["fingerprint"] == planted["dataset"].fingerprint, result.report.method
        assert reference["dataset"]["count"] == 160 and model.default_guard == mode


def test_bad_input_is_one_line_and_registers_nothing(planted, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MEMSHARD_WORKSPACE", str(planted["root"]))
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    everything = tmp_path / "all.txt"
    everything.write_text("\n".join(str(i) for i in planted["dataset"].sample_ids))
    mlflow.set_tracking_uri(planted["store"])
    with mlflow.start_run(experiment_id="0") as bare:
        pass  # a run with no training lineage
    before = versions(planted["store"])
    cases = [
        (["--forget", " "], "forget set is empty"),
        (["--forget", str(everything)], "nothing would be left"),
        (["--forget", "no-such-id,other"], "not in the model's training data"),
        (["--forget", f"{tmp_path}/missing/x.png"], "does not exist"),
        (["--method", "magic", "--forget", planted["planted_ids"][0]], "unknown unlearning method"),
        (["--set", "lam=2", "--forget", planted["planted_ids"][0]], "lam=2"),
    ]
    for extra, message in cases:
        code = main(["unlearn", "models:/planted/1", *extra, "--set", f"mlflow.tracking_uri={planted['store']}"])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and "Traceback" not in err and len(errors) == 1 and message in errors[0], (extra, err)
    code = main(["unlearn", f"runs:/{bare.info.run_id}/model", "--forget", "x",
                 "--set", f"mlflow.tracking_uri={planted['store']}"])
    err = capsys.readouterr().err
    assert code == 2 and "no training lineage" in err and "Traceback" not in err
    assert versions(planted["store"]) == before
    assert list(system_tmp.iterdir()) == []  # the source's config.json was read in a folder removed at once


def test_unlearn_sets_go_through_the_config_parser():
    options = parse_unlearn_sets(["lam=0.25", "c=1", "forget_scale_mode=absolute", "check_every=5",
                                  "audit.num_images=8", "mlflow.experiment=x", "ray.address=auto"], steps=7)
    assert options.settings == UnlearnSettings(lam=0.25, c=1.0, forget_scale_mode="absolute", check_every=5,
                                               max_steps=7)
    assert UnlearnSettings().forget_scale_mode == "relative" and UnlearnSettings().rho == 0.1
    assert options.audit == AuditSettings(num_images=8) and options.experiment == "x" and options.tracking_uri is None
    assert options.ray_address == "auto" and parse_unlearn_sets([]).ray_address is None
    assert options.guard == {} and parse_unlearn_sets(["guard.mode=reject", "guard.scale=2"]).guard == {
        "mode": "reject", "scale": 2.0}
    for sets, message in [(["lam=half"], "lam = 'half' has the wrong type: expected float"),
                          (["max_steps=2.5"], "max_steps = 2.5 has the wrong type: expected int"),
                          (["forget_scale_mode=both"], "forget_scale_mode='both' must be one of relative, absolute"),
                          (["rho=0"], "rho=0.0 must be positive"),
                          (["check_every=-1"], "check_every=-1 must be 0"),
                          (["audit.nope=1"], "unknown setting 'audit.nope'"),
                          (["guard.scale=big"], "guard.scale = 'big' has the wrong type"),
                          (["mlflow.register_as=x"], "unknown setting 'mlflow.register_as'"),
                          (["c"], "has no '='"),
                          (["audit.num_images=1"], "audit settings"),
                          (["lam=2"], "lam=2.0 must lie strictly between 0 and 1")]:
        with pytest.raises(MemshardError, match=message):
            parse_unlearn_sets(sets)


def test_forget_spec_forms(tmp_path):
    ids = np.array(["a", "b", "c", "d"])
    images = np.arange(4 * 4, dtype=np.uint8).reshape(4, 1, 2, 2) * 10
    images[3] = images[1]
    hashes = np.array([content_hash(im) for im in images])
    shape = (1, 2, 2)
    assert parse_forget_spec("c, a", ids, hashes, shape).tolist() == [0, 2]
    (tmp_path / "ids.txt").write_text("b  # the second\nc,d\n")
    assert parse_forget_spec(str(tmp_path / "ids.txt"), ids, hashes, shape).tolist() == [1, 2, 3]
    Image.fromarray(images[1, 0]).save(tmp_path / "one.png")
    assert parse_forget_spec(str(tmp_path / "one.png"), ids, hashes, shape).tolist() == [1, 3]  # both duplicates
    assert parse_forget_spec(f"a,{tmp_path / 'one.png'}", ids, hashes, shape).tolist() == [0, 1, 3]
    # An evaluation credits one row of a group of identical images: its duplicates are forgotten with it.
    assert parse_forget_spec("evaluation:run1", ids, hashes, shape, lambda run, measure: ["d"]).tolist() == [1, 3]
    assert parse_forget_spec("d", ids, hashes, shape).tolist() == [3]  # an id names that sample only
    Image.fromarray(np.full((2, 2), 7, np.uint8)).save(tmp_path / "other.png")
    for spec, message in [(str(tmp_path / "other.png"), "matches no training sample"), ("", "empty"),
                          ("a,b,c,d", "all 4"), ("evaluation:run1", "found no near-copies of training samples"),
                          ("evaluation:run1:r-copies", "found no r-copies of training samples"),
                          ("evaluation:run1:copies", "unknown measure 'copies'"), ("evaluation:", "names no evaluation")]:
        with pytest.raises(MemshardError, match=message):
            parse_forget_spec(spec, ids, hashes, shape, lambda run, measure: [])


def test_methods_are_deterministic_and_weights_stay_finite_in_high_dimension():
    cfg = build_config("tiny")
    x, a = (np.random.default_rng(s).integers(0, 255, (6, 1, 8, 8), dtype=np.uint8) for s in (0, 1))
    settings = UnlearnSettings(max_steps=2, batch_size=4, seed=3, check_every=2, check_images=4,
                               check_sampling_steps=2, stop_loss_ratio=1e9)  # checks that never stop
    for method in METHODS:
        results, trajectories = [], []
        for _ in range(2):
            torch.manual_seed(0)
            unet = build_unet(cfg, 1)
            stats = unlearn(method, unet, build_scheduler(cfg), x, a, settings)
            results.append(torch.cat([p.detach().flatten() for p in unet.parameters()]))
            trajectories.append([(p.step, p.keep_loss, p.forget_loss, p.pixel_matches) for p in stats.trajectory])
        assert torch.equal(results[0], results[1]) and torch.isfinite(results[0]).all(), method
        assert trajectories[0] == trajectories[1] and [t[0] for t in trajectories[0]] == [0, 2], method
    # D_x − D_a of thousands saturates the weights instead of overflowing: w_x → 0, w_a → 1/λ... bounded.
    big = torch.full((2, 3, 64, 64), 1.0)
    log_w_x, log_w_a = siss_log_weights(big, -big, big, torch.full((2, 1, 1, 1), 0.5), lam=0.5)
    assert torch.isfinite(log_w_x).all() and torch.isfinite(log_w_a).all()
    assert (log_w_x < -100).all() and torch.allclose(log_w_a.exp(), torch.tensor(2.0))


def test_the_forget_direction_is_a_fraction_of_the_keep_gradient_or_a_fixed_norm():
    params = [torch.zeros(3), torch.zeros(2, 2)]
    grad_x = [torch.tensor([3.0, 0.0, 4.0]), torch.zeros(2, 2)]  # ‖g_x‖ = 5
    grad_a = [torch.tensor([0.0, 2.0, 0.0]), None]  # ‖g_a‖ = 2; None: a parameter the loss misses
    for keep_scale in (1.0, 100.0):  # the keep gradient's size changes with the model; c_t follows it
        scaled = [g * keep_scale for g in grad_x]
        relative = combine_gradients(params, scaled, grad_a, UnlearnSettings(rho=0.1))
        absolute = combine_gradients(params, scaled, grad_a, UnlearnSettings(forget_scale_mode="absolute", c=5.0))
        for combined, forget_norm in ((relative, 0.1 * 5 * keep_scale), (absolute, 5.0)):
            forget_part = [c - g for c, g in zip(combined, scaled, strict=True)]
            assert torch.allclose(forget_part[0], torch.tensor([0.0, -forget_norm, 0.0]))
            assert torch.equal(forget_part[1], torch.zeros(2, 2))


class ScriptedCheck:
    """Stands in for ForgetCheck: the forget set stops being reproduced at step `forgotten_at`."""

    def __init__(self, forgotten_at):
        self.forgotten_at = forgotten_at

    def __call__(self, unet, step, full=False):
        gone = self.forgotten_at is not None and step >= self.forgotten_at
        return CheckPoint(step, keep_loss=0.1, forget_loss=0.2 if gone else 0.05, pixel_matches=0 if gone else 3,
                          generations=8, seconds=0.0)

    forgotten, unfamiliar = ForgetCheck.forgotten, ForgetCheck.unfamiliar  # the real rule
    stop_loss_ratio = 1.0


def test_the_stop_rule_and_when_unlearning_stops(monkeypatch):
    rule = ScriptedCheck(None)
    assert rule.forgotten(CheckPoint(5, keep_loss=0.1, forget_loss=0.1, pixel_matches=0, generations=8, seconds=0))
    assert not rule.forgotten(CheckPoint(5, keep_loss=0.1, forget_loss=0.5, pixel_matches=1, generations=8, seconds=0))
    assert not rule.forgotten(CheckPoint(5, keep_loss=0.1, forget_loss=0.09, pixel_matches=0, generations=8, seconds=0))
    rule.stop_loss_ratio = 0.0  # pixel matches alone
    assert rule.forgotten(CheckPoint(5, keep_loss=0.1, forget_loss=0.01, pixel_matches=0, generations=8, seconds=0))

    cfg = build_config("tiny")
    x, a = (np.random.default_rng(s).integers(0, 255, (6, 1, 8, 8), dtype=np.uint8) for s in (0, 1))
    settings = UnlearnSettings(max_steps=7, check_every=3, batch_size=2)
    for forgotten_at, steps, stopped, checked in [(4, 6, "forgotten", [0, 3, 6]),
                                                  (None, 7, "max_steps", [0, 3, 6, 7]),  # and after the last
                                                  (0, 0, "forgotten", [0])]:
        monkeypatch.setattr(methods, "ForgetCheck", lambda *args, at=forgotten_at, **kwargs: ScriptedCheck(at))
        stats = unlearn("naive", build_unet(cfg, 1), build_scheduler(cfg), x, a, settings)
        assert (stats.steps, stats.stopped, [p.step for p in stats.trajectory]) == (steps, stopped, checked)
    stats = unlearn("naive", build_unet(cfg, 1), build_scheduler(cfg), x, a,
                    UnlearnSettings(max_steps=2, check_every=0, batch_size=2))
    assert (stats.steps, stats.stopped, stats.trajectory, stats.check_seconds) == (2, "max_steps", (), 0)


def test_quality_can_be_measured_against_the_kept_rows_only(tmp_path):
    """The audit compares generations with X \\ A: the reference, its real images and the label
    histogram come from the kept rows; with every row it is the plain quality report."""
    from memshard.evaluation.classifier_space import ClassifierSpace
    from memshard.evaluation.fid import PIXEL_PROJECTION
    from memshard.evaluation.quality import feature_space, quality_report

    digits = load_digits()
    images = np.rint(digits.images[:120] * 255 / 16).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=digits.target[:120])
    dataset = load_dataset(resolve_dataset(str(tmp_path / "d.npz"), 8, None, tmp_path / "cache"))
    kept = np.flatnonzero(dataset.labels != 0)  # "forget" every 0
    generated = dataset.images[kept[:40]]
    for space in (feature_space(PIXEL_PROJECTION), ClassifierSpace(dataset, cache_dir=tmp_path / "cls")):
        everything = quality_report(generated, dataset, space)
        assert quality_report(generated, dataset, space, rows=np.arange(len(dataset))).generated == everything.generated
        restricted = quality_report(generated, dataset, space, rows=kept)
        assert restricted.generated.frechet < everything.generated.frechet  # no 0s generated, none in the reference
        assert "reference images" in restricted.real_reference
        if isinstance(space, ClassifierSpace):
            assert restricted.classes == 9 and everything.classes == 10
            assert restricted.generated.tv_distance < everything.generated.tv_distance


def test_evaluate_counts_a_planted_image_once_and_the_forget_set_takes_all_its_copies(tmp_path):
    """Sixty identical training images must not hide each other: the k-NN scan sees each distinct
    image once, so a near-copy of the planted image has r ≈ 0 (not 1), the copy is credited to its
    first row, and `--forget evaluation:RUN_ID` expands that row to every duplicate."""
    from memshard.evaluation.evaluate import EvaluateSettings, Generation, evaluate, sampling_plan
    from memshard.evaluation.quality import QualitySpaceChoice

    digits = np.rint(load_digits().images[:80] * 255 / 16).astype(np.uint8)
    images = np.concatenate([digits, np.repeat(digits[:1], 60, axis=0)])
    np.save(tmp_path / "planted.npy", images)
    dataset = load_dataset(resolve_dataset(str(tmp_path / "planted.npy"), 8, None, tmp_path / "cache"))
    planted = np.flatnonzero(dataset.content_hashes == dataset.content_hashes[np.all(
        dataset.images == digits[0][None, None], axis=(1, 2, 3))][0])
    assert len(planted) == 61
    near_copies = np.repeat(digits[:1][:, None], 4, axis=0).astype(np.int16)
    near_copies[:, 0, 0, :4] += 9  # not bit-identical: r comes from the distances, not from d = 0
    near_copies = np.clip(near_copies, 0, 255).astype(np.uint8)
    settings = EvaluateSettings(num_images=4, batch_size=4, sampler="ddim", sampling_steps=2, feature_space=None)
    choice = sampling_plan(settings, 1000, gpu=False)
    report = evaluate(choice, dataset, lambda plan: Generation(near_copies, "cpu", {}), settings,
                      QualitySpaceChoice(None, "none"))
    table = report.copies_table(dataset).to_pandas()
    for column in ("r_copies", "near_copies"):
        copied = table.loc[table[column] > 0, "sample_id"].tolist()
        assert copied == [str(dataset.sample_ids[planted[0]])] and table[column].sum() == 4, column
    rows = parse_forget_spec("evaluation:run", dataset.sample_ids, dataset.content_hashes, (1, 8, 8),
                             lambda run, measure: copied)
    assert rows.tolist() == planted.tolist()


def test_forget_evaluation_takes_near_copies_by_default_and_r_copies_when_asked(tmp_path):
    """`--forget evaluation:RUN_ID` reads the evaluation's per-sample table from a real MLflow store:
    near copies by default, r-copies with `:r-copies`. Unseen real digits as generations are r-copies of
    many training digits (r < 0.5 counts ordinary neighbours) but near copies of few; near-exact copies
    of the planted digit are both. An evaluation whose table predates near copies is a one-line error."""
    import pyarrow as pa

    from memshard.commands.unlearn import copied_ids
    from memshard.evaluation.evaluate import COPIES_TABLE, EvaluateSettings, Generation, evaluate, sampling_plan
    from memshard.evaluation.quality import QualitySpaceChoice
    from memshard.orchestrator.registry import SOURCE_RUN_TAG
    from memshard.orchestrator.tracking import tracker
    from memshard.unlearning.forget_set import forget_set

    digits = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    np.save(tmp_path / "planted.npy", np.concatenate([digits[:200], np.repeat(digits[:1], 20, axis=0)]))
    dataset = load_dataset(resolve_dataset(str(tmp_path / "planted.npy"), 8, None, tmp_path / "cache"))
    near_exact = np.clip(np.repeat(digits[:1][:, None], 4, axis=0).astype(np.int16) + 9, 0, 255).astype(np.uint8)
    generated = np.concatenate([near_exact, digits[1000:1060][:, None]])  # 60 digits the model never saw
    settings = EvaluateSettings(num_images=len(generated), batch_size=len(generated), sampler="ddim",
                                sampling_steps=2, feature_space=None)
    report = evaluate(sampling_plan(settings, 1000, gpu=False), dataset, lambda plan: Generation(generated, "cpu", {}),
                      settings, QualitySpaceChoice(None, "none"))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    experiment_id = mlflow.create_experiment("forget-measure", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=experiment_id, tags={SOURCE_RUN_TAG: "source"}) as run:
        tracker.log_table(report.copies_table(dataset), COPIES_TABLE)
    with mlflow.start_run(experiment_id=experiment_id, tags={SOURCE_RUN_TAG: "source"}) as old:  # the table as evaluations wrote it before
        tracker.log_table(pa.table({"sample_id": dataset.sample_ids.astype(str), "copies": report.memorization.r_copies}),
                          COPIES_TABLE)
    client = MlflowClient(store)

    def chosen(spec: str):
        return forget_set(spec, dataset.sample_ids, dataset.content_hashes, (1, 8, 8),
                          lambda run_id, measure: copied_ids(client, run_id, "source", measure))

    near, by_name, r = (chosen(f"evaluation:{run.info.run_id}{tail}") for tail in ("", ":near-copies", ":r-copies"))
    planted = np.flatnonzero(dataset.content_hashes == dataset.content_hashes[0])
    assert len(planted) == 21 and set(planted) <= set(near.rows.tolist()) and set(planted) <= set(r.rows.tolist())
    assert near.measure == by_name.measure == "near-copies" and r.measure == "r-copies"
    assert near.rows.tolist() == by_name.rows.tolist()
    assert set(near.rows.tolist()) < set(r.rows.tolist()) and len(r.rows) - len(planted) > 2 * (len(near.rows) - len(planted))
    with pytest.raises(MemshardError, match="predates per-sample near-copies .* run memshard evaluate on the model again"):
        chosen(f"evaluation:{old.info.run_id}")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unlearn_and_retrain_run_where_they_are_told_never_where_the_source_trained(ray_cluster, mlflow_store, tmp_path):
    """The source run's saved config names a Ray address nothing answers on (this process's Ray is
    already up, so training never tried it). A fresh `memshard unlearn` process runs on RAY_ADDRESS;
    a retrain on the `--set ray.address` it is given, with RAY_ADDRESS empty: neither tries the saved one."""
    saved = f"127.0.0.1:{closed_port()}"
    cfg = build_config("tiny", overrides={"mlflow.tracking_uri": mlflow_store, "iet.rounds": 1},
                       sets=[f"ray.address={saved}", "mlflow.register_as=elsewhere"])
    source = train(cfg, show_progress=False)
    client = MlflowClient(mlflow_store)
    assert f'"address": "{saved}"' in Path(client.download_artifacts(source.run_id, "config.json", str(tmp_path))).read_text()
    forget = str(load_dataset(client.get_run(source.run_id).data.params["dataset.path"]).sample_ids[0])
    base = [sys.executable, "-m", "memshard.commands.cli", "unlearn", "models:/elsewhere/1", "--forget", forget,
            "--set", f"mlflow.tracking_uri={mlflow_store}", "--set", "audit.num_images=4",
            "--set", "audit.sampling_steps=2", "--set", "audit.quality=false"]
    env = {key: value for key, value in os.environ.items() if key != "MEMSHARD_TEST_FAULTS"}
    for extra, ray_address in [(["--method", "naive", "--steps", "1", "--set", "batch_size=8"], ray_cluster.address),
                               (["--method", "retrain", "--set", f"ray.address={ray_cluster.address}"], "")]:
        completed = subprocess.run([*base, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                                   env={**env, "RAY_ADDRESS": ray_address})
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert saved not in completed.stderr
        run_id = re.search(r"^run id: (\w+)$", completed.stdout, re.M).group(1)
        assert client.get_run(run_id).info.status == "FINISHED"
    retrained = client.get_run(run_id)  # the retrain: a training run, tagged with the cluster it joined
    assert retrained.data.tags["ray.address"] == ray_cluster.gcs_address
    assert retrained.data.params["ray.address"] == ray_cluster.address  # the address asked for, not the saved one
