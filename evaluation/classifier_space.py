"""The feature space of the training set's own classifier.

The standard quality measure on MNIST-like data is FID in the features of a classifier trained on
that data. `ClassifierSpace` trains a small CNN on the labelled training images (on the CPU,
deterministic given the seed, seconds for the 1,797 digits), caches it on disk by dataset
fingerprint, label hash, seed and architecture version, and offers its 128-d penultimate features
(the FeatureSpace protocol of `memshard.evaluation.fid`) and its class probabilities.

Its name, `trainset-classifier-cnn1-<first 12 hex of the dataset fingerprint>`, says what it is: the
classifier of that one training set. Figures in it compare only with figures in the same space; they
are NOT comparable to Inception FIDs or across datasets.

The classifier is trained on 80% of the labelled images (stratified by class, seeded) and the other
20% are held out. `evaluation.quality.quality_report` gives, in this space:
- Fréchet distance of the generations to the whole training set (penultimate features),
- mean confidence: the mean over generations of the classifier's largest softmax probability,
- class coverage: the classes predicted at least once / the classes in the training labels, and the
  total-variation distance ½·Σ_c |p_generated(c) − p_training labels(c)| between the predicted-class
  histogram and the label histogram,
and, to give every figure its scale, the same figures for real images the classifier has not seen:
the held-out images, whose Fréchet is taken against the rest of the training set (disjoint, like
generations). Generations scoring near that real reference are as good as real images by this measure.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memshard.data import ImageDataset
from memshard.errors import MemshardError
from memshard.evaluation.fid import _batches
from memshard.files import in_workspace
from memshard.model import resolve_device

ARCHITECTURE = "cnn1"  # bump when the network, its training recipe or the split change
NAME_PREFIX = "trainset-classifier-"
DEFAULT_CACHE_DIR = ".memshard/classifiers"  # relative: under the workspace root
FEATURE_DIMS = 128
HELD_OUT_FRACTION = 0.2
TRAIN_STEPS = 500
TRAIN_BATCH = 64
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4


def space_name(fingerprint: str, seed: int = 0) -> str:
    """`trainset-classifier-cnn1-<fingerprint[:12]>` (with `-seedN` for a seed other than 0)."""
    return f"{NAME_PREFIX}{ARCHITECTURE}-{fingerprint[:12]}" + (f"-seed{seed}" if seed else "")


def _network(channels: int, classes: int) -> nn.Sequential:
    """Two conv blocks, pooled to 4×4 whatever the resolution, a 128-d hidden layer, the class layer."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(64 * 16, FEATURE_DIMS), nn.ReLU(),  # the penultimate features
        nn.Linear(FEATURE_DIMS, classes),
    )


def classifier_unavailable(dataset: ImageDataset) -> str | None:
    """Why no classifier can be trained on `dataset` (one line), or None when one can."""
    labels = dataset.labels[dataset.labels >= 0]
    if len(labels) == 0:
        return "the dataset has no labels"
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        return f"the dataset's labels name only one class ({int(classes[0])})"
    if counts.min() < 2:
        return (f"class {int(classes[counts.argmin()])} has a single labelled image: each class needs 2 "
                "(one to train on, one held out)")
    return None


