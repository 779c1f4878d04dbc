"""The final model: a diffusers DDPMPipeline, saved as safetensors and logged as an MLflow pyfunc.

The averaged UNet weights become a `DDPMPipeline` (UNet + scheduler), saved with `save_pretrained`
so anyone can load it with plain diffusers, and logged to MLflow as a pyfunc whose
`predict({"num_images": n, "seed": s})` returns n images as an N x H x W x C uint8 array.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from diffusers import DDPMPipeline
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

from orchestrator.config import Config
from orchestrator.errors import MemshardError
from shard_worker.model import build_scheduler, build_unet, load_numpy_state

MIN_TILE_PX = 64  # an 8x8 digit is a speck in the MLflow UI; upscale tiles to at least this
GRID_GAP_PX = 2  # dark gap between tiles so black-background digits do not run together

# The request columns; MLflow turns a dict input into a one-row DataFrame with these columns.
PREDICT_SIGNATURE = ModelSignature(
    inputs=Schema([
        ColSpec("long", "num_images"),
        ColSpec("long", "seed"),
        ColSpec("long", "num_inference_steps", required=False),
    ])
)

# Listed explicitly so MLflow does not import and probe the environment to infer them.
_REQUIREMENTS = ("memshard", "mlflow", "torch", "diffusers", "numpy", "pandas", "pillow", "safetensors")


def build_pipeline(cfg: Config, channels: int, unet_weights: dict[str, np.ndarray]) -> DDPMPipeline:
    """The averaged weights in the config's UNet, with the config's noise schedule."""
    unet = build_unet(cfg, channels)
    load_numpy_state(unet, unet_weights)
    unet.eval()  # dropout off: the pipeline is for sampling only
    return DDPMPipeline(unet=unet, scheduler=build_scheduler(cfg))


def save_pipeline(pipeline: DDPMPipeline, out_dir: str | Path) -> Path:
    """`save_pretrained` into a temporary sibling, then rename, so `out_dir` is never half-written."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        if out_dir.exists():
            # A directory cannot be atomically replaced by rename: move the old one aside first.
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def find_pipeline_dir(root: Path, model: str) -> Path:
    """The one saved pipeline (model_index.json) at or below `root`: a pipeline dir or an MLflow model."""
    if (root / "model_index.json").is_file():
        return root
    found = sorted(p.parent for p in root.rglob("model_index.json")) if root.is_dir() else []
    if len(found) != 1:
        raise MemshardError(f"{model} holds {len(found)} saved pipelines (model_index.json): give the pipeline "
                            "directory itself, or the MLflow model memshard train logged")
    return found[0]


def load_pipeline(path: str | Path, device: str | None = None) -> DDPMPipeline:
    """A saved pipeline on `device` (None: CUDA when there is one, else CPU)."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise MemshardError(f"{path} is not a saved pipeline (no model_index.json): give the directory save_pipeline wrote")
    pipeline = DDPMPipeline.from_pretrained(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipeline.to(device)


def generate_images(
    pipeline: DDPMPipeline,
    num_images: int,
    seed: int,
    num_inference_steps: int = 1000,
    batch_size: int = 256,
) -> np.ndarray:
    """`num_images` samples as N x H x W x C uint8; the same seed (and batch size) gives the same images."""
    if num_images < 1 or num_inference_steps < 1 or batch_size < 1:
        raise MemshardError(
            f"num_images={num_images}, num_inference_steps={num_inference_steps}, batch_size={batch_size}: "
            "each must be at least 1"
        )
    device = pipeline.device
    # One generator drawn from across all batches: batch k's noise depends only on the seed.
    generator = torch.Generator(device=device).manual_seed(seed)
    # bf16 halves the cost of a 1000-step sampling run on GPUs; CPU autocast is slow, so skip it.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    pipeline.set_progress_bar_config(disable=True)  # 1000-step bars would flood Ray/MLflow logs
    batches = []
    with autocast:
        for start in range(0, num_images, batch_size):
            count = min(batch_size, num_images - start)
            out = pipeline(batch_size=count, generator=generator,
                           num_inference_steps=num_inference_steps, output_type="np")
            batches.append(out.images)  # float in [0, 1], N x H x W x C
    images = np.concatenate(batches).astype(np.float32)
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None) -> Image.Image:
    """N x H x W x C uint8 images tiled into one square-ish picture, small images upscaled."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]  # N x H x W grayscale
    if images.ndim != 4 or len(images) == 0 or images.shape[-1] not in (1, 3):
        raise MemshardError(f"image_grid needs N x H x W x C images with C in (1, 3), got shape {images.shape}")
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    scale = max(1, math.ceil(MIN_TILE_PX / max(h, w)))
    tile_h, tile_w = h * scale, w * scale
    mode = "L" if c == 1 else "RGB"
    grid = Image.new(mode, (columns * tile_w + (columns - 1) * GRID_GAP_PX,
                            rows * tile_h + (rows - 1) * GRID_GAP_PX))
    for index, image in enumerate(images.astype(np.uint8)):
        tile = Image.fromarray(image[..., 0] if c == 1 else image, mode=mode)
        tile = tile.resize((tile_w, tile_h), Image.Resampling.NEAREST)  # keep pixels crisp
        row, col = divmod(index, columns)
        grid.paste(tile, (col * (tile_w + GRID_GAP_PX), row * (tile_h + GRID_GAP_PX)))
    return grid


