"""`memshard tune` wall time when the cluster has room for 1, 2 and 4 trials at once (issue 13).

    python bench/tune_scaling.py --out /tmp/tune-scaling [--rooms 1 2 4] [--preset tiny] [--num-images 64]

The same sweep — a ddpm reference plus iet-agc-plus at AGC λ 1.25, 2 and 3 (four trials, K = 2
shards each for the averaged methods, one CPU per shard actor) — runs once per room size, each time
on a fresh local Ray instance given `room × 2` logical CPUs: with room for R trials, Tune places up
to R of them side by side (each trial's placement group holds its actors' bundles) and queues the
rest. Writes results.json (per room: wall seconds, trials finished, the chosen trial, the speed-up
against room 1) and prints a table. The logical CPUs are a simulation: on a machine with fewer
physical cores than `room × 2` the trials share the cores, so the speed-up is bounded by the cores
(and by the phases in which a trial's actors wait for its driver), not by Tune.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import ray
import torch

from memshard.commands.cli import quiet_terminal
from memshard.tuning.space import sweep_space
from memshard.tuning.sweep import SweepSettings, run_sweep

GRID = {"iet.method": ["ddpm", "iet-agc-plus"], "agc.lam": [1.25, 2.0, 3.0]}  # ddpm ignores λ: 4 trials
SHARDS = 2


def sweep_once(room: int, out: Path, preset: str, num_images: int) -> dict:
    where = out / f"room-{room}"
    where.mkdir(parents=True, exist_ok=True)
    grid = where / "grid.json"
    grid.write_text(json.dumps(GRID))
    sets = [f"iet.shards={SHARDS}", "ray.cpus_per_actor=1", f"mlflow.tracking_uri=sqlite:///{where / 'mlflow.db'}",
            f"mlflow.checkpoint_dir={where / 'checkpoints'}", f"data.cache_dir={out / 'data'}"]
    space = sweep_space(preset, None, sets, grid_file=str(grid))
    ray.init(address="local", num_cpus=room * SHARDS, include_dashboard=False)
    try:
        started = time.perf_counter()
        result = run_sweep(space, SweepSettings(num_images=num_images, sampling_steps=20), preset,
                           say=lambda line: print(f"[room {room}] {line}", file=sys.stderr, flush=True))
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    chosen = result.choice.chosen if result.choice else None
    return {"room": room, "logical_cpus": room * SHARDS, "trials": len(space.trials), "seconds": seconds,
            "finished": sum(o.status == "FINISHED" for o in result.outcomes),
            "chosen": None if chosen is None else f"{chosen.trial} round {chosen.round}",
            "parent_run_id": result.parent_run_id}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rooms", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--num-images", type=int, default=64)
    args = parser.parse_args()
    quiet_terminal(verbose=False)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # Tune's folders and the classifier cache stay in the work folder
    load_at_start = os.getloadavg()
    rows = [sweep_once(room, out, args.preset, args.num_images) for room in args.rooms]
    for row in rows:
        row["speedup_vs_first"] = rows[0]["seconds"] / row["seconds"]
    result = {"command": " ".join(["python", "bench/tune_scaling.py", *sys.argv[1:]]),
              "device": f"cpu: {platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
              "ray": ray.__version__, "load_average": {"start": load_at_start, "end": os.getloadavg()},
              "grid": GRID, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"{result['command']}\n{result['device']}; load average {load_at_start} -> {result['load_average']['end']}")
    print("| room (trials at once) | logical CPUs | trials | finished | wall seconds | speed-up vs room "
          f"{rows[0]['room']} | chosen |\n| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['room']} | {row['logical_cpus']} | {row['trials']} | {row['finished']} | {row['seconds']:.0f} | "
              f"{row['speedup_vs_first']:.2f}x | {row['chosen']} |")


if __name__ == "__main__":
    main()
