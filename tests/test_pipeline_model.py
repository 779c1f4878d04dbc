"""The final DDPMPipeline: safetensors save/load, seeded sampling, the grid, and the MLflow model."""

import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDPMPipeline

from memshard.config import build_config
from memshard.errors import MemshardError
from memshard.model import build_unet, state_to_numpy
from memshard.orchestrator.pipeline_model import DDPMPipelineModel, log_pipeline_model
from memshard.pipeline import (
    DEFAULT_BATCH_SIZE,
    SamplingPlan,
    build_pipeline,
    generate_plan,
    image_grid,
    load_pipeline,
    save_pipeline,
)

STEPS = 5  # sampling steps: enough to exercise the loop, fast on 2 CPU cores


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return state_to_numpy(build_unet(build_config("tiny"), channels=1))


@pytest.fixture(scope="module")
def pipeline_dir(weights, tmp_path_factory):
    pipeline = build_pipeline(build_config("tiny"), 1, weights)
    return save_pipeline(pipeline, tmp_path_factory.mktemp("final") / "pipeline")


@pytest.fixture(scope="module")
def experiment_id(tmp_path_factory):
    """A real sqlite tracking/registry store in a tmp dir; the previous tracking URI comes back after."""
    root = tmp_path_factory.mktemp("mlflow")
    previous = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri mirrors itself here
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    try:
        yield mlflow.create_experiment("pipeline-model-test", artifact_location=(root / "artifacts").as_uri())
    finally:
        mlflow.set_tracking_uri(previous)


def test_save_and_load_round_trip_keeps_the_weights(weights, pipeline_dir):
    files = {p.relative_to(pipeline_dir).as_posix() for p in pipeline_dir.rglob("*") if p.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files), files
    assert not any(p.name.startswith(".pipeline.") for p in pipeline_dir.parent.iterdir())  # no tmp left

    loaded = load_pipeline(pipeline_dir, device="cpu")
    state = loaded.unet.state_dict()
    assert set(state) == set(weights)
    for name, array in weights.items():
        np.testing.assert_array_equal(state[name].numpy(), array, err_msg=name)
    assert loaded.scheduler.config.num_train_timesteps == 1000

    # Plain diffusers loads it too: the artifact does not need memshard.
    direct = DDPMPipeline.from_pretrained(pipeline_dir)
    np.testing.assert_array_equal(direct.unet.conv_in.weight.detach().numpy(), weights["conv_in.weight"])


def test_save_replaces_an_existing_pipeline(weights, tmp_path):
    cfg = build_config("tiny")
    out = save_pipeline(build_pipeline(cfg, 1, weights), tmp_path / "p")
    zeroed = {name: np.zeros_like(array) for name, array in weights.items()}
    save_pipeline(build_pipeline(cfg, 1, zeroed), out)
    assert float(load_pipeline(out, device="cpu").unet.conv_in.weight.detach().abs().sum()) == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def predicted(pipeline, num_images: int, seed: int) -> np.ndarray:
    """What the registered model's predict gives for this request: its sampling plan, as (N, H, W, C)."""
    plan = SamplingPlan(num_images, "ddpm", STEPS, DEFAULT_BATCH_SIZE, seed)
    return generate_plan(pipeline, plan).transpose(0, 2, 3, 1)


