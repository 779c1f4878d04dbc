"""Round time against the number of shards K, on a multi-node Ray cluster simulated on this machine.

    python bench/round_time_vs_shards.py [--preset digits] [--shards 1,2,4,8] [--local-steps 20]
                                         [--nodes 2] [--cpus-per-node 1] [--rounds 3] [--gpu]

Starts a local cluster with ray.cluster_utils.Cluster — a head with 0 CPUs (it holds the driver and
the object store, as on a real cluster) and `--nodes` worker nodes of `--cpus-per-node` CPUs, every
server on 127.0.0.1 — and for each K places K real shard actors with memshard's own sizing (`auto`:
the nodes' CPUs shared among the K actors) and runs `--rounds` IET rounds of `--local-steps` steps
per shard through `IETDriver`, the code `memshard train` runs. Every shard does the same steps, so
K shards do K times the work of one; the table shows the last round's wall time, its phases, the
aggregate training throughput, and both against K=1.

`--gpu` (needs CUDA) measures the other question: K actors sharing one GPU (1/K of it each) against
one actor on it, on a single node with all the machine's CPUs and one GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

# Every Ray server of the simulated cluster listens on 127.0.0.1 (Ray otherwise serves on the
# machine's network address). Set before Ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from memshard.config import build_config  # noqa: E402
from memshard.data import load_dataset, resolve_dataset  # noqa: E402
from memshard.orchestrator.rounds import start_shard_driver  # noqa: E402
from memshard.orchestrator.sharding import split_into_shards  # noqa: E402

PHASES = ("broadcast", "train", "gather", "aggregate", "redistribute")


def measure(preset: str, shards: int, local_steps: int, rounds: int, dataset, device: str) -> dict:
    """The last of `rounds` rounds with K shard actors placed by memshard's own sizing."""
    cfg = build_config(preset, overrides={"iet.method": "iet-agc-plus", "iet.shards": shards,
                                          "iet.local_steps": local_steps, "iet.rounds": rounds,
                                          "training.device": device})
    split = split_into_shards(len(dataset), shards, cfg.training.seed)
    with start_shard_driver(cfg, dataset.images, split) as (driver, resources):
        placement = driver.placement()
        for round_index in range(1, rounds + 1):  # round 1 also pays for the first steps' warm-up
            start = time.perf_counter()
            report = driver.run_round(round_index, is_last=round_index == rounds)
            wall = time.perf_counter() - start
    return {"shards": shards, "wall": wall, "seconds": report.seconds, "bundle": resources.bundle(),
            "nodes": len({p["node_id"] for p in placement}), "images_per_second": report.images_per_second}


def print_table(title: str, rows: list[dict]) -> None:
    base = rows[0]
    print(f"\n{title}")
    print("| K | actor resources | nodes used | round wall s | " + " | ".join(f"{p} s" for p in PHASES)
          + " | round time vs K=1 | aggregate img/s | img/s vs K=1 |")
    print("| " + " | ".join(["---"] * (7 + len(PHASES))) + " |")
    for row in rows:
        phases = " | ".join(f"{row['seconds'].get(p, 0.0):.3f}" for p in PHASES)
        print(f"| {row['shards']} | {row['bundle']} | {row['nodes']} | {row['wall']:.2f} | {phases} | "
              f"{row['wall'] / base['wall']:.2f} | {row['images_per_second']:.0f} | "
              f"{row['images_per_second'] / base['images_per_second']:.2f} |")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--shards", default="1,2,4,8", help="comma-separated K values")
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2, help="simulated worker nodes")
    parser.add_argument("--cpus-per-node", type=float, default=1.0)
    parser.add_argument("--gpu", action="store_true", help="K actors sharing one GPU vs one actor (needs CUDA)")
    args = parser.parse_args()
    shard_counts = [int(k) for k in args.shards.split(",")]
    os.chdir(tempfile.mkdtemp(prefix="memshard-scaling-"))
    cfg = build_config(args.preset)
    dataset = load_dataset(resolve_dataset(cfg.data.path, cfg.data.resolution, cfg.data.channels, cfg.data.cache_dir))

    print(f"device: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, Ray {ray.__version__}; "
          f"preset {args.preset} ({len(dataset)} images, batch {cfg.training.batch_size}), "
          f"{args.local_steps} local steps per shard, last of {args.rounds} rounds; load average at start {load_average()}")
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device: none is visible")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": os.cpu_count(), "num_gpus": 1,
                                                                "include_dashboard": False})
        title = f"K actors sharing one GPU ({torch.cuda.get_device_name()}), one node of {os.cpu_count()} CPUs"
        device = "cuda"
    else:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=args.cpus_per_node)
        title = (f"K CPU actors on {args.nodes} simulated nodes x {args.cpus_per_node:g} CPU "
                 f"(+ a 0-CPU head), all on this {os.cpu_count()}-core machine")
        device = "cpu"
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        rows = [measure(args.preset, k, args.local_steps, args.rounds, dataset, device) for k in shard_counts]
    finally:
        ray.shutdown()
        cluster.shutdown()
    print_table(title, rows)
    print(f"\nload average at end {load_average()}")


if __name__ == "__main__":
    main()
