"""Is the forget set still reproduced? The audit's forget measures, cheap enough to run every few
unlearning steps, and the rule that stops unlearning on their evidence (method.md §6b).

A check measures the UNet as it stands, in eval mode, always on the same seeded draws, so two
checks differ only because the model changed:
- forget loss and keep loss: mean DDPM loss at fixed seeded (t, ε) (`model.score_samples`) over a
  seeded sample of at most `samples` forget images and as many keep images;
- pixel matches: of `check_images` generations sampled with the audit's sampler (ancestral DDPM) in only
  `check_sampling_steps` steps from one seeded generator (the same noise at every check), how many
  lie within mean squared pixel distance `pixel_match_threshold` (pixels in [0, 1], the audit's measure)
  of some forget image. A pixel match is near-identical pixels, stricter than evaluation's r-copies and
  near copies (`evaluation.memorization`), which rank generations against the whole training set. (A deterministic DDIM sampler at the same step count finds a planted image
  in 3-4× fewer generations than DDPM does: it would call an image forgotten too early.) Generating
  is most of a check's cost, so pixel matches are counted only where they can decide something: at a
  `full` check (the first and the last) and whenever the loss condition below holds; elsewhere
  they are None.

Stop rule: the forget set is no longer reproduced when a check finds 0 pixel matches AND the forget loss
is at least `stop_loss_ratio` × the keep loss (1.0: the forget images are no more familiar to the
model than the images it keeps, which is how a model that never saw them treats them). The loss
condition guards against stopping on sampling luck: a model that pixel-matches an image in 2% of
its generations shows 0 matches among 64 of them one time in four, but its forget loss stays far below
its keep loss until the image is actually forgotten. `stop_loss_ratio = 0` stops on pixel matches alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from memshard.model import score_samples
from memshard.neighbors import nearest_neighbors
from memshard.pipeline import SamplingPlan, generate_plan

PIXEL_MATCH_THRESHOLD = 0.01  # mean((g − a)²) with pixels in [0, 1]: the audit's and the check's pixel match


@dataclass(frozen=True)
class CheckPoint:
    """One check of the model after `step` optimizer steps."""

    step: int
    keep_loss: float  # at fixed seeded (t, ε), over the check's keep sample
    forget_loss: float  # at fixed seeded (t, ε), over the forget images
    pixel_matches: int | None  # check generations within pixel_match_threshold of a forget image (None: not counted)
    generations: int
    seconds: float  # what this check cost (counted in the unlearning's compute)


def distinct_images(images: np.ndarray) -> np.ndarray:
    """The distinct images among (N, C, H, W) `images`, in first-seen order: exact duplicates once."""
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    _, first = np.unique(flat, axis=0, return_index=True)
    return images[np.sort(first)]


def pixel_distances(forget_distinct: np.ndarray, generated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-pixel squared distances (F, G) ascending per forget image, the generation of each entry)."""
    pixels = int(np.prod(forget_distinct.shape[1:]))
    near = nearest_neighbors(forget_distinct, generated, k=len(generated), scale=1 / 255, device="cpu")
    return near.sq_distances / pixels, near.indices


def pixel_matching_generations(forget_distinct: np.ndarray, generated: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of the generations within `threshold` of at least one forget image."""
    per_pixel, indices = pixel_distances(forget_distinct, generated)
    return np.unique(indices[per_pixel < threshold])


class ForgetCheck:
    """The forget measures of one unlearning job; call it with the UNet and the step count."""

    def __init__(self, scheduler: DDPMScheduler, keep_images: np.ndarray, forget_images: np.ndarray, *,
                 generations: int, sampling_steps: int, samples: int, pixel_match_threshold: float = PIXEL_MATCH_THRESHOLD,
                 stop_loss_ratio: float = 1.0, seed: int = 0, repeats: int = 2):
        self.scheduler = scheduler
        self.sampler = DDPMScheduler.from_config(scheduler.config)  # its own copy: sampling sets its timesteps
        rng = np.random.default_rng(seed)
        self.keep_images, self.keep_rows = keep_images, _sample(rng, len(keep_images), samples)
        self.forget_images, self.forget_rows = forget_images, _sample(rng, len(forget_images), samples)
        self.forget_distinct = distinct_images(forget_images)
        self.generations, self.sampling_steps = generations, sampling_steps
        self.pixel_match_threshold, self.stop_loss_ratio = pixel_match_threshold, stop_loss_ratio
        self.seed, self.repeats = seed, repeats

    def __call__(self, unet: UNet2DModel, step: int, full: bool = False) -> CheckPoint:
        """The measures after `step` steps; pixel matches only when `full` or the loss condition holds."""
        started = time.perf_counter()
        was_training = unet.training
        unet.eval()
        try:
            forget_loss = score_samples(unet, self.scheduler, self.forget_images, self.forget_rows, self.seed,
                                        self.repeats).mean()
            keep_loss = score_samples(unet, self.scheduler, self.keep_images, self.keep_rows, self.seed,
                                      self.repeats).mean()
            pixel_matches = None
            if full or self.unfamiliar(forget_loss, keep_loss):
                with torch.no_grad():
                    pipeline = DDPMPipeline(unet=unet, scheduler=self.sampler)
                    plan = SamplingPlan(self.generations, "ddpm", self.sampling_steps, self.generations, self.seed)
                    generated = generate_plan(pipeline, plan)
                pixel_matches = len(pixel_matching_generations(self.forget_distinct, generated,
                                                               self.pixel_match_threshold))
        finally:
            unet.train(was_training)
        if next(unet.parameters()).device.type == "cuda":
            torch.cuda.synchronize()
        return CheckPoint(step, float(keep_loss), float(forget_loss), pixel_matches, self.generations,
                          time.perf_counter() - started)

    def unfamiliar(self, forget_loss: float, keep_loss: float) -> bool:
        """The loss condition: the forget images are no more familiar to the model than the kept ones."""
        return forget_loss >= self.stop_loss_ratio * keep_loss

    def forgotten(self, point: CheckPoint) -> bool:
        """The stop rule (module notes): no pixel matches, and the loss condition."""
        return point.pixel_matches == 0 and self.unfamiliar(point.forget_loss, point.keep_loss)


def _sample(rng: np.random.Generator, count: int, most: int) -> np.ndarray:
    """Sorted seeded rows: all of `count` when there are at most `most`, else `most` of them."""
    return np.arange(count) if count <= most else np.sort(rng.choice(count, most, replace=False))