def test_a_sampling_plan_is_seeded_uint8_batch_by_batch(pipeline_dir):
    pipeline = load_pipeline(pipeline_dir, device="cpu")
    plan = SamplingPlan(3, "ddpm", STEPS, 3, seed=7)
    a, b = generate_plan(pipeline, plan), generate_plan(pipeline, plan)
    c = generate_plan(pipeline, SamplingPlan(3, "ddpm", STEPS, 3, seed=8))
    assert a.shape == (3, 1, 8, 8) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(a)) > 2  # real pixel values, not an all-black or saturated output
    # The pipeline's own float [0, 1] output for the batch's seed, rounded (not truncated) to uint8.
    ((count, seed),) = plan.batches()
    floats = pipeline(batch_size=count, generator=torch.Generator().manual_seed(seed),
                      num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_array_equal(a, np.round(floats * 255).astype(np.uint8).transpose(0, 3, 1, 2))

    # Each batch has its own seed: the second batch is not the first again, and a batch is the
    # same images whichever plan of the same seed and batch size holds it.
    d = generate_plan(pipeline, SamplingPlan(4, "ddpm", STEPS, 2, seed=7))
    assert d.shape == (4, 1, 8, 8)
    assert not np.array_equal(d[:2], d[2:])
    np.testing.assert_array_equal(d[:2], generate_plan(pipeline, SamplingPlan(2, "ddpm", STEPS, 2, seed=7)))
    with pytest.raises(MemshardError, match="at least 1 image"):
        SamplingPlan(0, "ddpm", STEPS, 2, seed=7)


def test_image_grid_tiles_and_upscales_grayscale():
    images = np.arange(5 * 8 * 8, dtype=np.uint8).reshape(5, 8, 8, 1)
    grid = image_grid(images)
    # 5 images -> 3 columns x 2 rows of 64 px tiles (8 px upscaled 8x) with 2 px gaps.
    assert grid.mode == "L" and grid.size == (3 * 64 + 2 * 2, 2 * 64 + 2)
    pixels = np.asarray(grid)
    assert pixels[0, 0] == images[0, 0, 0, 0] and pixels[63, 63] == images[0, 7, 7, 0]
    assert pixels[66, 66 + 7] == images[4, 0, 0, 0]  # 5th image: row 1, column 1
    assert pixels[:, 64:66].max() == 0  # the gap stays dark

    rgb = image_grid(np.zeros((2, 32, 32, 3), np.uint8), columns=2)
    assert rgb.mode == "RGB" and rgb.size == (2 * 64 + 2, 64)


def test_logged_model_predicts_registers_and_downloads(pipeline_dir, experiment_id, tmp_path):
    name = "memshard-test-pipeline"
    request = {"num_images": 3, "seed": 1, "num_inference_steps": STEPS}
    expected = predicted(load_pipeline(pipeline_dir, device="cpu"), 3, seed=1)

    with mlflow.start_run(experiment_id=experiment_id):
        info = log_pipeline_model(pipeline_dir, name, None)
    assert info.registered_model_version == 1

    by_uri = mlflow.pyfunc.load_model(info.model_uri).predict(request)
    assert by_uri.shape == (3, 8, 8, 1) and by_uri.dtype == np.uint8
    np.testing.assert_array_equal(by_uri, expected)
    registered = mlflow.pyfunc.load_model(f"models:/{name}/1")
    np.testing.assert_array_equal(registered.predict(request), expected)
    # A one-row DataFrame (what a serving endpoint builds) gives the same images.
    np.testing.assert_array_equal(registered.predict(pd.DataFrame([request])), expected)

    with mlflow.start_run(experiment_id=experiment_id):
        second = log_pipeline_model(pipeline_dir, name, None)
    assert second.registered_model_version == 2

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(tmp_path)))
    (index,) = local.rglob("model_index.json")
    downloaded = DDPMPipeline.from_pretrained(index.parent)
    np.testing.assert_array_equal(
        predicted(downloaded, 3, seed=1), expected
    )


def test_predict_reads_plain_and_wrapped_request_values(pipeline_dir):
    model = DDPMPipelineModel()
    model.pipeline = load_pipeline(pipeline_dir, device="cpu")  # what load_context does
    expected = predicted(model.pipeline, 2, seed=3)
    # A serving request may wrap scalars in lists or arrays; numpy ints come from DataFrames.
    request = {"num_images": [2], "seed": np.int64(3), "num_inference_steps": np.array([STEPS])}
    np.testing.assert_array_equal(model.predict(None, request), expected)
    with pytest.raises(MemshardError, match="no 'seed'"):
        model.predict(None, {"num_images": 2})
    with pytest.raises(MemshardError, match="num_images=2.5 must be one integer"):
        model.predict(None, {"num_images": 2.5, "seed": 1})
    with pytest.raises(MemshardError, match="one request"):
        model.predict(None, pd.DataFrame({"num_images": [1, 2], "seed": [0, 0]}))


def test_log_pipeline_model_needs_an_active_run(pipeline_dir, experiment_id):
    assert mlflow.active_run() is None
    with pytest.raises(RuntimeError, match="active run"):
        log_pipeline_model(pipeline_dir, None, None)


LEGACY_MODEL = Path(__file__).parent / "fixtures" / "legacy_pyfunc_model"


@pytest.mark.integration
def test_a_model_logged_before_the_package_rename_still_loads(mlflow_store):
    """The fixture was saved by memshard 0.1, whose pickle names orchestrator.pipeline_model."""
    assert b"orchestrator.pipeline_model" in (LEGACY_MODEL / "python_model.pkl").read_bytes()
    mlflow.set_tracking_uri(mlflow_store)
    mlflow.set_experiment("legacy")  # a fresh store: the module's earlier experiment id is not in it
    with mlflow.start_run():
        mlflow.log_artifacts(str(LEGACY_MODEL), "model")
        run_id = mlflow.active_run().info.run_id
    version = mlflow.register_model(f"runs:/{run_id}/model", "legacy")
    import memshard  # noqa: F401  (resolves the old pickled module name)

    model = mlflow.pyfunc.load_model(f"models:/legacy/{version.version}")
    images = model.predict({"num_images": 2, "seed": 0, "num_inference_steps": 2})
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8


@pytest.mark.integration
def test_new_models_hold_no_pickle(mlflow_store, tmp_path, weights):
    cfg = build_config("tiny")
    pipeline_dir = save_pipeline(build_pipeline(cfg, 1, weights), tmp_path / "pipeline")
    mlflow.set_tracking_uri(mlflow_store)
    mlflow.set_experiment("no-pickle")
    with mlflow.start_run():
        info = log_pipeline_model(pipeline_dir, None, None)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl")))
    assert not list(local.rglob("*.pkl"))
    images = mlflow.pyfunc.load_model(str(local)).predict({"num_images": 1, "seed": 0, "num_inference_steps": 2})
    assert images.shape == (1, 8, 8, 1)
