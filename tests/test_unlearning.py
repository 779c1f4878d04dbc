"""`memshard unlearn` end to end: a tiny model trained here on data with one planted image repeated
many times (so it copies that image), on the session's real Ray cluster and a real MLflow store."""

from __future__ import annotations

import json
import tempfile

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.datasets import load_digits

from memshard.cli import main
from memshard.commands.unlearn import parse_unlearn_sets, unlearn_model
from memshard.config import build_config
from memshard.data import content_hash, load_dataset
from memshard.errors import MemshardError
from memshard.model import build_scheduler, build_unet
from memshard.orchestrator.train import train
from memshard.unlearning.audit import AuditSettings
from memshard.unlearning.forget_set import parse_forget_spec
from memshard.unlearning.methods import METHODS, UnlearnSettings, siss_log_weights, unlearn

PLANTED_COPIES = 60
AUDIT = ["audit.num_images=32", "audit.sampling_steps=20"]


@pytest.fixture(scope="module")
def planted(ray_cluster, tmp_path_factory):
    """100 digits plus one digit repeated 60 times; a DDPM trained on it until it copies that digit."""
    root = tmp_path_factory.mktemp("planted")
    digits = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    rng = np.random.default_rng(0)
    images = np.concatenate([digits[rng.choice(np.arange(1, len(digits)), 100, replace=False)],
                             np.repeat(digits[:1], PLANTED_COPIES, axis=0)])
    np.save(root / "planted.npy", images)
    store = f"sqlite:///{root}/mlflow.db"
    cfg = build_config("tiny", overrides={
        "data.path": str(root / "planted.npy"), "mlflow.tracking_uri": store, "iet.method": "ddpm",
        "iet.shards": 1, "iet.rounds": 1, "iet.local_steps": 300,
    }, sets=["training.batch_size=32", "training.learning_rate=0.001", "training.warmup_steps=10",
             f"mlflow.checkpoint_dir={root}/checkpoints", f"data.cache_dir={root}/cache", "mlflow.register_as=planted"])
    result = train(cfg, show_progress=False)
    dataset = load_dataset(MlflowClient(store).get_run(result.run_id).data.params["dataset.path"])
    Image.fromarray(digits[0]).save(root / "planted.png")
    return {"root": root, "store": store, "run_id": result.run_id, "dataset": dataset,
            "planted_ids": [str(i) for i in dataset.sample_ids[100:]], "sets": [f"mlflow.tracking_uri={store}"]}


def versions(store: str, name: str = "planted") -> list[int]:
    return sorted(int(v.version) for v in MlflowClient(store).search_model_versions(f"name='{name}'"))


def test_siss_forgets_the_planted_image_more_than_it_moves_the_rest(planted, monkeypatch, tmp_path):
    monkeypatch.chdir(planted["root"])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the system temp dir, for this process
    before_versions = versions(planted["store"])
    result = unlearn_model("models:/planted/1", str(planted["root"] / "planted.png"), "siss", steps=60,
                           sets=planted["sets"] + AUDIT + ["batch_size=32"])
    assert not list(tmp_path.rglob("config.json")) and not list(tmp_path.glob("memshard-*"))
    report = result.report
    assert report.forget_size == PLANTED_COPIES  # the image matched every duplicate by content hash
    forget_rise = report.after.forget_loss - report.before.forget_loss
    keep_change = abs(report.after.keep_loss - report.before.keep_loss)
    assert forget_rise > 2 * keep_change and forget_rise > 0.05, report
    assert report.before.copy_fraction_mean > 0.1, "the trained model should copy the planted image"
    assert report.after.copy_fraction_mean < report.before.copy_fraction_mean, report

    # The report: every field, the same numbers in JSON, markdown and MLflow, the exactness caveat.
    saved = json.loads((result.report_dir / "report.json").read_text())
    assert saved == report.to_json() and saved["before"] == report.before.to_json()
    for side in ("before", "after"):
        assert set(saved[side]) >= {"forget_loss", "keep_loss", "copy_fraction_mean", "copy_fraction_max",
                                    "per_image", "fid", "fid_feature_space"}
        assert len(saved[side]["per_image"]) == 1 and saved[side]["per_image"][0]["copies_in_dataset"] == PLANTED_COPIES
        assert saved[side]["copy_fraction_mean"] == saved[side]["per_image"][0]["copy_fraction"]
    assert saved["compute"]["steps"] == 60 and saved["compute"]["seconds"] > 0 and saved["retrain"] is None
    assert "approximate" in saved["exactness"] and "exact" in (result.report_dir / "report.md").read_text()
    client = MlflowClient(planted["store"])
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["memshard.source_run_id"] == planted["run_id"]
    assert run.data.tags["memshard.unlearn_method"] == "siss" and run.data.tags["memshard.unlearn_steps"] == "60"
    assert run.data.tags["memshard.forget_size"] == str(PLANTED_COPIES)
    assert run.data.metrics["forget_loss_after"] == pytest.approx(report.after.forget_loss)
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "audit")}
    assert artifacts == {"audit/report.json", "audit/report.md", "audit/nearest.png"}

    # A new version of the same registered model, carrying the tags.
    assert versions(planted["store"]) == before_versions + [before_versions[-1] + 1]
    version = client.get_model_version("planted", result.registered_version)
    assert version.run_id == result.run_id and version.tags["memshard.forget_hash"] == run.data.tags["memshard.forget_hash"]
    images = mlflow.pyfunc.load_model(f"models:/planted/{result.registered_version}").predict(
        {"num_images": 2, "seed": 0, "num_inference_steps": 3})
    assert images.shape == (2, 8, 8, 1)


