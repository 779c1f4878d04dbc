"""How often a model copies its training images, and its FID: M seeded generations -> the k nearest
training images of each (`nearest_neighbors`) -> memorization metrics (`memorization`) -> FID (`fid`).

A library over a loaded DDPMPipeline and an ImageDataset: no MLflow, no registry. The command
(`memshard.commands.evaluate`) finds the model and its data, calls `evaluate`, and logs what the
returned EvaluationReport says it should (params, metrics, report.json, the copies table, figures).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from diffusers import DDIMScheduler, DDPMPipeline
from tqdm import tqdm

from memshard.data import ImageDataset
from memshard.errors import MemshardError
from memshard.evaluation.fid import FeatureSpace, fid
from memshard.evaluation.memorization import (
    DEFAULT_COPY_THRESHOLD,
    NN_RATIO_THRESHOLD,
    R_NEIGHBORS,
    THRESHOLDS,
    MemorizationReport,
    memorization_report,
)
from memshard.evaluation.nearest_neighbors import nearest_neighbors
from memshard.model import resolve_device
from memshard.pipeline import generate_images, image_shape

SAMPLERS = ("ddpm", "ddim")
DDIM_DEFAULT_STEPS = 100
PUBLISHED_NUM_IMAGES = 65_536
COPIES_TABLE = "copies_per_sample.parquet"  # the artifact `unlearn --forget evaluation:RUN_ID` reads
COPY_DEFINITION = ("a generation copies its nearest training image when r < copy_threshold, with "
                   "r = d1^2 / mean(d1^2..dk^2) over its k nearest training images (squared L2, pixels in [0, 1])")


@dataclass(frozen=True)
class EvaluateSettings:
    num_images: int = PUBLISHED_NUM_IMAGES  # published protocol; on a CPU use a few hundred to thousands
    sampler: str = "ddpm"
    sampling_steps: int | None = None  # None: the training timesteps for ddpm (published), 100 for ddim
    batch_size: int = 256
    seed: int = 0
    feature_space: str | None = "inception-v3"  # None: no FID
    inception_weights: str | None = None
    copy_threshold: float = DEFAULT_COPY_THRESHOLD
    device: str = "auto"

    def check(self) -> torch.device:
        """Every setting that can be checked without the model; returns the device to run on."""
        if self.num_images < 2 or self.batch_size < 1:
            raise MemshardError(f"--num-images {self.num_images} / --batch {self.batch_size}: need at least 2 images "
                                "(FID and r need two) and a batch of at least 1")
        if self.sampler not in SAMPLERS:
            raise MemshardError(f"unknown sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.sampling_steps is not None and self.sampling_steps < 1:
            raise MemshardError(f"--sampling-steps {self.sampling_steps}: need at least 1 step")
        if self.seed < 0:  # numpy's SeedSequence takes non-negative integers only
            raise MemshardError(f"--seed {self.seed}: use a non-negative integer")
        if not 0.0 < self.copy_threshold <= 1.0:
            raise MemshardError(f"--copy-threshold {self.copy_threshold} must be in (0, 1] "
                                "(r lies in [0, 1]; default 0.5)")
        return resolve_device(self.device)


@dataclass(frozen=True)
class EvaluationReport:
    settings: EvaluateSettings
    sampling_steps: int
    device: str
    generated: np.ndarray = field(repr=False)  # (M, C, H, W) uint8
    memorization: MemorizationReport = field(repr=False)
    fid: float | None  # None: no feature space chosen
    feature_space: str | None
    seconds: dict[str, float]  # wall time per phase: generate, nearest_neighbors, fid

    def metrics(self) -> dict[str, float]:
        metrics = self.memorization.metrics()
        if self.feature_space is not None:
            metrics[f"fid.{self.feature_space}"] = self.fid
        return metrics

    def params(self) -> dict[str, object]:
        """How the numbers were made (the dataset and model are the caller's to add)."""
        s = self.settings
        return {"sampler": s.sampler, "sampling_steps": self.sampling_steps, "num_images": s.num_images,
                "batch_size": s.batch_size, "seed": s.seed, "feature_space": self.feature_space or "none",
                "copy_threshold": s.copy_threshold, "r_neighbors": self.memorization.k, "device": self.device}

    def summary(self, dataset: ImageDataset, top: int = 20) -> dict:
        """report.json's body: the generation protocol, definitions, metrics, FID, r histogram and the
        most copied training images with their closest generations."""
        s, report = self.settings, self.memorization
        counts, edges = report.histogram()
        return {
            "generation": {"num_images": s.num_images, "sampler": s.sampler, "sampling_steps": self.sampling_steps,
                           "batch_size": s.batch_size, "seed": s.seed, "device": self.device,
                           "precision": "bf16 autocast" if self.device.startswith("cuda") else "float32"},
            "definitions": {
                "distance": "squared L2 between images with pixels in [0, 1]",
                "r": f"d1^2 / mean(d1^2..d{report.k}^2) over the {report.k} nearest training images",
                "mq": f"count of generations with r < t, t in {list(THRESHOLDS)}",
                "nn_ratio_copy": f"d1 / d2 < {NN_RATIO_THRESHOLD:.4f} (d = L2 distance)",
                "copy": COPY_DEFINITION.replace("copy_threshold", str(s.copy_threshold)),
            },
            "metrics": self.metrics(),
            "fid": {"value": self.fid, "feature_space": self.feature_space,
                    "against": f"all {len(dataset)} training images"} if self.feature_space else None,
            "r_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
            "most_copied": [{"sample_id": str(dataset.sample_ids[row]), "copies": int(report.copies[row]),
                             "min_r": float(report.min_r[row]),
                             "closest_generations": report.closest_generations(row, 6)}
                            for row in report.most_copied(top)],
            "seconds": self.seconds,
        }

    def copies_table(self, dataset: ImageDataset) -> pa.Table:
        """Per training sample: how many generations copy it, and the smallest r of a generation whose
        nearest it is (null: none)."""
        report = self.memorization
        finite = np.isfinite(report.min_r)
        return pa.table({
            "sample_id": pa.array(dataset.sample_ids.astype(str)),
            "copies": pa.array(report.copies.astype(np.int64)),
            "min_r": pa.array(np.where(finite, report.min_r, np.nan), mask=~finite),
        })


def evaluate(pipeline: DDPMPipeline, dataset: ImageDataset, settings: EvaluateSettings,
             space: FeatureSpace | None, show_progress: bool = True) -> EvaluationReport:
    """Generate, scan, measure: the numbers of one evaluation. `space` None: no FID.

    The caller loads `pipeline` on the settings' device; a ddim sampler replaces its scheduler."""
    device = settings.check()
    if dataset.images.shape[1:] != image_shape(pipeline):
        raise MemshardError(f"{dataset.path} holds {dataset.images.shape[1:]} images but the model makes "
                            f"{image_shape(pipeline)}: pass the data it was trained on")
    steps = sampling_steps(settings, pipeline)
    if settings.sampler == "ddim":
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    seconds = {}
    start = time.perf_counter()
    generated = _generate(pipeline, settings, steps, show_progress)
    seconds["generate"] = time.perf_counter() - start

    start = time.perf_counter()
    neighbors = nearest_neighbors(generated, dataset.images, min(R_NEIGHBORS, len(dataset)), scale=1 / 255,
                                  device=device)
    report = memorization_report(neighbors.sq_distances, neighbors.indices, len(dataset), settings.copy_threshold)
    seconds["nearest_neighbors"] = time.perf_counter() - start

    fid_value = None
    if space is not None:
        start = time.perf_counter()
        fid_value = fid(generated, dataset.images, space)
        seconds["fid"] = time.perf_counter() - start
    return EvaluationReport(settings, steps, str(device), generated, report, fid_value,
                            space.name if space else None, seconds)


def sampling_steps(settings: EvaluateSettings, pipeline: DDPMPipeline) -> int:
    """The steps to sample with: as asked, else the training timesteps (ddpm) or 100 (ddim), within range."""
    timesteps = int(pipeline.scheduler.config.num_train_timesteps)
    steps = settings.sampling_steps or (timesteps if settings.sampler == "ddpm" else min(DDIM_DEFAULT_STEPS, timesteps))
    if not 1 <= steps <= timesteps:
        raise MemshardError(f"--sampling-steps {steps}: the model was trained with {timesteps} timesteps, "
                            f"choose 1 to {timesteps}")
    return steps


def _generate(pipeline: DDPMPipeline, settings: EvaluateSettings, steps: int, show_progress: bool) -> np.ndarray:
    """M images as (M, C, H, W) uint8. Batch b is seeded from SeedSequence(seed) child b, so the images
    depend on (seed, batch size) only, and batches could be spread over devices without changing them."""
    batches = -(-settings.num_images // settings.batch_size)
    seeds = np.random.SeedSequence(settings.seed).generate_state(batches, np.uint64)
    images = []
    bar = tqdm(total=settings.num_images, desc="generating", unit="img", disable=not show_progress, file=sys.stderr)
    for b, start in enumerate(range(0, settings.num_images, settings.batch_size)):
        count = min(settings.batch_size, settings.num_images - start)
        batch = generate_images(pipeline, count, seed=int(seeds[b] >> np.uint64(1)), num_inference_steps=steps,
                                batch_size=count)
        images.append(batch.transpose(0, 3, 1, 2))
        bar.update(count)
    bar.close()
    return np.ascontiguousarray(np.concatenate(images))