def _request_value(model_input: Any, key: str, default: int | None) -> int:
    """One integer field of a predict request: a dict, or the one-row DataFrame MLflow makes of it."""
    if isinstance(model_input, pd.DataFrame):
        if len(model_input) != 1:
            raise MemshardError(f"predict takes one request (one row), got {len(model_input)} rows")
        value = model_input[key].iloc[0] if key in model_input.columns else None
    elif isinstance(model_input, Mapping):
        value = model_input.get(key)
    else:
        raise MemshardError(f"predict takes {{'num_images': n, 'seed': s}}, got {type(model_input).__name__}")
    if isinstance(value, (list, tuple, np.ndarray)):  # a serving request may wrap scalars
        value = np.asarray(value).reshape(-1)
        value = value[0] if len(value) == 1 else value
    if value is None or (np.isscalar(value) and pd.isna(value)):
        if default is None:
            raise MemshardError(f"predict request has no {key!r}: pass {{'num_images': n, 'seed': s}}")
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, (bool, np.bool_)) or not number.is_integer():  # 3.0 is fine, 3.5 is not
        raise MemshardError(f"predict request {key}={value!r} must be one integer")
    return int(number)


class DDPMPipelineModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a saved pipeline: predict({"num_images", "seed"[, "num_inference_steps"]})."""

    def load_context(self, context) -> None:
        self.pipeline = load_pipeline(context.artifacts["pipeline"])

    # Annotated as a DataFrame because, with PREDICT_SIGNATURE, MLflow hands predict the request
    # dict as a one-row DataFrame; a plain dict (calling this class directly) works too. The
    # annotation also keeps MLflow from building its own type-hint validation around predict.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        # Default to the training timesteps: the published DDPM sampling protocol.
        default_steps = int(self.pipeline.scheduler.config.num_train_timesteps)
        return generate_images(
            self.pipeline,
            num_images=_request_value(model_input, "num_images", None),
            seed=_request_value(model_input, "seed", None),
            num_inference_steps=_request_value(model_input, "num_inference_steps", default_steps),
        )


def _pip_requirements() -> list[str]:
    """The installed versions, pinned; a local label such as +cpu is dropped (it names a build)."""
    pins = []
    for name in _REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_pipeline_model(
    pipeline_dir: str | Path,
    registered_model_name: str | None,
    artifact_name: str = "model",
) -> mlflow.models.model.ModelInfo:
    """Log the saved pipeline into the active run as a pyfunc; register it when a name is given."""
    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise MemshardError(f"{pipeline_dir} is not a saved pipeline (no model_index.json): call save_pipeline first")
    if mlflow.active_run() is None:
        raise RuntimeError("log_pipeline_model logs into the active run: call it inside mlflow.start_run()")
    with warnings.catch_warnings():
        # No input_example on purpose (MLflow would load the model and sample to validate it);
        # the explicit signature already documents the request, so its nag is noise.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        return mlflow.pyfunc.log_model(
            name=artifact_name,
            python_model=DDPMPipelineModel(),
            artifacts={"pipeline": str(pipeline_dir)},  # copied into the model under artifacts/
            registered_model_name=registered_model_name,
            signature=PREDICT_SIGNATURE,
            pip_requirements=_pip_requirements(),
        )
