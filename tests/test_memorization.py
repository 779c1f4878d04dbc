"""Memorization metrics and FID on constructed cases whose answers are known by construction, and the
chunked nearest-neighbour scan against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from memshard.errors import MemshardError
from memshard.evaluation.fid import FEATURE_SPACES, PIXEL_PROJECTION, fid, frechet_distance, gaussian_stats
from memshard.evaluation.memorization import THRESHOLDS, memorization_report, nn_ratio, relative_distance
from memshard.evaluation.quality import feature_space
from memshard.neighbors import FLOAT_BYTES, nearest_neighbors, plan_chunks

D = 3 * 16 * 16  # RGB 16x16 images, flattened


def brute_force(queries: np.ndarray, references: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every distance in float64, fully sorted: the reference answer."""
    d = ((queries[:, None, :].astype(np.float64) - references[None, :, :].astype(np.float64)) ** 2).sum(axis=2)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


@pytest.mark.parametrize("query_rows, reference_rows, k", [(None, None, 50), (7, 13, 50), (1, 50, 50), (64, 3, 5),
                                                           (300, 1000, 1)])
def test_chunked_scan_equals_brute_force(query_rows, reference_rows, k):
    rng = np.random.default_rng(1)
    queries, references = rng.random((300, 48), dtype=np.float32), rng.random((1000, 48), dtype=np.float32)
    found = nearest_neighbors(queries, references, k, query_rows=query_rows, reference_rows=reference_rows, device="cpu")
    sq, rows = brute_force(queries, references, k)
    np.testing.assert_array_equal(found.indices, rows)
    np.testing.assert_allclose(found.sq_distances, sq, rtol=1e-5)


def test_uint8_images_are_scanned_in_unit_pixel_space_with_a_small_block():
    rng = np.random.default_rng(2)
    train = rng.integers(0, 256, (400, 3, 16, 16), dtype=np.uint8)
    gen = rng.integers(0, 256, (120, 3, 16, 16), dtype=np.uint8)
    found = nearest_neighbors(gen, train, 50, scale=1 / 255, block_bytes=64 * 1024, device="cpu")  # many chunks
    queries, references = gen.reshape(120, -1) / 255, train.reshape(400, -1) / 255
    sq, _ = brute_force(queries, references, 50)
    # Random uint8 images have near-ties (float32 vs float64 may order them differently): check that
    # the distances are the true k smallest and that each returned row is at its returned distance.
    np.testing.assert_allclose(found.sq_distances, sq, rtol=1e-5)
    exact = ((queries[:, None, :] - references[found.indices]) ** 2).sum(-1)
    np.testing.assert_allclose(found.sq_distances, exact, rtol=1e-5)


def test_the_published_cifar_scan_is_planned_within_a_few_gigabytes():
    m, n, k, block = 65_536, 50_000, 50, 1 << 30
    q_rows, r_rows, refine_rows = plan_chunks(m, n, 3_072, k, block)
    assert q_rows * r_rows * FLOAT_BYTES <= block  # one distance block
    assert refine_rows * k * 3_072 * FLOAT_BYTES <= block  # one gathered block of candidates
    resident = (n * 3_072 + q_rows * 3_072) * FLOAT_BYTES  # training set + one query chunk, float32
    assert resident + 4 * block < 8 << 30  # blocks, top-k and gather temporaries: far below one GPU


def random_images(rng, count: int) -> np.ndarray:
    return rng.random((count, D))  # pixels in [0, 1]


def test_exact_copies_have_r_zero_and_are_counted_on_the_copied_samples():
    rng = np.random.default_rng(3)
    train = random_images(rng, 200)
    copied = np.array([5, 5, 5, 17, 42])  # sample 5 copied three times
    found = nearest_neighbors(train[copied], train, 50, device="cpu")
    report = memorization_report(found.sq_distances, found.indices, len(train))
    assert np.all(report.r == 0) and np.all(report.ratio == 0)
    np.testing.assert_array_equal(report.nearest, copied)
    assert report.mq_counts() == {t: 5 for t in THRESHOLDS} and report.nn_ratio_copies() == 5
    assert report.r_copies[5] == 3 and report.r_copies[17] == 1 and report.r_copies[42] == 1 and report.r_copies.sum() == 5
    assert report.most_r_copied(2) == [5, 17]  # most r-copies first; ties by smallest r, then row
    assert report.metrics()["r_copied_training_samples"] == 3


