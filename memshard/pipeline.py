"""The trained model as a diffusers DDPMPipeline: built from averaged weights, saved, loaded, sampled.

Saved with `save_pretrained` (safetensors) so anyone can load it with plain diffusers.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler
from PIL import Image

from memshard.config import Config
from memshard.errors import MemshardError
from memshard.files import replace_directory
from memshard.model import build_scheduler, build_unet, load_numpy_state, resolve_device, sampling_weights

MIN_TILE_PX = 64  # an 8x8 digit is a speck in the MLflow UI; upscale tiles to at least this
GRID_GAP_PX = 2  # dark gap between tiles so black-background digits do not run together


def build_pipeline(cfg: Config, channels: int, unet_weights: dict[str, np.ndarray]) -> DDPMPipeline:
    """The averaged weights in the config's UNet, with the config's noise schedule."""
    unet = build_unet(cfg, channels)
    load_numpy_state(unet, sampling_weights(unet_weights))
    unet.eval()  # dropout off: the pipeline is for sampling only
    return DDPMPipeline(unet=unet, scheduler=build_scheduler(cfg))


def save_pipeline(pipeline: DDPMPipeline, out_dir: str | Path) -> Path:
    """`save_pretrained` into a temporary sibling, then rename, so `out_dir` is never half-written."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        replace_directory(tmp, out_dir)
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
    target = resolve_device(device)  # a bad device is the user's error before any loading
    _check_model_index(path / "model_index.json")
    try:
        pipeline = DDPMPipeline.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:  # diffusers on a damaged folder
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise MemshardError(f"the saved pipeline in {path} cannot be loaded ({reason}): give the directory "
                            "save_pipeline wrote, undamaged") from None
    return pipeline.to(target)


def _check_model_index(file: Path) -> None:
    """model_index.json must name a DDPMPipeline with a unet and a scheduler; diffusers would otherwise
    fail with a KeyError or TypeError deep inside from_pretrained."""
    try:
        index = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MemshardError(f"{file} is not valid JSON ({type(error).__name__}): the saved pipeline is damaged; "
                            "save it again, or give the directory save_pipeline wrote") from None
    components = ("unet", "scheduler")
    if not isinstance(index, dict) or index.get("_class_name") != "DDPMPipeline" or not all(
            isinstance(index.get(name), list) and len(index[name]) == 2 for name in components):
        raise MemshardError(f"{file} does not describe a DDPMPipeline with a unet and a scheduler: the saved pipeline "
                            "is damaged or of another kind; give the directory save_pipeline wrote")


def image_shape(pipeline: DDPMPipeline) -> tuple[int, int, int]:
    """(C, H, W) of the images the pipeline makes."""
    resolution = int(pipeline.unet.config.sample_size)
    return int(pipeline.unet.config.in_channels), resolution, resolution


# Samplers by name, and their default number of steps (None: the training timesteps, the published protocol).
SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
DEFAULT_SAMPLING_STEPS = {"ddpm": None, "ddim": 100, "dpm-solver++": 20}
DEFAULT_BATCH_SIZE = 256  # generations per batch where the caller has no reason to choose (the pyfunc, the audit)


@dataclass(frozen=True)
class SamplingPlan:
    """M generations with one sampler and number of steps, made in batches of `batch_size`.

    Batch b holds images [b·B, (b+1)·B) and is seeded from the b-th state of SeedSequence(seed), so
    an image depends on the model, the plan and the device kind only: not on how many processes
    made the batches, nor in which order. It is memshard's one seeded-sampling scheme: evaluation,
    tuning, the training sample grids, the registered model's predict and the unlearning checks and
    audit all sample through it."""

    num_images: int
    sampler: str
    steps: int
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if min(self.num_images, self.steps, self.batch_size) < 1 or self.seed < 0:
            raise MemshardError(f"num_images={self.num_images}, steps={self.steps}, batch_size={self.batch_size}, "
                                f"seed={self.seed}: give at least 1 image, 1 step and a batch of 1, and a seed >= 0")

    def batches(self) -> list[tuple[int, int]]:
        """(image count, torch seed) of each batch, in image order."""
        count = -(-self.num_images // self.batch_size)
        seeds = np.random.SeedSequence(self.seed).generate_state(count, np.uint64)
        return [(min(self.batch_size, self.num_images - b * self.batch_size), int(seeds[b] >> np.uint64(1)))
                for b in range(count)]


def generate_batch(pipeline: DDPMPipeline, plan: SamplingPlan, count: int, seed: int) -> np.ndarray:
    """One batch of `plan` (see `SamplingPlan.batches`) as (count, C, H, W) uint8; the caller has
    given the pipeline the plan's sampler (`use_sampler`)."""
    device = pipeline.device
    pipeline.set_progress_bar_config(disable=True)  # 1000-step bars would flood Ray/MLflow logs
    with sampling_precision(device):
        out = pipeline(batch_size=count, generator=torch.Generator(device=device).manual_seed(seed),
                       num_inference_steps=plan.steps, output_type="np")
    return to_uint8(out.images)


def sampling_precision(device: torch.device):
    """bf16 autocast on GPUs, where it halves the cost of a 1000-step sampling run; none on CPUs, where
    autocast is slow."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def to_uint8(images: np.ndarray) -> np.ndarray:
    """A sampler's (N, H, W, C) floats in [0, 1] as (N, C, H, W) uint8, as every generation is returned."""
    images = np.clip(np.round(images.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def generate_plan(pipeline: DDPMPipeline, plan: SamplingPlan) -> np.ndarray:
    """Every batch of `plan`, in this process and in image order, as (M, C, H, W) uint8: the images
    Ray generation workers make from the same plan. Switches `pipeline` to the plan's sampler."""
    use_sampler(pipeline, plan.sampler)
    return np.concatenate([generate_batch(pipeline, plan, count, seed) for count, seed in plan.batches()])


def use_sampler(pipeline: DDPMPipeline, sampler: str) -> DDPMPipeline:
    """Give `pipeline` the scheduler named `sampler`, on the noise schedule it was trained with; returns it.

    ddpm: ancestral DDPM (Ho et al. 2020); ddim: deterministic DDIM (eta 0, Song et al. 2021);
    dpm-solver++: second-order multistep DPM-Solver++ (Lu et al. 2022), meant for 20-25 steps."""
    config = pipeline.scheduler.config
    if sampler == "ddpm":
        scheduler = DDPMScheduler.from_config(config)
    elif sampler == "ddim":
        scheduler = DDIMScheduler.from_config(config)
    elif sampler == "dpm-solver++":
        scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    else:
        raise MemshardError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    pipeline.scheduler = scheduler
    return pipeline


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
