"""Per-round checkpoints: everything needed to continue a run exactly where it stopped.

One file per run, replaced atomically after each checkpointed round: the global weights, every
proxy's state (weights, optimizer, AGC memory bank, TAA strengths, RNG), the shard assignment,
the driver's per-sample tables, the server optimizer's moments and the round number. Only tensors,
numpy arrays (of any shape, 0-d included) and plain Python values go in, so
`torch.load(weights_only=True)` reads it back — never a pickle of arbitrary code.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from memshard.errors import MemshardError
from memshard.files import checked_path, ensure_writable_dir, in_workspace

CHECKPOINT_FILE = "checkpoint.pt"
# What every checkpoint holds, and the type each entry must have for a resume to trust it.
REQUIRED_ENTRIES = {"config": dict, "dataset_fingerprint": str, "driver": dict, "owners": np.ndarray}


def check_checkpoint_root(root: str | Path) -> Path:
    """Fail before training when checkpoints could not be written under `root` (mlflow.checkpoint_dir)."""
    return ensure_writable_dir(in_workspace(root), "mlflow.checkpoint_dir")


def save_checkpoint(directory: str | Path, state: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    partial = directory / (CHECKPOINT_FILE + ".partial")
    torch.save(_to_tensors(state), partial)
    os.replace(partial, path)  # a crash mid-write leaves the previous checkpoint intact
    return path


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
