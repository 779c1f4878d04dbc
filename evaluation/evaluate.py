"""How often a model copies its training images, and how good its images are: a sampling plan ->
M seeded generations (made by the caller) -> the k nearest training images of each
(`nearest_neighbors`) -> memorization metrics (`memorization`) -> quality in a named feature space,
beside the same figures for real images (`quality.quality_report`).

A library over an ImageDataset and a `generate(plan)` callable: no MLflow, no Ray, no registry. The
command (`memshard.commands.evaluate`) finds the model and its data, makes the generations on Ray
workers (`memshard.orchestrator.generation`), calls `evaluate`, and logs what the returned
EvaluationReport says it should (params, metrics, report.json, the per-sample copies table, figures).

Defaults that finish on the hardware at hand (`sampling_plan`): `--protocol published` is the
published protocol (65,536 generations, DDPM with the training timesteps, 1,000); `auto` (the
default) is the published protocol where generation runs on GPUs, and QUICK on a CPU-only cluster.
The quality measure defaults to `default_quality_space` (Inception where torch-fidelity and its
weights are installed, else the training set's own classifier for labelled data, else none): a
missing optional dependency is a note, never an error.

With a copy guard (`--guard`, `EvaluateSettings.guard_settings`) the caller makes every generation of
the plan twice, plain and guarded (`Generation.guarded`); both sets are measured the same way against
the same training images, threshold and quality reference, and the guarded figures carry the
GUARDED_PREFIX. The plain figures are those of an evaluation without a guard.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from diffusers import DDPMPipeline

from memshard.config import GUARD_MODES, NEAR_COPY_QUANTILE, GuardConfig, check_guard
from memshard.data import ImageDataset
from memshard.errors import MemshardError
from memshard.evaluation.memorization import (
    DEFAULT_R_COPY_THRESHOLD,
    NN_RATIO_THRESHOLD,
    R_NEIGHBORS,
    THRESHOLDS,
    MemorizationReport,
    memorization_report,
    near_copies,
    near_copies_per_sample,
)
from memshard.evaluation.quality import (
    QualityReport,
    QualitySpaceChoice,
    default_quality_space,
    feature_space,
    quality_report,
)
from memshard.guard import NEAR_COPY_SAMPLE, Guard, GuardLog, build_guard, distinct_rows, near_copy_threshold
from memshard.neighbors import nearest_neighbors
from memshard.pipeline import DEFAULT_SAMPLING_STEPS, SAMPLERS, SamplingPlan, image_shape

COPIES_TABLE = "copies_per_sample.parquet"  # the artifact `unlearn --forget evaluation:RUN_ID` reads
# COPIES_TABLE's count columns, one per measure, by the name `--forget evaluation:RUN_ID:MEASURE` takes.
PER_SAMPLE_MEASURES = {"near-copies": "near_copies", "r-copies": "r_copies"}
R_COPY_DEFINITION = ("a generation is an r-copy of its nearest training image when r < r_copy_threshold, with "
                     "r = d1^2 / mean(d1^2..dk^2) over its k nearest distinct training images (squared L2, pixels "
                     "in [0, 1]; exact duplicates count once, the r-copy credited to the first of them)")
REAL_PREFIX = "real_heldout"  # metric names of the copying real reference: real_heldout.mq_0.5_fraction, ...
GUARDED_PREFIX = "guarded"  # metric names of the guarded generations: guarded.near_copy_fraction, guarded.fid.SPACE, ...
REAL_REFERENCE_FRACTION = 0.2
NEAR_COPY_DEFINITION = (f"a generation is a near copy of its nearest training image when its d1^2 is below the "
                        f"{NEAR_COPY_QUANTILE:.0%} quantile of real images' squared distance to their "
                        f"nearest other distinct training image (leave-one-out, up to {NEAR_COPY_SAMPLE:,} seeded "
                        f"images): a model drawing fresh images from the data's distribution scores about "
                        f"{NEAR_COPY_QUANTILE:.0%}")
REAL_REFERENCE_WHAT = (f"a seeded {REAL_REFERENCE_FRACTION:.0%} of the distinct training images, held out and scanned "
                       "against the other distinct images as generations are against all of them")
AUTO = "auto"
DEVICES = ("auto", "cpu", "cuda")


class Protocol(NamedTuple):
    name: str
    num_images: int
    sampler: str
    sampling_steps: int | None  # None: the model's training timesteps
    batch_size: int


PUBLISHED = Protocol("published", 65_536, "ddpm", None, 256)
# A CPU-only cluster: minutes on 2 cores for the digits model. DDIM 100, the sampler BENCHMARKS.md's
# evaluations used, with fewer generations: DPM-Solver++ 20 (5x fewer steps) becomes the default
# only once bench/evaluate_workers.py --samplers shows it gives the same MQ@t.
QUICK = Protocol("quick", 1_000, "ddim", 100, 50)
PROTOCOLS = {p.name: p for p in (PUBLISHED, QUICK)}


@dataclass(frozen=True)
class EvaluateSettings:
    protocol: str = AUTO  # auto: published where generation runs on GPUs, quick on a CPU-only cluster
    num_images: int | None = None  # None: the protocol's (each of these four overrides it)
    sampler: str | None = None
    sampling_steps: int | None = None  # None: the training timesteps for ddpm, 100 for ddim, 20 for dpm-solver++
    batch_size: int | None = None
    seed: int = 0
    feature_space: str | None = AUTO  # auto: default_quality_space; None: no quality measure
    inception_weights: str | None = None
    r_copy_threshold: float = DEFAULT_R_COPY_THRESHOLD
    device: str = AUTO  # where generation runs: auto (GPUs when the cluster has them), cpu or cuda
    workers: int | None = None  # generation workers; None: every GPU (or CPU slot) of the cluster
    batch_timeout_s: float = 3600.0  # a generation worker with no batch back by then is replaced (as a dead one)
    guard: str | None = None  # off, reject or guidance; None: the model's own guard section, else off
    guard_quantile: float | None = None  # None: the guard's own (the model's, else NEAR_COPY_QUANTILE)
    guard_scale: float | None = None  # None: the guard's own (the model's, else GuardConfig's)

    def check(self) -> None:
        """Every setting that can be checked without the model or the cluster."""
        if self.protocol != AUTO and self.protocol not in PROTOCOLS:
            raise MemshardError(f"unknown protocol {self.protocol!r}: choose auto, {', '.join(PROTOCOLS)}")
        if (self.num_images is not None and self.num_images < 2) or (self.batch_size is not None and self.batch_size < 1):
            raise MemshardError(f"--num-images {self.num_images} / --batch {self.batch_size}: need at least 2 images "
                                "(FID and r need two) and a batch of at least 1")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise MemshardError(f"unknown sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.sampling_steps is not None and self.sampling_steps < 1:
            raise MemshardError(f"--sampling-steps {self.sampling_steps}: need at least 1 step")
        if self.seed < 0:  # numpy's SeedSequence takes non-negative integers only
            raise MemshardError(f"--seed {self.seed}: use a non-negative integer")
        if not 0.0 < self.r_copy_threshold <= 1.0:
            raise MemshardError(f"--r-copy-threshold {self.r_copy_threshold} must be in (0, 1] "
                                "(r lies in [0, 1]; default 0.5)")
        if self.device not in DEVICES:
            raise MemshardError(f"--device {self.device!r} is not a device here: use {', '.join(DEVICES)}")
        if self.workers is not None and self.workers < 1:
            raise MemshardError(f"--workers {self.workers}: need at least 1 (default: every GPU or CPU slot)")
        if not self.batch_timeout_s > 0:
            raise MemshardError(f"--batch-timeout {self.batch_timeout_s}: give seconds > 0")
        if self.guard is not None and self.guard not in GUARD_MODES:
            raise MemshardError(f"--guard {self.guard!r}: choose one of {', '.join(GUARD_MODES)}")
        for flag, name, value in (("--guard-quantile", "quantile", self.guard_quantile),
                                  ("--guard-scale", "scale", self.guard_scale)):
            if value is not None:  # the guard section's own rule (check_guard), told by the flag's name
                try:
                    check_guard(GuardConfig(**{name: value}))
                except MemshardError as error:
                    raise MemshardError(f"{flag} {value}: {error}") from None
        if self.guard == "off":
            self._check_guard_flags_need_a_guard("--guard off")

    def _check_guard_flags_need_a_guard(self, why: str) -> None:
        given = [flag for flag, value in (("--guard-quantile", self.guard_quantile), ("--guard-scale", self.guard_scale))
                 if value is not None]
        if given:
            raise MemshardError(f"{' and '.join(given)} set a guard, but the guard is off ({why}): "
                                "add --guard reject or --guard guidance")

    def guard_settings(self, model_guard: GuardConfig | None) -> GuardConfig:
        """The guard this evaluation runs: `guard` (else the model's own section `model_guard`, else off),
        with `guard_quantile` / `guard_scale` in place of its values where given."""
        base = model_guard or GuardConfig()
        mode = self.guard or base.mode
        if mode == "off":
            self._check_guard_flags_need_a_guard("--guard off" if self.guard else "the model carries no guard")
            return dataclasses.replace(base, mode="off")
        given = {"quantile": self.guard_quantile, "scale": self.guard_scale}
        settings = dataclasses.replace(base, mode=mode, **{k: v for k, v in given.items() if v is not None})
        check_guard(settings)
        return settings


class PlanChoice(NamedTuple):
    plan: SamplingPlan
    protocol: str  # the protocol the plan starts from
    note: str  # one line for the terminal: what was chosen and why


def sampling_plan(settings: EvaluateSettings, num_train_timesteps: int, gpu: bool) -> PlanChoice:
    """The generations to make: the protocol's (`auto`: published when `gpu`, else quick), with any
    explicitly given number, sampler, steps or batch in its place; steps checked against the model."""
    protocol = PROTOCOLS[settings.protocol] if settings.protocol != AUTO else PUBLISHED if gpu else QUICK
    sampler = settings.sampler or protocol.sampler
    steps = settings.sampling_steps
    if steps is not None and not 1 <= steps <= num_train_timesteps:
        raise MemshardError(f"--sampling-steps {steps}: the model was trained with {num_train_timesteps} timesteps, "
                            f"choose 1 to {num_train_timesteps}")
    default = protocol.sampling_steps if sampler == protocol.sampler else DEFAULT_SAMPLING_STEPS[sampler]
    steps = steps or min(default or num_train_timesteps, num_train_timesteps)
    plan = SamplingPlan(settings.num_images or protocol.num_images, sampler, steps,
                        settings.batch_size or protocol.batch_size, settings.seed)
    given = [flag for flag, value in (("--num-images", settings.num_images), ("--sampler", settings.sampler),
                                      ("--sampling-steps", settings.sampling_steps), ("--batch", settings.batch_size))
             if value is not None]
    why = (f"--protocol {protocol.name}" if settings.protocol != AUTO
           else "generation runs on GPUs" if gpu else "the Ray cluster has no GPU")
    note = (f"protocol {protocol.name} ({why}{'; given: ' + ', '.join(given) if given else ''}): "
            f"{plan.num_images:,} generations, {plan.sampler} {plan.steps} steps, batches of {plan.batch_size}")
    if protocol is not PUBLISHED:
        note += f"; --protocol published for {PUBLISHED.num_images:,} generations, ddpm {num_train_timesteps} steps"
    return PlanChoice(plan, protocol.name, note)


def check_image_shape(dataset: ImageDataset, pipeline: DDPMPipeline) -> None:
    if dataset.images.shape[1:] != image_shape(pipeline):
        raise MemshardError(f"{dataset.path} holds {dataset.images.shape[1:]} images but the model makes "
                            f"{image_shape(pipeline)}: pass the data it was trained on")


def choose_quality_space(settings: EvaluateSettings, dataset: ImageDataset, device: str) -> QualitySpaceChoice:
    """The feature space for the quality measure, and one line saying why: `auto` chooses
    (`default_quality_space`, never an error for a missing optional dependency), a name is used as
    given (its errors are the user's to fix), None measures no quality."""
    if settings.feature_space is None:
        return QualitySpaceChoice(None, "no quality measure (--feature-space none)")
    if settings.feature_space == AUTO:
        return default_quality_space(dataset, device, settings.inception_weights)
    space = feature_space(settings.feature_space, device, settings.inception_weights, dataset)
    return QualitySpaceChoice(space, f"{space.name} (--feature-space {settings.feature_space})")


def evaluation_guard(settings: GuardConfig, dataset: ImageDataset, seed: int, device: str = "cpu") -> Guard | None:
    """The guard of `settings` (None: off) over the evaluated training images, calibrated with the
    evaluation's seed: at the default quantile its threshold is the evaluation's near-copy threshold."""
    return None if settings.mode == "off" else build_guard(settings, dataset, device, seed=seed)


GUARD_THRESHOLD_WHAT = ("the near-copy calibration (leave-one-out distances of real images) over the evaluated "
                        "training images, with the evaluation's seed, at the guard's quantile")


class GuardedGeneration(NamedTuple):
    """The plan's generations through a copy guard (`memshard.guard.Guard`), beside the plain ones."""

    images: np.ndarray  # (M, C, H, W) uint8, in the plain images' order
    log: GuardLog  # what the guard did, all batches
    guard: dict  # Guard.describe(): its settings and threshold (guard.*)
    seconds: dict[str, float]  # generation time on the workers: plain_batches, guarded_batches (Guard.batch after them)


class Generation(NamedTuple):
    """What a `generate(plan)` callable returns."""

    images: np.ndarray  # (M, C, H, W) uint8, image i from batch i // B of the plan
    device: str  # cpu or cuda: where the images were made
    details: dict  # how they were made (workers, placement, timing), for report.json
    guarded: GuardedGeneration | None = None  # with a guard: the same plan guarded


@dataclass(frozen=True)
class GuardedReport:
    """The guarded generations' measures, made as the plain ones' are."""

    generation: GuardedGeneration = field(repr=False)
    memorization: MemorizationReport = field(repr=False)
    quality: QualityReport | None

    def metrics(self, near_copy_threshold: float | None) -> dict[str, float]:
        """The generations' own figures as GUARDED_PREFIX.NAME (not the threshold or real references they
        are measured against: those are the plain run's), and what the guard did (guard.*)."""
        space = self.quality.space if self.quality else None
        figures = generation_metrics(self.memorization, self.quality, near_copy_threshold)
        metrics = {f"{GUARDED_PREFIX}.{key}": value for key, value in figures.items()
                   if key != "near_copy_sq_distance" and not key.startswith(f"quality.{space}.real.")
                   and not key.endswith(".classifier_held_out_accuracy")}
        seconds = self.generation.seconds
        return {**metrics, **self.generation.log.metrics(), "guard.seconds": seconds["guarded_batches"],
                "guard.plain_seconds": seconds["plain_batches"]}


def generation_metrics(memorization: MemorizationReport, quality: QualityReport | None,
                       near_copy_threshold: float | None) -> dict[str, float]:
    """One set of generations' memorization metrics, near copies (with a threshold) and quality (with a space)."""
    metrics = memorization.metrics()
    if near_copy_threshold is not None:
        metrics.update(near_copies(memorization, near_copy_threshold))
    if quality is not None:
        metrics[f"fid.{quality.space}"] = quality.generated.frechet
        metrics.update(quality.metrics(prefix=f"quality.{quality.space}"))
    return metrics


@dataclass(frozen=True)
class EvaluationReport:
    settings: EvaluateSettings
    plan: SamplingPlan
    protocol: str
    device: str  # where the generations were made: cpu or cuda
    generated: np.ndarray = field(repr=False)  # (M, C, H, W) uint8
    memorization: MemorizationReport = field(repr=False)
    quality: QualityReport | None  # None: no quality measure (see quality_note)
    real_memorization: MemorizationReport | None = field(repr=False)  # held-out real images (real_copy_reference)
    near_copy_threshold: float | None  # d1² of real images at NEAR_COPY_QUANTILE (None: too few images)
    quality_note: str  # which space, and why (or why none)
    generation: dict  # how the generations were made (workers, placement, timing)
    seconds: dict[str, float]  # wall time per phase: generate, nearest_neighbors, quality
    guarded: GuardedReport | None = None  # with a guard: the same plan's generations through it

    @property
    def feature_space(self) -> str | None:
        return self.quality.space if self.quality else None

    @property
    def fid(self) -> float | None:
        """Fréchet distance of the generations to all training images, in `feature_space`."""
        return self.quality.generated.frechet if self.quality else None

    def metrics(self) -> dict[str, float]:
        """Memorization metrics; with a quality measure `fid.SPACE` and `quality.SPACE.*`, the real
        reference's figures as `quality.SPACE.real.*`: the space is in every quality metric's name.
        With a guard, also the guarded generations' (`GuardedReport.metrics`)."""
        metrics = generation_metrics(self.memorization, self.quality, self.near_copy_threshold)
        if self.real_memorization is not None:
            metrics.update({f"{REAL_PREFIX}.{key}": value for key, value in self.real_memorization.metrics().items()
                            if key != "r_copied_training_samples"})
        if self.guarded is not None:
            metrics.update(self.guarded.metrics(self.near_copy_threshold))
        return metrics

    def params(self) -> dict[str, object]:
        """How the numbers were made (the dataset and model are the caller's to add)."""
        plan = self.plan
        return {"protocol": self.protocol, "sampler": plan.sampler, "sampling_steps": plan.steps,
                "num_images": plan.num_images, "batch_size": plan.batch_size, "seed": plan.seed,
                "feature_space": self.feature_space or "none", "r_copy_threshold": self.settings.r_copy_threshold,
                "r_neighbors": self.memorization.k, "device": self.device,
                "workers": self.generation.get("workers", 1),
                **(self.guarded.generation.guard if self.guarded else {})}

    def summary(self, dataset: ImageDataset, top: int = 20) -> dict:
        """report.json's body: the generation protocol, definitions, metrics, quality (its space, why,
        the real reference), r histogram and the most r-copied training images with their closest generations."""
        plan, report = self.plan, self.memorization
        counts, edges = report.histogram()
        return {
            "generation": {"protocol": self.protocol, "num_images": plan.num_images, "sampler": plan.sampler,
                           "sampling_steps": plan.steps, "batch_size": plan.batch_size, "seed": plan.seed,
                           "device": self.device,
                           "precision": "bf16 autocast" if self.device.startswith("cuda") else "float32",
                           **self.generation},
            "definitions": {
                "distance": "squared L2 between images with pixels in [0, 1]",
                "r": f"d1^2 / mean(d1^2..d{report.k}^2) over the {report.k} nearest training images",
                "mq": f"count of generations with r < t, t in {list(THRESHOLDS)}",
                "nn_ratio_copy": f"d1 / d2 < {NN_RATIO_THRESHOLD:.4f} (d = L2 distance)",
                "r_copy": R_COPY_DEFINITION.replace("r_copy_threshold", str(self.settings.r_copy_threshold)),
                "near_copy": NEAR_COPY_DEFINITION,
            },
            "metrics": self.metrics(),
            "copying_real_reference": None if self.real_memorization is None else {
                "what": REAL_REFERENCE_WHAT, "images": self.real_memorization.num_generations,
                "metrics": {key: value for key, value in self.metrics().items() if key.startswith(REAL_PREFIX + ".")}},
            "quality": {"space": self.feature_space, "why": self.quality_note,
                        **(self.quality.as_dict() if self.quality else {})},
            "fid": {"value": self.fid, "feature_space": self.feature_space,
                    "against": f"all {len(dataset)} training images"} if self.quality else None,
            "r_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
            "most_r_copied": [{"sample_id": str(dataset.sample_ids[row]), "r_copies": int(report.r_copies[row]),
                               "min_r": float(report.min_r[row]),
                               "closest_generations": report.closest_generations(row, 6)}
                              for row in report.most_r_copied(top)],
            "seconds": self.seconds,
            **({"guard": self.guard_summary()} if self.guarded else {}),
        }

    def guard_summary(self) -> dict:
        """report.json's guard block: the guard, what it did, and the guarded generations' figures."""
        guarded = self.guarded
        return {"settings": guarded.generation.guard,
                "threshold": GUARD_THRESHOLD_WHAT,
                "did": asdict(guarded.generation.log), "worker_seconds": guarded.generation.seconds,
                "metrics": guarded.metrics(self.near_copy_threshold)}

    def copies_table(self, dataset: ImageDataset) -> pa.Table:
        """Per training sample: its r-copies and near copies (PER_SAMPLE_MEASURES; near copies null when
        too few distinct images calibrate them), and the smallest r of a generation whose nearest it is
        (null: none)."""
        report = self.memorization
        finite = np.isfinite(report.min_r)
        near = (pa.array(near_copies_per_sample(report, self.near_copy_threshold).astype(np.int64))
                if self.near_copy_threshold is not None else pa.nulls(len(dataset), pa.int64()))
        return pa.table({
            "sample_id": pa.array(dataset.sample_ids.astype(str)),
            PER_SAMPLE_MEASURES["r-copies"]: pa.array(report.r_copies.astype(np.int64)),
            PER_SAMPLE_MEASURES["near-copies"]: near,
            "min_r": pa.array(np.where(finite, report.min_r, np.nan), mask=~finite),
        })


def evaluate(choice: PlanChoice, dataset: ImageDataset, generate: Callable[[SamplingPlan], Generation],
             settings: EvaluateSettings, quality_space: QualitySpaceChoice, device: str = "cpu") -> EvaluationReport:
    """Generate (`generate(plan)`), scan, measure: the numbers of one evaluation. The k-NN scan and
    the quality measure run here, on `device` (this process's: cpu or cuda)."""
    plan = choice.plan
    seconds = {}
    start = time.perf_counter()
    generation = generate(plan)
    seconds["generate"] = time.perf_counter() - start
    generated = generation.images
    expected = (plan.num_images, *dataset.images.shape[1:])
    if generated.shape != expected or generated.dtype != np.uint8:
        raise AssertionError(f"generate returned {generated.dtype} {generated.shape}, expected uint8 {expected}")

    start = time.perf_counter()
    report = scan_for_copies(generated, dataset, distinct_rows(dataset), settings.r_copy_threshold, device)
    seconds["nearest_neighbors"] = time.perf_counter() - start

    start = time.perf_counter()
    real = real_copy_reference(dataset, settings, device)
    threshold = near_copy_threshold(dataset, settings.seed, device)
    seconds["real_reference"] = time.perf_counter() - start

    quality = None
    if quality_space.space is not None:
        start = time.perf_counter()
        quality = quality_report(generated, dataset, quality_space.space, seed=plan.seed)
        seconds["quality"] = time.perf_counter() - start

    guarded = None
    if generation.guarded is not None:
        start = time.perf_counter()
        images = generation.guarded.images
        if images.shape != generated.shape or images.dtype != np.uint8:
            raise AssertionError(f"generate returned guarded {images.dtype} {images.shape}, expected uint8 {expected}")
        guarded_memorization = scan_for_copies(images, dataset, distinct_rows(dataset), settings.r_copy_threshold,
                                               device)
        guarded_quality = (None if quality_space.space is None
                           else quality_report(images, dataset, quality_space.space, seed=plan.seed))
        guarded = GuardedReport(generation.guarded, guarded_memorization, guarded_quality)
        seconds["guarded_measures"] = time.perf_counter() - start
    return EvaluationReport(settings, plan, choice.protocol, generation.device, generated, report, quality, real,
                            threshold, quality_space.reason, generation.details, seconds, guarded)


def scan_for_copies(queries: np.ndarray, dataset: ImageDataset, rows: np.ndarray, r_copy_threshold: float,
                    device: str) -> MemorizationReport:
    """The memorization measures of `queries` against the training images at `rows` (pixels in [0, 1])."""
    neighbors = nearest_neighbors(queries, dataset.images[rows], min(R_NEIGHBORS, len(rows)), scale=1 / 255,
                                  device=device)
    return memorization_report(neighbors.sq_distances, rows[neighbors.indices], len(dataset), r_copy_threshold)


def real_copy_reference(dataset: ImageDataset, settings: EvaluateSettings, device: str = "cpu") -> MemorizationReport | None:
    """The r-based measures (MQ@t, NN ratio) of real images no model saw: a seeded REAL_REFERENCE_FRACTION
    of the distinct training images scanned, like generations, against the other distinct images. On a set of similar
    images (the 8x8 digits) ordinary near neighbours have a small r — there most real held-out digits
    have r < 0.5 — so an r-copy rate means something only beside this one. None: too few images to split."""
    distinct = np.random.default_rng(settings.seed).permutation(distinct_rows(dataset))
    cut = int(round(REAL_REFERENCE_FRACTION * len(distinct)))
    held, rest = np.sort(distinct[:cut]), np.sort(distinct[cut:])
    if len(held) < 1 or len(rest) < 2:
        return None
    return scan_for_copies(dataset.images[held], dataset, rest, settings.r_copy_threshold, device)
