"""Fréchet distance between generated and training images in a named feature space.

FID (Heusel et al., "GANs trained by a two time-scale update rule converge to a local Nash
equilibrium", 2017) is the Fréchet distance between two Gaussians fitted to image features:
    ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½).
tr (Σ₁ Σ₂)^½ is computed as Σ √λ of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ (same eigenvalues as
Σ₁ Σ₂), in float64 with eigh: no complex round-off to discard, unlike a general matrix square root.

Feature spaces, chosen by name (`evaluation.quality.feature_space`); the name stands beside every FID number, because FIDs from
different spaces are not comparable:
- `inception-v3`: the 2048-d pool features of the TensorFlow FID Inception network, through
  torch-fidelity (`pip install 'memshard[fid]'`); weights cached on first use. Comparable to
  published FIDs (given the same sample counts).
- `pixels-random-projection-64`: offline, for tests and machines without the Inception weights.
  Images resized to 32×32 (bilinear, antialiased when shrinking), gray repeated to RGB, scaled to
  [0, 1], flattened to 3,072 values and multiplied by a fixed 3,072×64 Gaussian matrix (numpy
  PCG64 seed 0, entries N(0, 1/3072)). It sees pixel statistics only; it is NOT comparable to any
  Inception FID.
- `classifier`: the training set's own small CNN classifier (labelled data only), trained on the CPU
  in seconds and cached; its full name, `trainset-classifier-cnn1-<fingerprint prefix>`, names the
  dataset. Offline; comparable only within that name. See `memshard.evaluation.classifier_space`.
"""

from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from memshard.errors import MemshardError

INCEPTION = "inception-v3"
PIXEL_PROJECTION = "pixels-random-projection-64"
CLASSIFIER = "classifier"  # the training set's own classifier; its spaces are named trainset-classifier-...
FEATURE_SPACES = (INCEPTION, PIXEL_PROJECTION, CLASSIFIER)
OFFLINE_HINT = f"or pass --feature-space {PIXEL_PROJECTION} (offline; not comparable to published FIDs)"
DOWNLOAD_TIMEOUT_S = 60


class FeatureSpace(Protocol):
    name: str
    dims: int

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, C, H, W) uint8 images, C in (1, 3) -> (N, dims) float64 features."""


def _batches(images: np.ndarray, size: int):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.dtype != np.uint8:
        raise MemshardError(f"features need (N, C, H, W) uint8 images with C in (1, 3), got {images.dtype} {images.shape}")
    for start in range(0, len(images), size):
        yield torch.from_numpy(np.array(images[start:start + size]))  # a writable copy of one batch


def _rgb(batch: torch.Tensor) -> torch.Tensor:
    return batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch


class PixelProjection:
    """The offline feature space `pixels-random-projection-64` (see the module notes)."""

    name = PIXEL_PROJECTION
    dims = 64
    side = 32

    def __init__(self, batch_size: int = 1024):
        inputs = 3 * self.side * self.side
        rng = np.random.Generator(np.random.PCG64(0))
        self.projection = torch.from_numpy(rng.standard_normal((inputs, self.dims)) / np.sqrt(inputs)).float()
        self.batch_size = batch_size

    def features(self, images: np.ndarray) -> np.ndarray:
        out = []
        for batch in _batches(images, self.batch_size):
            x = _rgb(batch).float() / 255.0
            if x.shape[-2:] != (self.side, self.side):
                shrink = x.shape[-1] > self.side or x.shape[-2] > self.side
                x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False, antialias=shrink)
            out.append((x.reshape(len(x), -1) @ self.projection).double().numpy())
        return np.concatenate(out)


class InceptionV3:
    """torch-fidelity's port of the TensorFlow FID Inception-v3, 2048-d pool3 features."""

    name = INCEPTION
    dims = 2048

    def __init__(self, device: torch.device, weights: str | Path | None = None, batch_size: int = 128):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
        except ImportError:
            raise MemshardError(
                f"FID in {INCEPTION} features needs torch-fidelity, which is not installed: "
                f"pip install 'memshard[fid]' (with a torchvision that matches your torch), {OFFLINE_HINT}"
            ) from None
        except Exception as error:  # e.g. a torchvision built for another torch fails at import
            reason = (str(error).splitlines() or [type(error).__name__])[0][:160]
            raise MemshardError(
                f"torch-fidelity is installed but does not import ({reason}): install the torchvision "
                f"build that matches torch {torch.__version__}, {OFFLINE_HINT}"
            ) from None
        path = Path(weights) if weights else inception_weights_path(URL_INCEPTION_V3)
        if weights and not path.is_file():
            raise MemshardError(f"Inception weights file {path} does not exist: check --inception-weights")
        if not path.is_file():
            _download(URL_INCEPTION_V3, path)
        self.device, self.batch_size = device, batch_size
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)).to(device)

    def features(self, images: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for batch in _batches(images, self.batch_size):
                (pool,) = self.model(_rgb(batch).contiguous().to(self.device))  # uint8 in, resized to 299 inside
                out.append(pool.double().cpu().numpy())
        return np.concatenate(out)


def inception_weights_path(url: str) -> Path:
    """Where torch.hub caches the file (what torch-fidelity itself would load): $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


@contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download(url: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as error:  # offline, DNS, proxy, HTTP errors: all mean "no weights here"
        reason = (str(error).splitlines() or [type(error).__name__])[0][:120]
        raise MemshardError(
            f"the {INCEPTION} weights are not cached at {path} and could not be downloaded ({reason}): "
            f"run once on a machine with internet, or copy {path.name} there or pass --inception-weights FILE, "
            f"{OFFLINE_HINT}"
        ) from None


GAUSSIAN_FIT_MIN_ROWS = 2  # a covariance needs two points


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, dims) features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < GAUSSIAN_FIT_MIN_ROWS:
        raise MemshardError(f"a Gaussian fit needs at least {GAUSSIAN_FIT_MIN_ROWS} feature rows, got shape {features.shape}: use more images")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁ Σ₂)^½, for covariance (symmetric PSD) matrices."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise MemshardError(f"Gaussians of different sizes: means {mu1.shape}/{mu2.shape}, "
                            f"covariances {sigma1.shape}/{sigma2.shape}")
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt))


def fid(generated: np.ndarray, reference: np.ndarray, space: FeatureSpace) -> float:
    """FID of (N, C, H, W) uint8 `generated` against `reference` images in `space`."""
    return frechet_distance(*gaussian_stats(space.features(generated)), *gaussian_stats(space.features(reference)))