def test_noisy_copies_count_as_copies_and_unrelated_images_do_not():
    rng = np.random.default_rng(4)
    train = random_images(rng, 500)
    noisy = np.clip(train[:40] + rng.normal(0, 0.02, (40, D)), 0, 1)  # d1² ≈ 0.8, others ≈ D/6 = 128
    unrelated = random_images(rng, 60)  # every distance ≈ 128 ± 5: r ≈ 0.96
    found = nearest_neighbors(np.concatenate([noisy, unrelated]), train, 50, device="cpu")
    report = memorization_report(found.sq_distances, found.indices, len(train))

    assert np.all(report.r[:40] < 0.15) and np.all(report.r[40:] > 0.5)
    assert np.all(report.ratio[:40] < 1 / 3) and np.all(report.ratio[40:] > 0.8)
    np.testing.assert_array_equal(report.nearest[:40], np.arange(40))
    metrics = report.metrics()
    for t in THRESHOLDS:
        assert metrics[f"mq_{t}_count"] == 40 and metrics[f"mq_{t}_fraction"] == pytest.approx(0.4)
    assert metrics["nn_ratio_copy_count"] == 40 and metrics["nn_ratio_copy_fraction"] == pytest.approx(0.4)
    np.testing.assert_array_equal(report.r_copies, np.r_[np.ones(40, int), np.zeros(460, int)])
    assert np.all(report.min_r[:40] == report.r[:40])
    counts, _ = report.histogram()
    assert counts.sum() == 100 and counts[0] == 40  # the copies all sit in the first bin, [0, 0.02)


def test_thresholds_are_strict_and_the_r_copy_threshold_is_a_setting():
    # d² = (a, 1, 1, 1): r = a / mean = 4a / (a + 3); nn ratio = sqrt(a)
    a = np.array([0.0, 0.1, 3 * 0.2 / 3.8, 3 * 0.3 / 3.7, 0.5, 1.0])  # r = 0, 0.129, 0.2, 0.3, 0.571, 1
    sq = np.stack([a, np.ones(6), np.ones(6), np.ones(6)], axis=1)
    np.testing.assert_allclose(relative_distance(sq), 4 * a / (a + 3))
    np.testing.assert_allclose(nn_ratio(sq), np.sqrt(a))
    report = memorization_report(sq, np.tile(np.arange(4), (6, 1)), num_samples=4, r_copy_threshold=0.3)
    assert report.mq_counts()[0.2] == 2  # r = 0.2 exactly is not below 0.2
    assert report.r_copies[0] == 3  # r = 0, 0.129 and 0.2 are below 0.3; r = 0.3 is not
    assert report.nn_ratio_copies() == 2  # sqrt(0) and sqrt(0.1) = 0.316 are below 1/3; sqrt(0.158) is not


def test_a_generation_equal_to_all_its_neighbours_counts_as_a_copy():
    report = memorization_report(np.zeros((3, 50)), np.zeros((3, 50), dtype=int), num_samples=1)
    assert np.all(report.r == 0) and report.nn_ratio_copies() == 3 and report.r_copies[0] == 3


@pytest.mark.parametrize("call, message", [
    (lambda: nearest_neighbors(np.zeros((4, 10)), np.zeros((5, 12)), 2), "evaluate against the dataset"),
    (lambda: nearest_neighbors(np.zeros((4, 10)), np.zeros((5, 10)), 6), "1 <= k <= 5"),
    (lambda: nearest_neighbors(np.zeros((0, 10)), np.zeros((5, 10)), 2), "non-empty"),
    (lambda: memorization_report(np.zeros((3, 1)), np.zeros((3, 1)), 1), "scan with more neighbours"),
    (lambda: memorization_report(np.ones((3, 4)), np.zeros((3, 4)), 1, r_copy_threshold=0), "must be in (0, 1]"),
    (lambda: feature_space("vgg"), "unknown feature space"),
    (lambda: gaussian_stats(np.zeros((1, 4))), "at least 2 feature rows"),
])
def test_bad_input_is_a_memshard_error_naming_the_fix(call, message):
    with pytest.raises(MemshardError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        call()


def test_frechet_distance_matches_closed_forms_and_the_scipy_formula():
    rng = np.random.default_rng(5)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.random(6) + 0.1, rng.random(6) + 0.1
    # diagonal covariances: Σ (μ1 − μ2)² + Σ (√s1 − √s2)²
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-10)
    a, b = rng.normal(size=(6, 20)), rng.normal(size=(6, 20))
    c1, c2 = a @ a.T / 20, b @ b.T / 20  # full, non-commuting covariances
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(frechet_distance(mu2, c2, mu1, c1), rel=1e-8)


