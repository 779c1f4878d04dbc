"""One point of a copying-against-quality curve (method.md §7): the global weights of a run after some
round -> seeded generations (made in this process, or by the caller's `generate`) -> copying (near
copies, r-copies, distinct training images copied) and quality in a feature space (Fréchet; in the
training set's classifier space also mean confidence, class coverage), beside the same figures for
real images. Guarded generations (memshard.guard) are measured the same way, made in this process by `GuardedGenerateHere`.

Shared by `memshard train`'s checkpoint choice (`memshard.commands.checkpoint_choice`, generating on
the run's shard actors), the sweep's trials (`memshard.tuning.trial`) and the efficacy bench
(bench/efficacy_curves.py, whose curves `memshard.tuning.curves` reads).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from memshard.config import Config
from memshard.data import ImageDataset
from memshard.evaluation.evaluate import REAL_PREFIX, EvaluateSettings, Generation, evaluate, sampling_plan
from memshard.evaluation.fid import FeatureSpace
from memshard.evaluation.intervals import FRECHET_RESAMPLES, fraction_interval
from memshard.evaluation.memorization import MemorizationReport, near_copies
from memshard.evaluation.quality import QualitySpaceChoice, quality_report
from memshard.guard import Guard, GuardLog
from memshard.pipeline import SamplingPlan, build_pipeline, generate_plan

# The copying measures (lower is better) and the quality measures of every point. COPYING and
# STRICT_COPYING are r-copies (evaluation.memorization), at r < 0.5 and r < 0.15; the keys keep the names
# that the efficacy bench's stored results (bench/results/*/points.csv) carry.
COPYING = ("generations_r_below_0.5", "copied_training_images")
# The same two at the strictest MQ threshold: on data whose real held-out images already sit below
# r = 0.5 (full digits: 84%), only these separate copies from ordinary near neighbours.
STRICT_COPYING = ("generations_r_below_0.15", "copied_r_below_0.15")
# Calibrated on real images (evaluation.memorization.near_copies): nearer to a training image than 95%
# of real images are to their nearest other one; a model drawing fresh real-like images scores ~5%.
NEAR_COPYING = ("generations_near_copies", "copied_near")
QUALITY = ("frechet", "mean_confidence", "coverage", "tv_distance")
# The figures each point also carries a bootstrap interval of (evaluation.intervals: over its
# generations, no retraining), as KEY_ci_low and KEY_ci_high.
BOOTSTRAPPED = (NEAR_COPYING[0], "frechet")


def interval_keys(key: str) -> tuple[str, str]:
    """Where a point keeps the bootstrap interval of `key`."""
    return f"{key}_ci_low", f"{key}_ci_high"


@dataclass(frozen=True)
class Data:
    train: ImageDataset  # what the models train on and copying is measured against
    quality: ImageDataset  # what quality is measured against (the whole dataset)
    regime: str  # "full" or "first-N"


@dataclass(frozen=True)
class Measurement:
    figures: dict  # COPYING, QUALITY and the real images' reference, by the names above
    seconds: dict  # wall time per phase: generate, nearest_neighbors, quality
    metrics: dict  # the same numbers under `memshard evaluate`'s metric names (fid.SPACE, quality.SPACE.*)
    params: dict  # how they were made, as `memshard evaluate` logs it
    pipeline: object  # the DDPMPipeline of the weights (the sweep saves the chosen point's)
    generated: object  # (M, C, H, W) uint8: the generations measured


def generate_here(pipeline) -> Callable[[SamplingPlan], Generation]:
    """`evaluate`'s generate callable: the plan's batches made in this process, in order. The shard
    actors hold the cluster's CPUs but wait between rounds, so generation has the machine."""

    def generate(plan: SamplingPlan) -> Generation:
        return Generation(generate_plan(pipeline, plan), pipeline.device.type, {"workers": 1, "where": "the driver process"})

    return generate