def held_out_split(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of the labelled images: per class, a seeded HELD_OUT_FRACTION
    (at least one image) is held out. Unlabelled rows are in neither."""
    rng = np.random.Generator(np.random.PCG64(seed))
    train, held = [], []
    for label in np.unique(labels[labels >= 0]):
        rows = rng.permutation(np.flatnonzero(labels == label))
        cut = max(1, int(round(HELD_OUT_FRACTION * len(rows))))
        held.append(rows[:cut])
        train.append(rows[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def classifier_cache_file(dataset: ImageDataset, cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Where the classifier of `dataset` is cached: keyed by its fingerprint (ids + images), a hash of
    its labels (not in the fingerprint), the seed, and the architecture and training recipe."""
    labels = hashlib.sha256(np.ascontiguousarray(dataset.labels, dtype=np.int64).tobytes()).hexdigest()
    key = [ARCHITECTURE, dataset.fingerprint, labels, seed, list(dataset.images.shape),
           TRAIN_STEPS, TRAIN_BATCH, LEARNING_RATE, WEIGHT_DECAY, HELD_OUT_FRACTION]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return in_workspace(cache_dir or DEFAULT_CACHE_DIR) / f"{dataset.fingerprint[:12]}-{ARCHITECTURE}-{digest}.pt"


class ClassifierSpace:
    """The training set's own CNN classifier: penultimate features and class probabilities.

    Construction loads the classifier cached for this dataset (fingerprint + labels), seed and
    architecture from `cache_dir`, or trains it (CPU) and caches it; `loaded_from_cache` says which.
    """

    dims = FEATURE_DIMS

    def __init__(self, dataset: ImageDataset, cache_dir: str | Path | None = None, seed: int = 0,
                 device: str | torch.device | None = "cpu", batch_size: int = 1024):
        reason = classifier_unavailable(dataset)
        if reason:
            raise MemshardError(f"no training-set classifier for {dataset.path}: {reason}")
        self.name = space_name(dataset.fingerprint, seed)
        self.fingerprint, self.seed, self.batch_size = dataset.fingerprint, seed, batch_size
        self.channels, self.resolution = dataset.channels, dataset.resolution
        self.classes = int(dataset.labels.max()) + 1
        self.train_rows, self.held_out_rows = held_out_split(dataset.labels, seed)
        self.device = resolve_device(device)
        self.cache_file = classifier_cache_file(dataset, cache_dir, seed)
        with torch.random.fork_rng(devices=[]):  # the caller's random stream is not touched
            self.net = _network(self.channels, self.classes)
        cached = self._load()
        self.loaded_from_cache = cached is not None
        if cached is None:
            cached = self._train(dataset)
            self._save(cached)
        self.net.load_state_dict(cached["state"])
        self.net.to(self.device).eval()
        self.train_seconds = float(cached["meta"]["train_seconds"])
        self.held_out_accuracy = float(cached["meta"]["held_out_accuracy"])

    def _load(self) -> dict | None:
        if not self.cache_file.is_file():
            return None
        try:
            cached = torch.load(self.cache_file, map_location="cpu", weights_only=True)
            self.net.load_state_dict(cached["state"])  # proves the shapes fit
            float(cached["meta"]["train_seconds"]), float(cached["meta"]["held_out_accuracy"])
            return cached
        except Exception:  # a truncated or foreign file: train again and replace it
            return None

    def _save(self, cached: dict) -> None:
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.cache_file.name}.", dir=self.cache_file.parent)
        os.close(fd)
        try:
            torch.save(cached, tmp)
            os.replace(tmp, self.cache_file)  # atomic: a concurrent reader sees the old file or the new one
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _train(self, dataset: ImageDataset) -> dict:
        """TRAIN_STEPS of AdamW on the train rows, on one CPU thread, every random draw from `seed`.

        One thread: the same weights whatever the core count, and no collapse when other processes
        share the cores (multi-threaded training slowed ~15× on a busy 2-core machine)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._train_single_threaded(dataset)
        finally:
            torch.set_num_threads(threads)

    def _train_single_threaded(self, dataset: ImageDataset) -> dict:
        start = time.perf_counter()
        x = self._inputs(dataset.images[self.train_rows])
        y = torch.from_numpy(dataset.labels[self.train_rows].astype(np.int64))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = _network(self.channels, self.classes)
        order = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, TRAIN_STEPS)
        net.train()
        batches = torch.empty(0, dtype=torch.long)
        for _ in range(TRAIN_STEPS):
            if len(batches) < TRAIN_BATCH:  # epochs of seeded permutations, batches cut across them
                batches = torch.cat([batches, torch.randperm(len(x), generator=order)])
            rows, batches = batches[:TRAIN_BATCH], batches[TRAIN_BATCH:]
            loss = F.cross_entropy(net(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        net.eval()
        with torch.no_grad():
            held = self._inputs(dataset.images[self.held_out_rows])
            predicted = net(held).argmax(1).numpy()
        accuracy = float((predicted == dataset.labels[self.held_out_rows]).mean())
        meta = {"architecture": ARCHITECTURE, "fingerprint": dataset.fingerprint, "seed": self.seed,
                "held_out_accuracy": accuracy, "train_seconds": time.perf_counter() - start,
                "train_images": len(self.train_rows), "held_out_images": len(self.held_out_rows)}
        return {"state": net.state_dict(), "meta": meta}

    def _inputs(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float [-1, 1] at the dataset's resolution (bilinear resize if needed)."""
        x = torch.from_numpy(np.array(images)).float() / 127.5 - 1.0
        if x.shape[1] != self.channels:
            raise MemshardError(f"{self.name} takes {self.channels}-channel images (its training set's), "
                                f"got {x.shape[1]} channels")
        if x.shape[-2:] != (self.resolution, self.resolution):
            shrink = x.shape[-1] > self.resolution or x.shape[-2] > self.resolution
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              align_corners=False, antialias=shrink)
        return x

    def features_and_probabilities(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 128) penultimate features and (N, classes) softmax probabilities, float64, one pass."""
        features, probabilities = [], []
        with torch.no_grad():
            for batch in _batches(images, self.batch_size):
                hidden = self.net[:-1](self._inputs(batch.numpy()).to(self.device))
                features.append(hidden.double().cpu().numpy())
                probabilities.append(torch.softmax(self.net[-1](hidden).double(), 1).cpu().numpy())
        return np.concatenate(features), np.concatenate(probabilities)

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.features_and_probabilities(images)[0]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.features_and_probabilities(images)[1]