def test_offline_feature_space_is_named_fixed_and_sees_the_difference_between_digits_and_noise():
    from sklearn.datasets import load_digits

    digits = (load_digits().images * (255 / 16)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    space = feature_space(PIXEL_PROJECTION)
    assert space.name == "pixels-random-projection-64" and space.name in FEATURE_SPACES
    np.testing.assert_array_equal(space.features(digits[:5]), feature_space(PIXEL_PROJECTION).features(digits[:5]))
    assert space.features(np.zeros((3, 3, 40, 40), np.uint8)).shape == (3, 64)  # RGB, any size
    noise = np.random.default_rng(6).integers(0, 256, (900, 1, 8, 8), dtype=np.uint8)
    assert fid(digits, digits, space) == pytest.approx(0, abs=1e-8)
    halves = fid(digits[::2], digits[1::2], space)
    assert halves < 0.1 * fid(noise, digits, space)


def test_inception_without_torch_fidelity_says_how_to_get_it():
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        pass  # not installed
    except Exception:
        pass  # installed but broken (a torchvision built for another torch)
    else:
        pytest.skip("torch-fidelity imports here: the Inception path needs its weights, see BENCHMARKS.md")
    with pytest.raises(MemshardError) as error:
        feature_space("inception-v3", device="cpu")
    message = str(error.value)
    assert "\n" not in message and "pixels-random-projection-64" in message
    assert "memshard[fid]" in message or "torchvision" in message


def test_the_real_reference_scans_held_out_real_images_like_generations(tmp_path):
    """Copy rates mean something only beside real images no model saw: on the bundled digits most
    held-out digits already have r < 0.5 (ordinary near neighbours), on independent noise none do,
    and a set of near-twins puts every held-out image whose twin stayed in below the strictest threshold."""
    from memshard.data import load_dataset, resolve_dataset
    from memshard.evaluation.evaluate import EvaluateSettings, real_copy_reference

    settings = EvaluateSettings(seed=0)

    def reference(source):
        dataset = load_dataset(resolve_dataset(str(source), 16, None, str(tmp_path / "cache")))
        return real_copy_reference(dataset, settings)

    digits = reference("digits").metrics()
    assert digits["mq_0.5_fraction"] > 0.5 and digits["mq_0.15_fraction"] < 0.2, digits
    assert reference("digits").num_generations == round(0.2 * 1797)  # no exact duplicates among the digits

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (300, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", images=noise)
    assert reference(tmp_path / "noise.npz").metrics()["mq_0.5_fraction"] == 0.0

    twins = np.concatenate([noise, np.clip(noise.astype(int) + rng.integers(-2, 3, noise.shape), 0, 255).astype(np.uint8)])
    np.savez(tmp_path / "twins.npz", images=twins)
    report = reference(tmp_path / "twins.npz")
    assert report.metrics()["mq_0.15_fraction"] > 0.6, report.metrics()  # ~80% of held-out twins kept their pair in


def test_near_copies_are_calibrated_on_real_images(tmp_path):
    """The leave-one-out threshold puts about 5% of real images below it by construction; fresh real
    images scored as generations land near 5%, exact copies of training images at 100%, noise at 0%."""
    from memshard.data import load_dataset, resolve_dataset
    from memshard.evaluation.evaluate import scan_for_copies
    from memshard.evaluation.memorization import near_copies
    from memshard.guard import distinct_rows, near_copy_threshold, real_nearest_sq_distances

    full = load_dataset(resolve_dataset("digits", 16, None, str(tmp_path / "cache")))
    half = np.arange(0, len(full), 2)  # train on the even rows, the odd rows are fresh real digits
    np.savez(tmp_path / "train.npz", images=full.images[half, 0])
    train = load_dataset(resolve_dataset(str(tmp_path / "train.npz"), 16, None, str(tmp_path / "cache")))
    loo = real_nearest_sq_distances(train, seed=0)
    assert len(loo) == len(train) and (loo > 0).all()  # no image is its own neighbour
    threshold = near_copy_threshold(train, seed=0)
    assert np.mean(loo < threshold) == pytest.approx(0.05, abs=0.002)

    def near(images):
        return near_copies(scan_for_copies(images, train, distinct_rows(train), 0.5, "cpu"), threshold)

    fresh = near(full.images[np.arange(1, len(full), 2)])
    assert 0.01 <= fresh["near_copy_fraction"] <= 0.12, fresh  # ~5%: real unseen digits are not copies
    copies = near(train.images[:100])
    assert copies["near_copy_fraction"] == 1.0 and copies["near_copied_training_samples"] == 100
    noise = np.random.default_rng(0).integers(0, 256, (50, *train.images.shape[1:]), dtype=np.uint8)
    assert near(noise)["near_copy_count"] == 0
