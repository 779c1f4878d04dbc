"""Round overhead (broadcast + gather + aggregate) for the `cifar32` proxy (35.7M params) at K shards.

    python bench/round_overhead.py [--shards 10] [--rounds 3]

Starts K real shard actors with the published CIFAR-10 UNet on a local Ray instance and runs
rounds of ONE local step at batch 2 (training time is not what is measured here), then prints the
per-phase wall time of the last round and the weights' size. The overhead's share of a real round
is overhead / (overhead + local_steps x step time). The published setting trains ≈390k steps: K=10 proxies x
10 rounds x ≈3,900 local steps (100 epochs of a 5,000-image shard at batch 128); the share printed uses the batch-2 step time measured here,
which understates a batch-128 step, so the printed share is an upper bound.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from memshard.config import build_config
from memshard.orchestrator.cluster import ray_session
from memshard.orchestrator.rounds import start_shard_driver
from memshard.orchestrator.sharding import split_into_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.chdir(tempfile.mkdtemp(prefix="memshard-overhead-"))

    cfg = build_config("cifar32", overrides={"iet.shards": args.shards, "iet.local_steps": 1,
                                             "training.batch_size": 2, "training.mixed_precision": "no"})
    num_samples = 50 * args.shards
    images = np.random.default_rng(0).integers(0, 256, (num_samples, 3, 32, 32), dtype=np.uint8)
    with ray_session(None):  # RAY_ADDRESS, else a local instance
        with start_shard_driver(cfg, images, split_into_shards(num_samples, args.shards, 0)) as (driver, _):
            megabytes = sum(w.nbytes for w in driver.weights.values()) / 1e6
            for round_index in range(1, args.rounds + 1):
                start = time.perf_counter()
                report = driver.run_round(round_index, is_last=round_index == args.rounds)
                wall = time.perf_counter() - start
        seconds = report.seconds
        overhead = seconds["broadcast"] + seconds["gather"] + seconds["aggregate"]
        step_s = float(np.median([r.seconds / r.steps for r in report.results]))

    device = f"cpu: {platform.machine()}, {os.cpu_count()} cores" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"device: {device}; K={args.shards}; cifar32 proxy {megabytes:.0f} MB fp32 weights")
    print("| phase (last round) | seconds |")
    print("| --- | --- |")
    for phase in ("broadcast", "train", "gather", "aggregate"):
        print(f"| {phase} | {seconds[phase]:.3f} |")
    print(f"| overhead = broadcast + gather + aggregate | {overhead:.3f} |")
    print(f"| whole round wall time (1 local step at batch 2) | {wall:.3f} |")
    for local_steps in (1000, 3900):
        share = overhead / (overhead + local_steps * step_s)
        print(f"| overhead share of a round of {local_steps} steps at the measured {step_s:.3f} s/step | {100 * share:.3f}% |")


if __name__ == "__main__":
    main()