@pytest.mark.parametrize("method", ["naive", "neggrad", "erasediff"])
def test_each_baseline_runs_through_the_same_interface(planted, monkeypatch, method):
    monkeypatch.chdir(planted["root"])
    ids = ",".join(planted["planted_ids"][:3])
    result = unlearn_model("planted/1", ids, method, steps=5,
                           sets=planted["sets"] + ["audit.num_images=4", "audit.sampling_steps=2", "batch_size=8"])
    assert result.report.method == method and result.report.forget_size == 3
    run = MlflowClient(planted["store"]).get_run(result.run_id)
    assert run.data.tags["memshard.unlearn_method"] == method and run.info.status == "FINISHED"
    assert np.isfinite(result.report.after.forget_loss)


def test_retrain_is_the_exact_reference_and_later_reports_compare_to_it(planted, monkeypatch):
    monkeypatch.chdir(planted["root"])
    ids = ",".join(planted["planted_ids"])
    small = planted["sets"] + ["audit.num_images=4", "audit.sampling_steps=2"]
    retrained = unlearn_model("models:/planted/1", ids, "retrain", sets=small)
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


def test_bad_input_is_one_line_and_registers_nothing(planted, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(planted["root"])
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
    options = parse_unlearn_sets(["lam=0.25", "c=1", "audit.num_images=8", "mlflow.experiment=x"], steps=7)
    assert options.settings == UnlearnSettings(lam=0.25, c=1.0, steps=7)
    assert options.audit == AuditSettings(num_images=8) and options.experiment == "x" and options.tracking_uri is None
    for sets, message in [(["lam=half"], "lam = 'half' has the wrong type: expected float"),
                          (["steps=2.5"], "steps = 2.5 has the wrong type: expected int"),
                          (["audit.nope=1"], "unknown setting 'audit.nope'"),
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
    assert parse_forget_spec("evaluation:run1", ids, hashes, shape, lambda run: ["d"]).tolist() == [3]
    Image.fromarray(np.full((2, 2), 7, np.uint8)).save(tmp_path / "other.png")
    for spec, message in [(str(tmp_path / "other.png"), "matches no training sample"), ("", "empty"),
                          ("a,b,c,d", "all 4"), ("evaluation:run1", "found no copied")]:
        with pytest.raises(MemshardError, match=message):
            parse_forget_spec(spec, ids, hashes, shape, lambda run: [])


def test_methods_are_deterministic_and_weights_stay_finite_in_high_dimension():
    cfg = build_config("tiny")
    x, a = (np.random.default_rng(s).integers(0, 255, (6, 1, 8, 8), dtype=np.uint8) for s in (0, 1))
    for method in METHODS:
        results = []
        for _ in range(2):
            torch.manual_seed(0)
            unet = build_unet(cfg, 1)
            unlearn(method, unet, build_scheduler(cfg), x, a, UnlearnSettings(steps=2, batch_size=4, seed=3))
            results.append(torch.cat([p.detach().flatten() for p in unet.parameters()]))
        assert torch.equal(results[0], results[1]) and torch.isfinite(results[0]).all(), method
    # D_x − D_a of thousands saturates the weights instead of overflowing: w_x → 0, w_a → 1/λ... bounded.
    big = torch.full((2, 3, 64, 64), 1.0)
    log_w_x, log_w_a = siss_log_weights(big, -big, big, torch.full((2, 1, 1, 1), 0.5), lam=0.5)
    assert torch.isfinite(log_w_x).all() and torch.isfinite(log_w_a).all()
    assert (log_w_x < -100).all() and torch.allclose(log_w_a.exp(), torch.tensor(2.0))
