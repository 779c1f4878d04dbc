"""The unlearning audit: the same measurements of a model before and after unlearning (and of the
retrained model when one exists), as one report in JSON, markdown and a picture (method.md §6).

Measured per model, all seeded so before and after see the same draws:
- forget-set and keep-set loss at fixed (t, ε) (`shard_worker.scoring`);
- for each distinct forget image, the fraction of generations within mean squared pixel distance
  `copy_threshold` of it, and its nearest generation;
- FID of the generations against the scored keep images, in the offline pixel-projection space.

No MLflow and no Ray here: `memshard.commands.unlearn` logs what this module returns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from diffusers import DDPMPipeline
from PIL import Image

from memshard.data import ImageDataset
from memshard.errors import MemshardError
from memshard.evaluation.fid import PIXEL_PROJECTION, feature_space, fid
from memshard.evaluation.nearest_neighbors import nearest_neighbors
from memshard.pipeline import generate_images, image_grid
from memshard.shard_worker.scoring import score_samples
from memshard.unlearning.forget_set import ForgetSet

EXACTNESS = ("SISS and the naive, NegGrad and EraseDiff baselines are approximate: the forget set still shaped "
             "every training round (each round averages all shards), and these methods only push the model "
             "toward one trained without it. Retraining from scratch on the kept data is the only exact removal.")
NEAREST_PICTURE_ROWS = 16


@dataclass(frozen=True)
class AuditSettings:
    num_images: int = 64  # generations per model
    sampling_steps: int = 50  # DDPM steps per generation (the audit compares models, not absolute quality)
    copy_threshold: float = 0.01  # a generation copies a forget image when mean((g − a)²) in [0, 1] pixels is below
    keep_samples: int = 256  # keep-set samples scored for the keep loss
    seed: int = 0
    repeats: int = 4  # fixed (t, ε) draws per scored sample

    def check(self) -> None:
        if (self.num_images < 2 or self.sampling_steps < 1 or self.keep_samples < 1 or self.copy_threshold <= 0
                or self.repeats < 1 or self.seed < 0):
            raise MemshardError("audit settings: num_images ≥ 2, sampling_steps ≥ 1, keep_samples ≥ 1, repeats ≥ 1, "
                                "seed ≥ 0 and copy_threshold > 0 are required: fix the audit.* --set values")


@dataclass(frozen=True)
class ForgetImageMeasure:
    sample_id: str
    copies_in_dataset: int  # samples with the same pixels (all forgotten together)
    copy_fraction: float  # generations within copy_threshold of it
    nearest_generation: int
    nearest_mse: float


@dataclass(frozen=True)
class AuditMeasures:
    forget_loss: float
    keep_loss: float
    copy_fraction_mean: float
    copy_fraction_max: float
    per_image: tuple[ForgetImageMeasure, ...]
    fid: float
    fid_feature_space: str
    generated: np.ndarray = field(repr=False, compare=False)  # (num_images, C, H, W) uint8

    def to_json(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "generated"}


@dataclass(frozen=True)
class UnlearnCompute:
    method: str
    steps: int
    seconds: float
    device: str


@dataclass(frozen=True)
class RetrainReference:
    """A retrain of the same source on the same forget set: the exact reference."""

    run_id: str
    model: str
    steps: int
    seconds: float | None
    measures: AuditMeasures


@dataclass(frozen=True)
class AuditReport:
    source_run_id: str
    registered_model: str
    forget_hash: str
    forget_size: int
    keep_size: int
    method: str
    settings: AuditSettings
    before: AuditMeasures
    after: AuditMeasures
    compute: UnlearnCompute
    retrain: RetrainReference | None
    exactness: str = EXACTNESS

    def to_json(self) -> dict:
        """report.json: every field, the generations left out."""
        retrain = self.retrain
        return {
            "source_run_id": self.source_run_id, "registered_model": self.registered_model,
            "forget_hash": self.forget_hash, "forget_size": self.forget_size, "keep_size": self.keep_size,
            "method": self.method, "audit_settings": dataclasses.asdict(self.settings),
            "before": self.before.to_json(), "after": self.after.to_json(),
            "compute": dataclasses.asdict(self.compute),
            "retrain": None if retrain is None else {
                "run_id": retrain.run_id, "model": retrain.model, "steps": retrain.steps,
                "seconds": retrain.seconds, "measures": retrain.measures.to_json()},
            "exactness": self.exactness,
        }

    def metrics(self) -> dict[str, float]:
        metrics = {f"{key}_{when}": getattr(measures, key)
                   for when, measures in (("before", self.before), ("after", self.after))
                   for key in ("forget_loss", "keep_loss", "copy_fraction_mean", "fid")}
        metrics["unlearn_seconds"] = self.compute.seconds
        return metrics

    def markdown(self) -> str:
        b, a, c, retrain, s = self.before, self.after, self.compute, self.retrain, self.settings
        rows = [("forget-set loss at fixed (t, ε)", "forget_loss"), ("keep-set loss at fixed (t, ε)", "keep_loss"),
                ("fraction of generations copying a forget image (mean)", "copy_fraction_mean"),
                ("same, worst forget image", "copy_fraction_max"), (f"FID vs keep set ({b.fid_feature_space})", "fid")]
        head = "| measure | before | after |" + (" retrained |" if retrain else "")
        lines = [f"# Unlearning audit: {self.method}", "",
                 f"Source run {self.source_run_id}, model {self.registered_model}; forget set of "
                 f"{self.forget_size} samples (hash {self.forget_hash[:16]}), {self.keep_size} kept.", "",
                 head, "| --- | --- | --- |" + (" --- |" if retrain else "")]
        for label, key in rows:
            line = f"| {label} | {getattr(b, key):.4f} | {getattr(a, key):.4f} |"
            if retrain:
                line += f" {getattr(retrain.measures, key):.4f} |"
            lines.append(line)
        lines += ["", f"Copy: mean squared pixel distance in [0, 1] below {s.copy_threshold} among {s.num_images} "
                  f"generations ({s.sampling_steps} DDPM steps, seed {s.seed}). FID here is in the offline "
                  f"{b.fid_feature_space} space on {s.num_images} images: comparable only within this report.",
                  "", f"Compute: {c.steps} steps in {c.seconds:.1f} s on {c.device}."]
        if retrain:
            seconds = float("nan") if retrain.seconds is None else retrain.seconds
            lines.append(f"Retrain ({retrain.run_id}): {retrain.steps} steps in {seconds:.1f} s.")
        elif self.method != "retrain":
            lines.append("No retrain of this forget set exists yet: run `memshard unlearn ... --method retrain` for "
                         "the exact reference.")
        lines += ["", "Nearest generation to each forget image: audit/nearest.png (columns: forget image, before, "
                  "after).", "", f"**Exactness.** {self.exactness}", ""]
        return "\n".join(lines)

    def nearest_picture(self, dataset: ImageDataset) -> Image.Image:
        """One row per distinct forget image (at most NEAREST_PICTURE_ROWS): the image, its nearest
        generation before, and after."""
        tiles = []
        for b, a in zip(self.before.per_image[:NEAREST_PICTURE_ROWS], self.after.per_image[:NEAREST_PICTURE_ROWS],
                        strict=True):
            row = int(np.flatnonzero(dataset.sample_ids == b.sample_id)[0])
            tiles += [dataset.images[row], self.before.generated[b.nearest_generation],
                      self.after.generated[a.nearest_generation]]
        return image_grid(np.stack(tiles).transpose(0, 2, 3, 1), columns=3)


def measure(pipeline: DDPMPipeline, dataset: ImageDataset, forget: ForgetSet, settings: AuditSettings) -> AuditMeasures:
    """Forget/keep losses at fixed (t, ε), copies of each distinct forget image among generations, FID."""
    unet, scheduler = pipeline.unet, pipeline.scheduler
    rng = np.random.default_rng(settings.seed)
    keep_scored = np.sort(rng.choice(forget.keep_rows, min(settings.keep_samples, len(forget.keep_rows)),
                                     replace=False))
    forget_loss = score_samples(unet, scheduler, dataset.images, forget.rows, settings.seed, settings.repeats)
    keep_loss = score_samples(unet, scheduler, dataset.images, keep_scored, settings.seed, settings.repeats)
    generated = generate_images(pipeline, settings.num_images, settings.seed, settings.sampling_steps)
    generated = generated.transpose(0, 3, 1, 2)
    distinct = _distinct_rows(dataset, forget.rows)
    pixels = int(np.prod(dataset.images.shape[1:]))
    near = nearest_neighbors(dataset.images[distinct], generated, k=len(generated), scale=1 / 255, device="cpu")
    per_pixel = near.sq_distances / pixels  # (forget images, generations), ascending
    copy_fraction = (per_pixel < settings.copy_threshold).mean(axis=1)
    hashes = dataset.content_hashes[forget.rows]
    per_image = tuple(
        ForgetImageMeasure(sample_id=str(dataset.sample_ids[row]),
                           copies_in_dataset=int((hashes == dataset.content_hashes[row]).sum()),
                           copy_fraction=float(copy_fraction[i]), nearest_generation=int(near.indices[i, 0]),
                           nearest_mse=float(per_pixel[i, 0]))
        for i, row in enumerate(distinct))
    return AuditMeasures(
        forget_loss=float(forget_loss.mean()), keep_loss=float(keep_loss.mean()),
        copy_fraction_mean=float(copy_fraction.mean()), copy_fraction_max=float(copy_fraction.max()),
        per_image=per_image, fid=fid(generated, dataset.images[keep_scored], feature_space(PIXEL_PROJECTION)),
        fid_feature_space=PIXEL_PROJECTION, generated=generated)


def _distinct_rows(dataset: ImageDataset, rows: np.ndarray) -> np.ndarray:
    """The first row of each distinct image among `rows`: exact duplicates are measured once."""
    _, first = np.unique(dataset.content_hashes[rows], return_index=True)
    return rows[np.sort(first)]


def _plain(value):
    """Dataclasses (and tuples of them) as JSON-ready dicts and lists."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
