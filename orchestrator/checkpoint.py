"""Checkpoints: everything needed to continue a run exactly where it stopped, and how often.

A checkpoint of run RUN_ID at round R is, under `mlflow.checkpoint_dir/RUN_ID/`:

- `round_RRRR/shard_K.pt`, one per proxy, written by that proxy's actor itself (`ProxyTrainer.save_state`:
  weights, optimizer, AGC memory bank, TAA strengths, RNG, EMA), whole or not at all — the proxies'
  state never passes through the driver;
- `checkpoint.pt`, the driver's file, replaced atomically: the configuration, the global weights, the
  shard assignment, the driver's per-sample tables, the server optimizer's moments, the round number
  and the manifest of the proxies' files (`worker_files`: round, names, sizes). The driver writes it
  only once every proxy has reported its file written and the driver has found each file at its size
  (`check_worker_files`), so a crash at any moment leaves a `checkpoint.pt` whose files are all there;
  older `round_*` folders are removed only after the new `checkpoint.pt` is in place.

The folder must be one the driver and every node see (shared storage on a multi-node cluster):
the actors write there, the driver checks there, and a replacement actor reads its shard's file from
there (`orchestrator.rounds`, replay). Only tensors, numpy arrays (of any shape, 0-d included) and
plain Python values go in, so `torch.load(weights_only=True)` reads it back — never a pickle of code.

How often (`mlflow.checkpoint_every`; the last round always): `checkpoint_interval` below.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from memshard.config import Config
from memshard.errors import MemshardError
from memshard.files import checked_path, ensure_writable_dir, in_workspace, replace_file
from memshard.model import build_unet

CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = "run.lock"  # held by the one process training the run: `run_lock`
ROUND_FOLDER = re.compile(r"round_\d{4,}")
# `mlflow.checkpoint_every: auto` writes about this much proxy state per round at most, on average:
# every round while the K proxies' state is this small, else every ⌈state / this⌉ rounds.
AUTO_CHECKPOINT_BYTES_PER_ROUND = 2 << 30
# What every checkpoint holds, and the type each entry must have for a resume to trust it.
REQUIRED_ENTRIES = {"config": dict, "dataset_fingerprint": str, "driver": dict, "owners": np.ndarray}


def check_checkpoint_root(root: str | Path) -> Path:
    """Fail before training when checkpoints could not be written under `root` (mlflow.checkpoint_dir)."""
    return ensure_writable_dir(in_workspace(root), "mlflow.checkpoint_dir")


def checkpoint_interval(cfg: Config, channels: int, num_shards: int) -> int:
    """Rounds between checkpoints: `mlflow.checkpoint_every`, or for `auto` the size rule (README, "What
    it does"): one proxy's state is its parameters × 4 bytes × (weights + AdamW's two moments
    [+ the EMA]); K of them are written per checkpoint; every round while that is at most
    AUTO_CHECKPOINT_BYTES_PER_ROUND, else every ⌈K·state / AUTO_CHECKPOINT_BYTES_PER_ROUND⌉ rounds."""
    if cfg.mlflow.checkpoint_every != "auto":
        return int(cfg.mlflow.checkpoint_every)
    return max(1, math.ceil(proxy_state_bytes(cfg, channels) * num_shards / AUTO_CHECKPOINT_BYTES_PER_ROUND))


def proxy_state_bytes(cfg: Config, channels: int) -> int:
    """About the size of one proxy's state file: fp32 weights, two AdamW moments and, with training.ema,
    the EMA (the AGC bank, TAA strengths and RNG states are small beside them)."""
    with torch.device("meta"):  # counts the parameters without allocating them
        parameters = sum(p.numel() for p in build_unet(cfg, channels, for_training=True).parameters())
    return parameters * 4 * (3 + int(cfg.training.ema))


def worker_state_file(round_index: int, shard: int) -> str:
    """Where proxy `shard` writes its state after `round_index`, relative to the run's checkpoint folder
    (relative, so a run whose folder moved — mlflow.checkpoint_dir may change on --resume — still resumes)."""
    return f"round_{round_index:04d}/shard_{shard}.pt"


def check_worker_files(directory: str | Path, manifest: dict) -> list[Path]:
    """The proxies' files a manifest names, each found at the size its actor reported, or a one-line
    error: before a manifest is written (an actor wrote where the driver cannot see) and on resume."""
    paths = []
    for name, size in zip(manifest["files"], manifest["bytes"], strict=True):
        path = Path(directory) / name
        found = path.stat().st_size if path.is_file() else None
        if found != int(size):
            raise MemshardError(
                f"proxy state {path} is {'missing' if found is None else f'{found} bytes, not {int(size)}'}: "
                f"mlflow.checkpoint_dir must be storage the driver and every node share; start the run again "
                f"if it was damaged")
        paths.append(path)
    return paths


@contextmanager
def run_lock(directory: str | Path, run_id: str) -> Iterator[None]:
    """Hold run `run_id`'s lock for the block (the process that trains it, a new run or a resume), or
    fail at once, naming the holder, when another process holds it.

    It is an OS file lock (flock) on LOCK_FILE in the run's checkpoint folder, so the kernel releases
    it however the holder ends (an error, SIGKILL, the out-of-memory killer): a crashed holder cannot
    leave it stuck and nothing is left to clean up. What it guarantees: no two processes that lock
    the same file hold it at once -- every process on one machine, and processes on several machines
    where the file system carries flock between its clients (NFSv4, CephFS, Lustre mounted with
    `flock`). Where it does not (Lustre with `localflock`, some FUSE mounts) it guards each machine by
    itself; `ray job submit` runs every driver on the head node, one machine.
    """
    path = Path(directory) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(200).strip() or "another process"
            raise MemshardError(f"run {run_id} is being trained by {holder} (it holds {path}): wait for it to end "
                                "or stop it, then resume") from None
        except OSError as error:  # ENOLCK: a file system without locks
            raise MemshardError(f"cannot lock {path} ({error.strerror or error}): put mlflow.checkpoint_dir on a "
                                "file system with file locks") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}")  # who holds it, for the message above
        handle.flush()
        yield  # closing the file releases the lock


def save_checkpoint(directory: str | Path, state: dict, keep_round: int) -> Path:
    """Replace the driver's checkpoint file with `state` (whose manifest names the proxies' files of
    round `keep_round`, already checked), then remove every other round's proxy files: a crash at any
    point leaves the previous or the new checkpoint whole, with its files."""
    directory = Path(directory)
    path = directory / CHECKPOINT_FILE
    kept = Path(worker_state_file(keep_round, 0)).parent.name
    try:
        replace_file(path, lambda file: torch.save(_to_tensors(state), file))
    except OSError as error:
        shutil.rmtree(directory / kept, ignore_errors=True)  # no checkpoint names this round's proxy files
        raise checkpoint_not_written(directory, path, error) from None
    for folder in directory.iterdir():
        if folder.is_dir() and ROUND_FOLDER.fullmatch(folder.name) and folder.name != kept:
            shutil.rmtree(folder, ignore_errors=True)
    return path


def checkpoint_not_written(directory: Path, path: Path, error: OSError) -> MemshardError:
    """A checkpoint file (the driver's or a proxy's, `path`) that the file system refused: disk full, a
    quota, a file size limit. One line; `replace_file` left the previous file whole and no partial, so the
    run's last complete checkpoint stands and the run continues from it with --resume."""
    reason = error.strerror or type(error).__name__
    if (directory / CHECKPOINT_FILE).is_file():
        then = f"the last complete checkpoint is kept: free space, then continue with memshard train --resume {directory.name}"
    else:
        then = "no checkpoint was complete yet: free space (or choose mlflow.checkpoint_dir) and start the run again"
    return MemshardError(f"cannot write the checkpoint file {path} ({reason}); {then}")


