"""Image quality: which feature space measures it, and the quality report in that space.

`feature_space(name)` gives the space a name chooses (`--feature-space`); `default_quality_space(dataset)`
chooses one when none is named: Inception-v3 where torch-fidelity imports and its weights are already
on disk (nothing is downloaded); else the training set's own classifier (`classifier_space`) when the
dataset has labels; else none, with a one-line reason. A missing optional dependency is a reason,
never an error.

`quality_report` gives, in the chosen space, the Fréchet distance of the generations to the training
set and, in a classifier space, the mean confidence, class coverage and the total-variation distance
between the predicted-class histogram and the label histogram (see `classifier_space`); and, to give
every figure its scale, the same figures for real images the space has not seen.

The spaces themselves live in `fid` (Inception-v3, the pixel projection, the Fréchet distance) and
`classifier_space` (the training set's classifier); this module is the one that knows them all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from memshard.data import ImageDataset
from memshard.errors import MemshardError
from memshard.evaluation.classifier_space import (
    NAME_PREFIX,
    ClassifierSpace,
    classifier_unavailable,
    space_name,
)
from memshard.evaluation.fid import (
    CLASSIFIER,
    FEATURE_SPACES,
    INCEPTION,
    PIXEL_PROJECTION,
    FeatureSpace,
    InceptionV3,
    PixelProjection,
    frechet_distance,
    gaussian_stats,
    inception_weights_path,
)
from memshard.evaluation.intervals import frechet_interval
from memshard.model import resolve_device

# ---------------------------------------------------------------- choosing the space by name


def feature_space(name: str, device: str | torch.device | None = None,
                  inception_weights: str | Path | None = None, dataset: ImageDataset | None = None,
                  classifier_cache: str | Path | None = None) -> FeatureSpace:
    """The feature extractor called `name` (one of FEATURE_SPACES), ready to use.

    `classifier` (or a full `trainset-classifier-...` name, which must be `dataset`'s) needs the
    labelled training `dataset`; its classifier is cached under `classifier_cache`."""
    if name == PIXEL_PROJECTION:
        return PixelProjection()
    if name == INCEPTION:
        return InceptionV3(resolve_device(device), inception_weights)
    if name == CLASSIFIER or name.startswith(NAME_PREFIX):
        if dataset is None:
            raise MemshardError(f"feature space {name} is the training set's own classifier: it needs the training data")
        if name != CLASSIFIER and name != space_name(dataset.fingerprint):
            raise MemshardError(f"feature space {name} is the classifier of another dataset; this dataset's is "
                                f"{space_name(dataset.fingerprint)} (or pass {CLASSIFIER})")
        return ClassifierSpace(dataset, cache_dir=classifier_cache, device=resolve_device(device))
    raise MemshardError(f"unknown feature space {name!r}: choose one of {', '.join(FEATURE_SPACES)}")


# ---------------------------------------------------------------- the quality report


@dataclass(frozen=True)
class QualityFigures:
    """One image set's quality in one space. Confidence and coverage need a classifier space (else None)."""

    images: int
    frechet: float  # against the training images (the real reference: against the rest of them)
    mean_confidence: float | None = None  # mean of the largest softmax probability
    classes_predicted: int | None = None  # training-label classes predicted at least once
    coverage: float | None = None  # classes_predicted / classes in the training labels
    tv_distance: float | None = None  # ½ Σ |predicted-class share − training-label share|


@dataclass(frozen=True)
class QualityReport:
    """Quality of generations and the same figures for real images the feature space has not seen."""

    space: str
    generated: QualityFigures
    real: QualityFigures
    real_reference: str  # what `real` was measured on, in words
    classes: int | None = None  # classes in the training labels
    classifier_held_out_accuracy: float | None = None
    frechet_interval: tuple[float, float] | None = None  # the generations' Fréchet, bootstrapped (intervals.py)

    @property
    def frechet_ratio(self) -> float:
        """Generated Fréchet / real-reference Fréchet: ≈ 1 is as good as real images here."""
        return self.generated.frechet / self.real.frechet if self.real.frechet > 0 else float("inf")

    def metrics(self, prefix: str = "quality") -> dict[str, float]:
        """Flat numeric figures for MLflow: `quality.frechet`, `quality.real.frechet`, ... (None left out)."""
        out: dict[str, float] = {}
        for label, figures in (("", self.generated), ("real.", self.real)):
            out.update({f"{prefix}.{label}{key}": float(value) for key, value in asdict(figures).items()
                        if value is not None})
        if self.classifier_held_out_accuracy is not None:
            out[f"{prefix}.classifier_held_out_accuracy"] = self.classifier_held_out_accuracy
        return out

    def as_dict(self) -> dict:
        return {**asdict(self), "frechet_ratio": self.frechet_ratio}


def quality_report(generated: np.ndarray, dataset: ImageDataset, space: FeatureSpace,
                   seed: int = 0, rows: np.ndarray | None = None, frechet_resamples: int = 0) -> QualityReport:
    """Quality of (M, C, H, W) uint8 `generated` images against `dataset` in `space`, with its real reference.

    In a ClassifierSpace the real reference is the held-out images (which the classifier never saw)
    against the rest of the training set. In another space (Inception, pixels) it is min(M, N/2)
    training images drawn with `seed` against the rest.

    `rows` (None: all) restricts every reference to those training rows: the Fréchet reference, the
    label histogram, the classes counted by coverage and the real reference's images. An unlearning
    audit passes the kept rows X \\ A, the distribution the model should still produce.

    `frechet_resamples` > 0: also the generations' Fréchet interval, bootstrapped over the generations
    against the fixed reference statistics with `seed` (`intervals.frechet_interval`).
    """
    restricted = rows is not None
    rows = np.arange(len(dataset)) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    classifier = isinstance(space, ClassifierSpace)
    if classifier:
        if space.fingerprint != dataset.fingerprint:
            raise MemshardError(f"{space.name} is the classifier of another dataset: build it from this one "
                                f"({space_name(dataset.fingerprint, space.seed)})")
        real_rows = np.intersect1d(space.held_out_rows, rows)
        train_features, train_probabilities = space.features_and_probabilities(dataset.images)
        generated_features, generated_probabilities = space.features_and_probabilities(generated)
    else:
        rng = np.random.Generator(np.random.PCG64(seed))
        real_rows = np.sort(rows[rng.choice(len(rows), min(len(generated), len(rows) // 2), replace=False)])
        train_features, generated_features = space.features(dataset.images), space.features(generated)
        train_probabilities = generated_probabilities = None
    rest = np.setdiff1d(rows, real_rows)
    labels = dataset.labels[rows]
    reference_stats = gaussian_stats(train_features[rows])
    generated_figures = _figures(generated_features, reference_stats, generated_probabilities, labels)
    interval = frechet_interval(generated_features, reference_stats, seed, frechet_resamples) if frechet_resamples else None
    real_figures = _figures(train_features[real_rows], gaussian_stats(train_features[rest]),
                            None if train_probabilities is None else train_probabilities[real_rows], labels)
    which = f"the {len(real_rows)} held-out labelled images" if classifier else f"{len(real_rows)} training images (seed {seed})"
    others = "reference images" if restricted else "training images"
    return QualityReport(space=space.name, generated=generated_figures, real=real_figures,
                         real_reference=f"{which} vs the other {len(rest)} {others}",
                         classes=len(np.unique(labels[labels >= 0])) if classifier else None,
                         classifier_held_out_accuracy=space.held_out_accuracy if classifier else None,
                         frechet_interval=interval)


def _figures(features: np.ndarray, reference_stats: tuple[np.ndarray, np.ndarray],
             probabilities: np.ndarray | None, labels: np.ndarray) -> QualityFigures:
    """Fréchet to the reference; with probabilities, confidence and coverage of the classes in `labels`."""
    frechet = frechet_distance(*gaussian_stats(features), *reference_stats)
    if probabilities is None:
        return QualityFigures(images=len(features), frechet=frechet)
    labels = labels[labels >= 0]
    classes = np.unique(labels)
    predicted = np.bincount(probabilities.argmax(1), minlength=probabilities.shape[1])
    label_counts = np.bincount(labels, minlength=probabilities.shape[1])
    covered = int((predicted[classes] > 0).sum())
    tv = 0.5 * float(np.abs(predicted / predicted.sum() - label_counts / label_counts.sum()).sum())
    return QualityFigures(images=len(features), frechet=frechet,
                          mean_confidence=float(probabilities.max(1).mean()), classes_predicted=covered,
                          coverage=covered / len(classes), tv_distance=tv)


# ---------------------------------------------------------------- choosing the space


class QualitySpaceChoice(NamedTuple):
    space: FeatureSpace | None
    reason: str  # one line: why this space, or why none


def default_quality_space(dataset: ImageDataset, device: str | torch.device | None = None,
                          inception_weights: str | Path | None = None,
                          cache_dir: str | Path | None = None) -> QualitySpaceChoice:
    """Inception-v3 where torch-fidelity imports and its weights are on disk; else the training set's
    classifier when the dataset has labels; else no space. Never raises for a missing optional dependency."""
    inception_missing = _inception_missing(inception_weights)
    if inception_missing is None:
        try:
            return QualitySpaceChoice(InceptionV3(resolve_device(device), inception_weights),
                                      f"{INCEPTION}: torch-fidelity and its weights are installed")
        except MemshardError as error:
            inception_missing = str(error)
    classifier_missing = classifier_unavailable(dataset)
    if classifier_missing is None:
        space = ClassifierSpace(dataset, cache_dir=cache_dir)
        return QualitySpaceChoice(space, f"{space.name}: {inception_missing}, and the dataset has labels")
    return QualitySpaceChoice(None, f"no quality measure: {inception_missing}, and {classifier_missing}")


def _inception_missing(weights: str | Path | None) -> str | None:
    """Why Inception can't be used offline (one line), or None when it can."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ImportError:
        return f"{INCEPTION} needs torch-fidelity, which is not installed"
    except Exception as error:  # e.g. a torchvision built for another torch
        return f"torch-fidelity does not import ({type(error).__name__})"
    path = Path(weights) if weights else inception_weights_path(URL_INCEPTION_V3)
    if not path.is_file():
        return f"the {INCEPTION} weights are not at {path}"
    return None
