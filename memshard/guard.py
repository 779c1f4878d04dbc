"""The copy guard: what counts as a near copy of a training image, and sampling that keeps a model's
generations out of it (issue 28).

**Near copy** (method.md §5; `evaluation.memorization.near_copies` counts them). A generation is a near
copy of its nearest distinct training image when their squared L2 distance (pixels in [0, 1]) is below
the `quantile` quantile of real images' squared distance to their nearest OTHER distinct training image
(leave-one-out, `near_copy_threshold`). At the calibration's NEAR_COPY_QUANTILE a model that draws
fresh images from the data's distribution makes about that fraction of near copies; a guard may take a
larger quantile (stricter: it flags more), never a smaller one.

**The guard** (`Guard`, built by `build_guard`) samples one batch of a SamplingPlan in one of two modes:
- `reject`: each finished generation that is a near copy is drawn again, from the batch's next seed
  of a fixed schedule (`redraw_seed`), up to `max_redraws` rounds; those still near copies then are
  reported unresolved and returned as they are.
- `guidance`, after AMG's dissimilarity guidance (Chen, Liu & Xu, "Towards Memorization-Free Diffusion
  Models", CVPR 2024): at every sampling step the predicted clean image x̂0 of each generation is
  compared with its nearest training image n. Where it lies within the threshold distance √τ, x̂0 is
  moved straight away from n by `scale` times its shortfall (scale 1 puts it on the threshold), and
  ε is recomputed from the moved x̂0, so the sampler steps toward it. AMG differentiates its
  similarity through the network; here ∂x̂0/∂x_t is taken as 1/√ᾱ_t (ε held fixed), which costs one
  nearest-neighbour search per step and no backward pass. Generations never within the threshold
  take the plain sampler's steps, bit for bit: with nothing to steer, a guided batch is the batch
  `pipeline.generate_batch` makes.

Everything a batch does depends on the model, the plan's batch seed and the training images only, so
guarded generations, like plain ones, are the same for any number of workers. Each batch reports
what it did (`GuardLog`): generations steered and at which steps, draws rejected, near copies left.

A guard protects what the model outputs, not its weights: anyone with the weights samples without it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline
from diffusers.utils.torch_utils import randn_tensor

from memshard.config import NEAR_COPY_QUANTILE, GuardConfig, check_guard
from memshard.data import ImageDataset, load_dataset
from memshard.errors import MemshardError
from memshard.files import checked_path, replace_file
from memshard.model import resolve_device
from memshard.neighbors import nearest_neighbors
from memshard.pipeline import SamplingPlan, generate_batch, sampling_precision, to_uint8, use_sampler

NEAR_COPY_SAMPLE = 2000  # real images whose leave-one-out distance sets the near-copy threshold
CALIBRATION_SEED = 0  # which real images calibrate a model's guard where it has more than NEAR_COPY_SAMPLE
GUARD_FILE = "guard.json"  # in a registered model: the guard's settings and its training set's reference
GUARD_IMAGES_FILE = "guard_images.npy"  # in a registered model with guard.carry = images: the distinct images


# -- the near-copy calibration ---------------------------------------------------------------------

def distinct_rows(dataset: ImageDataset) -> np.ndarray:
    """The first row of every distinct image, ascending. Exact duplicates are scanned once: k copies of
    one image would all be "nearest" and make r ≈ 1, so an image planted many times, the clearest case
    of memorization, would never count as an r-copy."""
    _, first = np.unique(dataset.content_hashes, return_index=True)
    return np.sort(first)


def real_nearest_sq_distances(dataset: ImageDataset, seed: int, device: str = "cpu",
                              limit: int = NEAR_COPY_SAMPLE) -> np.ndarray | None:
    """Leave-one-out: for up to `limit` seeded distinct training images, the squared L2 distance (pixels
    in [0, 1]) to the nearest OTHER distinct training image -- how near a real image of this
    distribution comes to a set of this size. None: fewer than 3 distinct images."""
    return leave_one_out_sq_distances(dataset.images[distinct_rows(dataset)], seed, device, limit)


def leave_one_out_sq_distances(distinct_images: np.ndarray, seed: int, device: str = "cpu",
                               limit: int = NEAR_COPY_SAMPLE) -> np.ndarray | None:
    """`real_nearest_sq_distances` over images already distinct (N, C, H, W) uint8."""
    if len(distinct_images) < 3:
        return None
    chosen = np.sort(np.random.default_rng(seed).permutation(len(distinct_images))[:limit])
    neighbors = nearest_neighbors(distinct_images[chosen], distinct_images, 2, scale=1 / 255, device=device)
    itself = neighbors.indices[:, 0] == chosen  # the image is its own nearest (distance 0) ...
    return np.where(itself, neighbors.sq_distances[:, 1], neighbors.sq_distances[:, 0])  # ... unless tied


def near_copy_threshold(dataset: ImageDataset, seed: int, device: str = "cpu",
                        quantile: float = NEAR_COPY_QUANTILE) -> float | None:
    """The `quantile` quantile of `real_nearest_sq_distances` (see the module notes); None: too few images."""
    return quantile_threshold(real_nearest_sq_distances(dataset, seed, device), quantile)


def quantile_threshold(distances: np.ndarray | None, quantile: float) -> float | None:
    if quantile < NEAR_COPY_QUANTILE:
        raise MemshardError(f"near-copy quantile {quantile} is looser than the calibration's {NEAR_COPY_QUANTILE}: "
                            f"give {NEAR_COPY_QUANTILE} or more")
    return None if distances is None else float(np.quantile(distances, quantile))


# -- what a guard did -------------------------------------------------------------------------------

@dataclass
class GuardLog:
    """What the guard did to some generations; batches' logs add up (`merge`)."""

    mode: str
    generations: int = 0
    steered: int = 0  # guidance: generations moved at least once
    steered_at_step: list[int] = field(default_factory=list)  # guidance: generations moved at each step index
    rejected_draws: int = 0  # reject: near-copy draws thrown away (a generation may be redrawn several times)
    redrawn: int = 0  # reject: generations that needed at least one redraw
    extra_images: int = 0  # reject: images sampled beyond the plan's
    unresolved: int = 0  # near copies among the returned generations (reject: after max_redraws)

    def merge(self, other: GuardLog) -> GuardLog:
        steps = max(len(self.steered_at_step), len(other.steered_at_step))
        at_step = [(self.steered_at_step[i] if i < len(self.steered_at_step) else 0)
                   + (other.steered_at_step[i] if i < len(other.steered_at_step) else 0) for i in range(steps)]
        return GuardLog(self.mode, self.generations + other.generations, self.steered + other.steered, at_step,
                        self.rejected_draws + other.rejected_draws, self.redrawn + other.redrawn,
                        self.extra_images + other.extra_images, self.unresolved + other.unresolved)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow, as guard.*."""
        n = max(1, self.generations)
        steps = [i for i, count in enumerate(self.steered_at_step) if count]
        return {"guard.generations": self.generations, "guard.steered": self.steered,
                "guard.steered_fraction": self.steered / n,
                "guard.first_steered_step": steps[0] if steps else -1,
                "guard.last_steered_step": steps[-1] if steps else -1,
                "guard.rejected_draws": self.rejected_draws, "guard.redrawn": self.redrawn,
                "guard.extra_image_fraction": self.extra_images / n,
                "guard.unresolved": self.unresolved, "guard.unresolved_fraction": self.unresolved / n}


# -- the guard ----------------------------------------------------------------------------------------

def redraw_seed(batch_seed: int, attempt: int) -> int:
    """The torch seed of redraw round `attempt` (1, 2, ...) of the batch seeded `batch_seed`."""
    state = np.random.SeedSequence([batch_seed, attempt]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


class Guard:
    """One mode, its settings and threshold, and the distinct training images it keeps generations from.

    Picklable (it travels to generation workers); each process builds its device copy of the images on
    first use."""

    def __init__(self, settings: GuardConfig, threshold: float, images: np.ndarray):
        check_guard(settings)
        if settings.mode == "off":
            raise MemshardError("a guard needs a mode: reject or guidance (off means no guard)")
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
            raise MemshardError(f"the guard's training images must be (N, C, H, W) uint8, got {images.dtype} {images.shape}")
        if not np.isfinite(threshold) or threshold < 0:
            raise MemshardError(f"near-copy threshold {threshold}: must be a squared distance >= 0")
        self.settings, self.threshold, self.images = settings, float(threshold), images
        self._on_device: dict[str, torch.Tensor] = {}

    @property
    def mode(self) -> str:
        return self.settings.mode

    def __getstate__(self) -> dict:
        return {"settings": self.settings, "threshold": self.threshold, "images": self.images}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["settings"], state["threshold"], state["images"])

    def describe(self) -> dict[str, object]:
        """The guard's settings for MLflow params, as guard.*."""
        return {"guard.mode": self.mode, "guard.quantile": self.settings.quantile,
                "guard.sq_distance": self.threshold, "guard.scale": self.settings.scale,
                "guard.max_redraws": self.settings.max_redraws, "guard.training_images": len(self.images)}

    def near_copies(self, images: np.ndarray, device: torch.device | str | None = None) -> np.ndarray:
        """(M,) bool: which uint8 images are near copies of a training image."""
        found = nearest_neighbors(images, self.images, 1, scale=1 / 255, device=device)
        return found.sq_distances[:, 0] < self.threshold

    def batch(self, pipeline: DDPMPipeline, plan: SamplingPlan, count: int, seed: int,
              plain: np.ndarray | None = None) -> tuple[np.ndarray, GuardLog]:
        """One batch of `plan` (see `SamplingPlan.batches`), guarded, as (count, C, H, W) uint8 and what the
        guard did; the caller has given the pipeline the plan's sampler (`use_sampler`). `plain`: the
        same batch unguarded, where the caller has made it already (reject starts from it)."""
        log = GuardLog(self.mode, generations=count)
        if self.mode == "guidance":
            images = self._guided(pipeline, plan, count, seed, log)
            log.unresolved = int(self.near_copies(images, pipeline.device).sum())
        else:
            images = generate_batch(pipeline, plan, count, seed) if plain is None else plain
            images = self._reject(pipeline, plan, images, seed, log)  # counts what it leaves unresolved
        return images, log

    def plan(self, pipeline: DDPMPipeline, plan: SamplingPlan,
             plain: np.ndarray | None = None) -> tuple[np.ndarray, GuardLog]:
        """Every batch of `plan` in this process, guarded, in image order, and what the guard did to all
        of them: `generate_plan`'s images where nothing was steered or rejected. Switches `pipeline` to
        the plan's sampler. `plain`: the plan's unguarded images where the caller has them."""
        use_sampler(pipeline, plan.sampler)
        batches, log, start = [], GuardLog(self.mode), 0
        for count, seed in plan.batches():
            images, batch_log = self.batch(pipeline, plan, count, seed,
                                           plain=None if plain is None else plain[start:start + count])
            batches.append(images)
            log = log.merge(batch_log)
            start += count
        return np.concatenate(batches), log

    def _reject(self, pipeline: DDPMPipeline, plan: SamplingPlan, images: np.ndarray, seed: int,
                log: GuardLog) -> np.ndarray:
        """Draw the near copies again, round after round, each round from the schedule's next seed: the
        j-th image of round a's draw replaces the j-th generation still a near copy."""
        images = images.copy()
        near = np.flatnonzero(self.near_copies(images, pipeline.device))
        log.redrawn = len(near)
        for attempt in range(1, self.settings.max_redraws + 1):
            if len(near) == 0:
                break
            log.rejected_draws += len(near)
            log.extra_images += len(near)
            images[near] = generate_batch(pipeline, plan, len(near), redraw_seed(seed, attempt))
            near = near[self.near_copies(images[near], pipeline.device)]
        log.rejected_draws += len(near)  # still near copies after the last round: counted, returned as they are
        log.unresolved = len(near)  # the last scan's verdict: no second scan of the returned batch
        return images

    def _references(self, device: torch.device) -> torch.Tensor:
        """The training images as (N, D) float32 pixels in [0, 1] on `device`, built once per process."""
        key = str(device)
        if key not in self._on_device:
            flat = torch.from_numpy(self.images.reshape(len(self.images), -1).copy())
            self._on_device[key] = flat.to(device=device, dtype=torch.float32) / 255.0
        return self._on_device[key]

    def _guided(self, pipeline: DDPMPipeline, plan: SamplingPlan, count: int, seed: int, log: GuardLog) -> np.ndarray:
        """DDPMPipeline's sampling loop, step for step, with x̂0 steered where it nears a training image."""
        unet, scheduler, device = pipeline.unet, pipeline.scheduler, pipeline.device
        if scheduler.config.prediction_type != "epsilon":
            raise MemshardError(f"guard guidance steers epsilon-prediction models; this one predicts "
                                f"{scheduler.config.prediction_type}: use --guard reject")
        shape = (count, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        generator = torch.Generator(device=device).manual_seed(seed)
        references = self._references(device)
        alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        steered = torch.zeros(count, dtype=torch.bool, device=device)
        with torch.no_grad(), sampling_precision(device):
            image = randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)
            scheduler.set_timesteps(plan.steps)
            log.steered_at_step = [0] * len(scheduler.timesteps)
            for step, t in enumerate(scheduler.timesteps):
                model_output = unet(image, t).sample
                model_output, moved = self._steer(image, model_output, alphas[t], references)
                log.steered_at_step[step] = int(moved.sum())
                steered |= moved
                image = scheduler.step(model_output, t, image, generator=generator).prev_sample
            image = (image / 2 + 0.5).clamp(0, 1)
        log.steered = int(steered.sum())
        return to_uint8(image.cpu().permute(0, 2, 3, 1).numpy())

    def _steer(self, x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor,
               references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ε with x̂0 moved away from its nearest training image where it lies within the threshold,
        and which generations moved. Rows that do not move keep ε's exact bits."""
        with torch.autocast(x_t.device.type, enabled=False):
            x, e = x_t.float(), eps.float()
            x0 = (x - (1 - alpha_bar).sqrt() * e) / alpha_bar.sqrt()
            pixels = (x0 / 2 + 0.5).clamp(0, 1).reshape(len(x0), -1)  # as the finished image would be
            found = nearest_neighbors(pixels, references, 1, device=x.device)
            sq = torch.from_numpy(found.sq_distances[:, 0]).to(x.device)
            moved = sq < self.threshold
            if not bool(moved.any()):
                return eps, moved
            nearest = references[torch.from_numpy(found.indices[:, 0]).to(x.device)]
            distance = sq.sqrt()
            away = (pixels - nearest) / distance.clamp_min(1e-12)[:, None]
            shortfall = (self.threshold ** 0.5 - distance).clamp_min(0)
            pixels = pixels + (self.settings.scale * shortfall)[:, None] * away
            x0_moved = (pixels * 2 - 1).reshape(x0.shape)
            e_moved = (x - alpha_bar.sqrt() * x0_moved) / (1 - alpha_bar).sqrt()
            moved &= distance > 0  # an exact copy has no direction away from its image: left as it is
            keep = (~moved).reshape(-1, *[1] * (eps.ndim - 1))
            return torch.where(keep, eps, e_moved.to(eps.dtype)), moved


def build_guard(settings: GuardConfig, dataset: ImageDataset, device: str = "cpu",
                seed: int = CALIBRATION_SEED) -> Guard:
    """The guard of `settings` over `dataset`'s distinct images, its threshold calibrated on them."""
    return guard_over(settings, np.ascontiguousarray(dataset.images[distinct_rows(dataset)]), device, seed)


def guard_over(settings: GuardConfig, distinct_images: np.ndarray, device: str = "cpu",
               seed: int = CALIBRATION_SEED) -> Guard:
    """`build_guard` over images already distinct."""
    check_guard(settings)
    threshold = quantile_threshold(leave_one_out_sq_distances(distinct_images, seed, device), settings.quantile)
    if threshold is None:
        raise MemshardError("the guard needs at least 3 distinct training images to calibrate its threshold: "
                            "guard a model trained on more images")
    return Guard(settings, threshold, distinct_images)


# -- the guard a registered model carries -------------------------------------------------------------

def write_guard_reference(settings: GuardConfig, dataset: ImageDataset, out_dir: str | Path) -> Path:
    """Into `out_dir`: guard.json (the settings and the training set's path, fingerprint and count)
    and, with carry = images, the distinct training images. Returns out_dir."""
    check_guard(settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = {"settings": asdict(settings), "dataset": {
        "path": str(Path(dataset.path).resolve()), "fingerprint": dataset.fingerprint, "count": len(dataset)}}
    if settings.carry == "images":
        images = np.ascontiguousarray(dataset.images[distinct_rows(dataset)])
        replace_file(out_dir / GUARD_IMAGES_FILE, lambda f: np.save(f, images, allow_pickle=False))
        reference["images_sha256"] = hashlib.sha256(images.tobytes()).hexdigest()
    replace_file(out_dir / GUARD_FILE, lambda f: f.write(json.dumps(reference, indent=2).encode()))
    return out_dir


def find_guard_dir(root: str | Path) -> Path | None:
    """The folder holding a model's guard.json: `root` itself, or the one below it (an MLflow model
    keeps it in artifacts/guard). None: the model carries no guard reference."""
    root = Path(root)
    if (root / GUARD_FILE).is_file():
        return root
    found = sorted(p.parent for p in root.rglob(GUARD_FILE)) if root.is_dir() else []
    return found[0] if len(found) == 1 else None


def read_guard_settings(folder: str | Path) -> GuardConfig | None:
    """The guard settings a model carries (None: it carries none, as models before issue 28)."""
    file = Path(folder) / GUARD_FILE
    if not file.is_file():
        return None
    return GuardConfig(**_read_reference(file)["settings"])


def load_guard(folder: str | Path, mode: str | None = None, device: str | None = None) -> Guard | None:
    """The guard a model's files describe, in `mode` (None: the model's own; off: none). The training
    set is checked against its fingerprint: a missing or changed dataset is a one-line error."""
    file = Path(folder) / GUARD_FILE
    if not file.is_file():
        if mode in (None, "off"):
            return None
        raise MemshardError(f"this model carries no guard reference ({GUARD_FILE}): it was registered before the "
                            "guard existed; register it again with memshard train, or evaluate it with --guard off")
    reference = _read_reference(file)
    settings = GuardConfig(**reference["settings"])
    if mode is not None:
        settings = GuardConfig(**{**asdict(settings), "mode": mode})
    check_guard(settings)
    if settings.mode == "off":
        return None
    device = str(resolve_device(device))
    expected = reference["dataset"]
    if (Path(folder) / GUARD_IMAGES_FILE).is_file():
        return _carried_guard(Path(folder), settings, reference, device)
    path = expected["path"]
    try:
        dataset = load_dataset(checked_path(path, "the guard's training set"))
    except MemshardError as error:
        raise MemshardError(f"the guard's training set {path} is missing or unreadable ({str(error)[:200]}): put the "
                            "dataset the model was trained on back there, or sample with guard off") from None
    if dataset.fingerprint != expected["fingerprint"]:
        raise MemshardError(f"the guard's training set {path} has changed since the model was trained (fingerprint "
                            f"{dataset.fingerprint[:12]}, expected {expected['fingerprint'][:12]}): restore it, or "
                            "sample with guard off")
    return build_guard(settings, dataset, device)


def _carried_guard(folder: Path, settings: GuardConfig, reference: dict, device: str) -> Guard:
    images = np.load(folder / GUARD_IMAGES_FILE, allow_pickle=False)
    if hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest() != reference.get("images_sha256"):
        raise MemshardError(f"{folder / GUARD_IMAGES_FILE} does not match the model's {GUARD_FILE}: the model's files "
                            "are damaged; register it again")
    return guard_over(settings, images, device)


def _read_reference(file: Path) -> dict:
    try:
        reference = json.loads(file.read_text())
        GuardConfig(**reference["settings"])
        reference["dataset"]["path"], reference["dataset"]["fingerprint"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise MemshardError(f"{file} is not a guard reference memshard wrote: the model's files are damaged; "
                            "register it again") from None
    return reference