def load_checkpoint(directory: str | Path) -> dict:
    path = checked_path(Path(directory) / CHECKPOINT_FILE, "checkpoint")
    if not path.is_file():
        raise MemshardError(f"no checkpoint at {path}: the run never completed a round, start it again")
    try:
        state = _to_numpy(torch.load(path, weights_only=True, map_location="cpu"))
    except Exception as error:  # a torn or foreign file: say which, do not show a pickle traceback
        raise MemshardError(f"checkpoint {path} cannot be read ({type(error).__name__}): it is damaged, start the run again") from None
    problem = _problem(state)
    if problem:
        raise MemshardError(f"damaged checkpoint {path} ({problem}): start the run again")
    return state


def _problem(state) -> str | None:
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a checkpoint"
    for key, kind in REQUIRED_ENTRIES.items():
        if key not in state:
            return f"no {key!r} entry"
        if not isinstance(state[key], kind):
            return f"its {key!r} is a {type(state[key]).__name__}, not a {kind.__name__}"
    return None


def _to_tensors(value):
    """numpy arrays → tensors (weights_only loading accepts tensors, not arbitrary numpy objects)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "US":
            return {"__strings__": value.astype(str).tolist()}
        # reshape: ascontiguousarray makes a 0-d array (a counter) 1-d; it must come back as it went in
        return {"__numpy__": torch.from_numpy(np.ascontiguousarray(value).reshape(value.shape))}
    if isinstance(value, dict):
        return {key: _to_tensors(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_tensors(item) for item in value]
    return value


def _to_numpy(value):
    if isinstance(value, dict):
        if set(value) == {"__numpy__"}:
            return value["__numpy__"].numpy()
        if set(value) == {"__strings__"}:
            return np.asarray(value["__strings__"])
        return {key: _to_numpy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_numpy(item) for item in value]
    return value
