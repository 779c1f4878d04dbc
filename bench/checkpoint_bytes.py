"""Bytes pulled through the driver per checkpointed round: every proxy's state into one file (before)
against each actor writing its own file and the driver a manifest (now).

    python bench/checkpoint_bytes.py [--preset digits] [--rounds 2] [--local-steps 5]

Starts the preset's K real shard actors on a local Ray instance (RAY_ADDRESS, else its own), runs
`--rounds` rounds of `--local-steps` steps, and after the last one checkpoints it both ways:

- before: what the driver did until issue 27 — `ray.get` of every actor's `state_dict` (each proxy's
  whole state crosses into the driver's heap) and one `torch.save` of it all with the driver's state;
- now: `IETDriver.state(dir)` — every actor writes its own file, the driver checks their sizes — and
  `save_checkpoint` of the driver's state with the manifest.

Prints the bytes that reach the driver and the seconds each way. Bytes through the driver are counted
as the tensors' sizes (`nbytes`), which is what Ray copies; the file sizes are what lands on disk.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from memshard.config import build_config
from memshard.data import load_dataset, resolve_dataset
from memshard.orchestrator.checkpoint import save_checkpoint
from memshard.orchestrator.cluster import ray_session
from memshard.orchestrator.rounds import start_shard_driver
from memshard.orchestrator.sharding import split_into_shards


def tensor_bytes(tree) -> int:
    if isinstance(tree, (torch.Tensor, np.ndarray)):
        return tree.nbytes
    if isinstance(tree, dict):
        return sum(tensor_bytes(value) for value in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(value) for value in tree)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="memshard-checkpoint-bytes-"))
    os.chdir(workdir)
    cfg = build_config(args.preset, overrides={"iet.method": "iet-agc-plus", "iet.rounds": args.rounds,
                                               "iet.local_steps": args.local_steps})
    dataset = load_dataset(resolve_dataset(cfg.data.path, cfg.data.resolution, cfg.data.channels, cfg.data.cache_dir))
    shards = split_into_shards(len(dataset), cfg.iet.shards, cfg.training.seed)
    with ray_session(None), start_shard_driver(cfg, dataset.images, shards) as (driver, _):
        for round_index in range(1, args.rounds + 1):
            driver.run_round(round_index, is_last=round_index == args.rounds)

        started = time.perf_counter()
        driver_state = driver.state(workdir / "now")
        save_checkpoint(workdir / "now", {"driver": driver_state}, keep_round=args.rounds)
        now_seconds = time.perf_counter() - started
        now_through_driver = len(repr(driver_state["worker_files"]).encode())  # the manifest, as text
        driver_own = tensor_bytes({k: v for k, v in driver_state.items() if k != "worker_files"})
        now_files = sum(driver_state["worker_files"]["bytes"])
        now_driver_file = (workdir / "now" / "checkpoint.pt").stat().st_size

        started = time.perf_counter()
        workers = ray.get([actor.state_dict.remote() for actor in driver.actors])
        before_through_driver = tensor_bytes(workers)
        old_state = {**{k: v for k, v in driver_state.items() if k != "worker_files"}, "workers": workers}
        save_checkpoint(workdir / "before", {"driver": old_state}, keep_round=args.rounds)
        before_seconds = time.perf_counter() - started
        before_file = (workdir / "before" / "checkpoint.pt").stat().st_size

    device = f"cpu: {platform.machine()}, {os.cpu_count()} cores" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"device: {device}; preset {args.preset}, K={cfg.iet.shards}, training.ema={cfg.training.ema}")
    print("| per checkpointed round | before (one file through the driver) | now (actors write their own) |")
    print("| --- | --- | --- |")
    print(f"| proxy state pulled through the driver | {before_through_driver:,} B | {now_through_driver:,} B (manifest) |")
    print(f"| driver's own state (global weights, tables) | {driver_own:,} B | {driver_own:,} B |")
    print(f"| driver's checkpoint file | {before_file:,} B | {now_driver_file:,} B |")
    print(f"| proxy files written by the actors | — | {now_files:,} B |")
    print(f"| wall time of the checkpoint | {before_seconds:.3f} s | {now_seconds:.3f} s |")


if __name__ == "__main__":
    main()