class GuardedGenerateHere:
    """`evaluate`'s generate callable for guarded generations: the plan's batches in this process, each
    through `guard.batch`; `plain`, the same plan's unguarded images where the caller has them (reject
    starts from them). After the call, `log` holds what the guard did to all of them."""

    def __init__(self, pipeline, guard: Guard, plain: np.ndarray | None = None):
        self.pipeline, self.guard, self.plain = pipeline, guard, plain
        self.log = GuardLog(guard.mode)

    def __call__(self, plan: SamplingPlan) -> Generation:
        images, self.log = self.guard.plan(self.pipeline, plan, self.plain)
        return Generation(images, self.pipeline.device.type,
                          {"workers": 1, "where": "the driver process", "guard": self.guard.mode})


def measure(cfg: Config, weights: dict, data: Data, settings: EvaluateSettings, space: FeatureSpace,
            device: str, generate: Callable[[SamplingPlan], Generation] | None = None) -> Measurement:
    """Copying and quality of the global weights; `generate` (None: `generate_here`) makes the plan's
    images from these weights, in batch order."""
    pipeline = build_pipeline(cfg, data.train.channels, weights).to(device)
    choice = sampling_plan(settings, cfg.model.num_train_timesteps, gpu=device.startswith("cuda"))
    report = evaluate(choice, data.train, generate or generate_here(pipeline), settings,
                      QualitySpaceChoice(None, "measured below, against the whole dataset"), device=device)
    start = time.perf_counter()
    quality = quality_report(report.generated, data.quality, space, seed=settings.seed,
                             frechet_resamples=FRECHET_RESAMPLES)
    seconds = {**report.seconds, "quality": time.perf_counter() - start}
    memorization = report.metrics()  # r-copies counted at settings.r_copy_threshold = 0.5; near copies
    figures = {
        **copying_figures(report.memorization, report.near_copy_threshold),
        "real_r_below_0.5": memorization.get(f"{REAL_PREFIX}.mq_0.5_fraction"),  # None: no real reference
        "real_r_below_0.15": memorization.get(f"{REAL_PREFIX}.mq_0.15_fraction"),
        **{key: getattr(quality.generated, key) for key in QUALITY},
        "real_frechet": quality.real.frechet, "real_mean_confidence": quality.real.mean_confidence,
        "real_coverage": quality.real.coverage, **dict(zip(interval_keys("frechet"), quality.frechet_interval, strict=True)),
    }
    metrics = {**memorization, f"fid.{quality.space}": quality.generated.frechet,
               **quality.metrics(prefix=f"quality.{quality.space}")}
    params = {**report.params(), "feature_space": quality.space}
    return Measurement(figures, seconds, metrics, params, pipeline, report.generated)


def copying_figures(memorization: MemorizationReport, near_copy_threshold: float | None) -> dict:
    """COPYING, STRICT_COPYING and NEAR_COPYING of one scan (r-copies counted at its r-copy threshold, 0.5),
    with the near-copy fraction's bootstrap interval over the generations (seed 0)."""
    m = memorization.metrics()
    near = near_copies(memorization, near_copy_threshold) if near_copy_threshold is not None else {}
    near_interval = (None, None) if near_copy_threshold is None else \
        fraction_interval(memorization.nearest_sq_distance < near_copy_threshold)
    return {"generations_r_below_0.5": m["mq_0.5_fraction"],
            "copied_training_images": m["r_copied_training_samples"],  # distinct images with r-copies (r < 0.5)
            "mq_0.5_count": m["mq_0.5_count"], "nn_ratio_copy_fraction": m["nn_ratio_copy_fraction"],
            "r_median": m["r_median"], "generations_r_below_0.15": m["mq_0.15_fraction"],
            "copied_r_below_0.15": int((memorization.min_r < 0.15).sum()),
            "generations_near_copies": near.get("near_copy_fraction"), "copied_near": near.get("near_copied_training_samples"),
            "near_copy_sq_distance": near.get("near_copy_sq_distance"),
            **dict(zip(interval_keys(NEAR_COPYING[0]), near_interval, strict=True))}


def evaluation_rounds(rounds: int, eval_every: int, also: int | None = None) -> set[int]:
    """Every `eval_every`-th round, the last, and `also` (the baseline's reference round) when it is trained."""
    return {r for r in range(1, rounds + 1) if r % eval_every == 0 or r == rounds or r == also}
