"""The training set's own classifier as a quality measure, on the real sklearn digits at 16×16: real images
score near the real reference, noise and one repeated digit far worse; deterministic and cached."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from memshard.data import load_dataset, prepare_dataset
from memshard.errors import MemshardError
from memshard.evaluation import classifier_space, quality
from memshard.evaluation.classifier_space import ClassifierSpace, classifier_cache_file, classifier_unavailable
from memshard.evaluation.fid import CLASSIFIER, FEATURE_SPACES, PIXEL_PROJECTION
from memshard.evaluation.quality import default_quality_space, feature_space, quality_report


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return load_dataset(prepare_dataset("digits", tmp_path_factory.mktemp("data") / "digits16", resolution=16))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("classifiers")


@pytest.fixture(scope="module")
def space(digits, cache):
    return ClassifierSpace(digits, cache_dir=cache)


def test_the_space_is_named_for_the_training_set_and_its_classifier_means_something(digits, space):
    assert space.name == f"trainset-classifier-cnn1-{digits.fingerprint[:12]}"
    assert CLASSIFIER in FEATURE_SPACES
    assert not space.loaded_from_cache and space.train_seconds > 0
    assert space.held_out_accuracy > 0.9  # on digits it never trained on
    assert len(space.held_out_rows) == 359 and len(space.train_rows) == 1797 - 359
    assert not set(space.held_out_rows) & set(space.train_rows)
    features, probabilities = space.features_and_probabilities(digits.images[:5])
    assert features.shape == (5, space.dims) == (5, 128) and features.dtype == np.float64
    assert probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1.0)
    assert space.features(np.zeros((3, 1, 8, 8), np.uint8)).shape == (3, 128)  # other sizes are resized
    with pytest.raises(MemshardError, match="takes 1-channel images"):
        space.features(np.zeros((2, 3, 16, 16), np.uint8))


def test_real_images_score_near_the_real_reference(digits, space):
    rng = np.random.default_rng(0)
    real = digits.images[rng.choice(len(digits), 500, replace=False)]
    report = quality_report(real, digits, space)
    assert report.space == space.name and report.classes == 10
    assert report.real.images == 359 and "359 held-out" in report.real_reference
    assert report.real.coverage == 1.0 and report.real.mean_confidence > 0.9 and report.real.tv_distance < 0.05
    assert report.generated.images == 500
    assert 0.5 < report.frechet_ratio < 2.0
    assert report.generated.coverage == 1.0 and report.generated.classes_predicted == 10
    assert report.generated.mean_confidence > 0.9 and report.generated.tv_distance < 0.1


def test_noise_and_one_repeated_digit_score_far_worse(digits, space):
    noise = np.random.default_rng(1).integers(0, 256, (500, 1, 16, 16), dtype=np.uint8)
    seven = np.repeat(digits.images[np.flatnonzero(digits.labels == 7)[:1]], 500, axis=0)
    noisy, repeated = quality_report(noise, digits, space), quality_report(seven, digits, space)
    for report in (noisy, repeated):
        assert report.frechet_ratio > 20
    assert noisy.generated.mean_confidence < noisy.real.mean_confidence - 0.1
    # one class predicted: coverage 1/10, and 90% of the label histogram's mass is missing
    assert repeated.generated.classes_predicted == 1 and repeated.generated.coverage == pytest.approx(0.1)
    share_of_sevens = (digits.labels == 7).mean()
    assert repeated.generated.tv_distance == pytest.approx(1 - share_of_sevens)


def test_deterministic_and_cached(digits, space, cache, tmp_path):
    images = digits.images[:64]
    first = space.features(images)
    np.testing.assert_array_equal(first, space.features(images))
    file = space.cache_file
    assert file.parent == cache and file.is_file()
    stamp = file.stat().st_mtime_ns
    again = feature_space(CLASSIFIER, "cpu", dataset=digits, classifier_cache=cache)
    assert again.loaded_from_cache and again.name == space.name and file.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.features(images), first)
    # a broken cache file is replaced by training again, with the same seed to the same weights
    broken = tmp_path / file.name
    broken.write_bytes(b"not a checkpoint")
    retrained = ClassifierSpace(digits, cache_dir=tmp_path)
    assert not retrained.loaded_from_cache and retrained.cache_file == broken
    assert broken.stat().st_size > 1000
    np.testing.assert_array_equal(retrained.features(images), first)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temp file left


def test_the_cache_key_covers_labels_and_seed(digits, cache):
    relabelled = dataclasses.replace(digits, labels=(digits.labels + 1) % 10)
    file = classifier_cache_file(digits, cache)
    assert classifier_cache_file(relabelled, cache) != file
    assert classifier_cache_file(digits, cache, seed=1) != file
    assert classifier_cache_file(digits, cache) == file


def test_the_factory_checks_the_dataset(digits, cache):
    with pytest.raises(MemshardError, match="needs the training data"):
        feature_space(CLASSIFIER)
    with pytest.raises(MemshardError, match="classifier of another dataset"):
        feature_space("trainset-classifier-cnn1-000000000000", dataset=digits, classifier_cache=cache)
    full = feature_space(f"trainset-classifier-cnn1-{digits.fingerprint[:12]}", dataset=digits, classifier_cache=cache)
    assert full.loaded_from_cache


def test_other_spaces_get_a_real_reference_and_no_classifier_figures(digits):
    generated = digits.images[:300]
    report = quality_report(generated, digits, feature_space(PIXEL_PROJECTION), seed=2)
    assert report.space == PIXEL_PROJECTION and report.real.images == 300
    assert report.generated.mean_confidence is None and report.generated.coverage is None
    assert set(report.metrics()) == {"quality.images", "quality.frechet", "quality.real.images", "quality.real.frechet"}
    assert report.frechet_interval is None  # bootstrapped only when asked
    bootstrapped = quality_report(generated, digits, feature_space(PIXEL_PROJECTION), seed=2, frechet_resamples=30)
    low, high = bootstrapped.frechet_interval
    assert low < bootstrapped.generated.frechet == report.generated.frechet < high
    assert bootstrapped.metrics() == report.metrics()


def test_report_metrics_are_flat_numbers(digits, space):
    metrics = quality_report(digits.images[:200], digits, space).metrics()
    assert {"quality.frechet", "quality.mean_confidence", "quality.coverage", "quality.tv_distance",
            "quality.real.frechet", "quality.real.coverage", "quality.classifier_held_out_accuracy"} <= set(metrics)
    assert all(isinstance(value, float) and np.isfinite(value) for value in metrics.values())


def test_default_space_without_inception_is_the_classifier_then_none(digits, cache, monkeypatch):
    monkeypatch.setattr(classifier_space, "DEFAULT_CACHE_DIR", str(cache))
    monkeypatch.setattr(quality, "_inception_missing", lambda weights: "inception-v3 is not here")
    chosen = default_quality_space(digits)
    assert chosen.space.name.startswith("trainset-classifier-") and chosen.space.loaded_from_cache
    assert chosen.reason.startswith(chosen.space.name) and "inception-v3 is not here" in chosen.reason
    for labels, why in ((np.full(len(digits), -1), "the dataset has no labels"),
                        (np.zeros(len(digits), np.int64), "only one class")):
        unlabelled = dataclasses.replace(digits, labels=labels)
        assert why in classifier_unavailable(unlabelled)
        none = default_quality_space(unlabelled)
        assert none.space is None and why in none.reason and "\n" not in none.reason
        with pytest.raises(MemshardError, match=why):
            ClassifierSpace(unlabelled, cache_dir=cache)


def test_default_space_says_why_inception_is_not_used(digits, tmp_path):
    missing = quality._inception_missing(tmp_path / "no-such-weights.pth")
    try:
        import torch_fidelity  # noqa: F401
    except Exception:
        assert "torch-fidelity" in missing
    else:
        assert "weights are not at" in missing
    assert "\n" not in missing
