"""`memshard evaluate` wall time against the number of generation workers W, on a multi-node Ray
cluster simulated on this machine; and DPM-Solver++ 20 against DDIM 100 on the same model.

    python bench/evaluate_workers.py [--workers 1,2,4] [--nodes 4] [--cpus-per-node 1]
                                     [--num-images 1000] [--sampler ddim] [--sampling-steps 100] [--batch 50]
                                     [--model MODEL --tracking-uri URI] [--data D]
    python bench/evaluate_workers.py --samplers ddim:100,dpm-solver++:20 --model MODEL --tracking-uri URI
                                     [--num-images 2000] [--seeds 0,1]

Starts a local cluster with ray.cluster_utils.Cluster, as bench/round_time_vs_shards.py does: a
head with 0 CPUs (it holds the driver, the object store and the k-NN scan, as on a real cluster)
and `--nodes` worker nodes of `--cpus-per-node` CPUs, every server on 127.0.0.1. Each measurement
is one whole `memshard evaluate` (`memshard.commands.evaluate.evaluate_model`: workers placed,
pipeline loaded, generation, k-NN scan, quality measure, MLflow run logged) into a temporary store.

Workers mode (the default): one evaluation per W; the table shows wall time per phase, the speed-up
of the whole evaluation and of generation against W=1, and speed-up / W (target ≥ 0.8 up to the
number of cores). The images of every W are checked to be the same (bitwise, on CPUs). Without
--model the `digits` preset's UNet, untrained, stands in: sampling speed does not depend on weights.

Samplers mode (--samplers): the same model, M and seeds with each sampler:steps; MQ@t, r-copied
images and the quality figures beside each other, each MQ@t with a 95% binomial interval and a
two-proportion z against the first sampler; and, because every sampler here starts from the same
seeded noise, the paired agreement: the share of generations whose r-copy verdict (r < t) is the same.
A trained model is needed (--model): an untrained one copies nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shlex
import sys
import tempfile
import time

# Every Ray server of the simulated cluster listens on 127.0.0.1. Set before Ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from memshard.commands.cli import quiet_terminal  # noqa: E402
from memshard.commands.evaluate import EvaluationResult, evaluate_model  # noqa: E402
from memshard.config import build_config  # noqa: E402
from memshard.evaluation.evaluate import EvaluateSettings  # noqa: E402
from memshard.evaluation.memorization import THRESHOLDS  # noqa: E402
from memshard.model import build_unet, state_to_numpy  # noqa: E402
from memshard.pipeline import build_pipeline, save_pipeline  # noqa: E402


def evaluate_once(args, store: str, **settings) -> tuple[EvaluationResult, float]:
    start = time.perf_counter()
    result = evaluate_model(args.model, EvaluateSettings(**settings), data=args.data, tracking_uri=store,
                            show_progress=False, say=lambda line: None)
    return result, time.perf_counter() - start


def warm_up(args, store: str) -> None:
    """One small evaluation, not measured: prepares the data and trains and caches the quality classifier."""
    evaluate_once(args, store, num_images=2 * args.batch, sampler=args.sampler, sampling_steps=2, batch_size=args.batch,
                  feature_space=args.feature_space, device="cpu", workers=1)


def workers_mode(args, store: str) -> None:
    warm_up(args, store)
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        result, wall = evaluate_once(args, store, num_images=args.num_images, sampler=args.sampler,
                                     sampling_steps=args.sampling_steps, batch_size=args.batch, seed=0,
                                     feature_space=args.feature_space, device="cpu", workers=workers)
        report = result.report
        rows.append({"workers": workers, "wall": wall, "seconds": report.seconds, "generation": report.generation,
                     "digest": hashlib.sha256(report.generated.tobytes()).hexdigest()[:16]})
        print(f"W={workers}: {wall:.1f} s", file=sys.stderr)
    base = rows[0]
    same = len({row["digest"] for row in rows}) == 1
    print(f"\n{report.plan.num_images} generations, {report.plan.sampler} {report.plan.steps} steps, batches of "
          f"{report.plan.batch_size}; quality space {report.feature_space or 'none'}; images identical across W: {same}")
    print("| W | worker resources | nodes used | first batch s | generate s | k-NN scan s | quality s | evaluation wall s "
          "| speed-up | speed-up / W | generation speed-up | generation speed-up / W |")
    print("| " + " | ".join(["---"] * 12) + " |")
    for row in rows:
        s, g, w = row["seconds"], row["generation"], row["workers"]
        speedup, generation = base["wall"] / row["wall"], base["seconds"]["generate"] / s["generate"]
        print(f"| {w} | {g['worker_resources']} | {g['nodes']} | {g['first_batch_seconds']:.2f} | {s['generate']:.1f} | "
              f"{s['nearest_neighbors']:.2f} | {s.get('quality', 0.0):.2f} | {row['wall']:.1f} | {speedup:.2f} | "
              f"{speedup / w * base['workers']:.2f} | {generation:.2f} | {generation / w * base['workers']:.2f} |")


def samplers_mode(args, store: str) -> None:
    samplers = [(name, int(steps)) for name, steps in (item.rsplit(":", 1) for item in args.samplers.split(","))]
    warm_up(args, store)
    results: dict[tuple[str, int, int], EvaluationResult] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for sampler, steps in samplers:
            result, wall = evaluate_once(args, store, num_images=args.num_images, sampler=sampler, sampling_steps=steps,
                                         batch_size=args.batch, seed=seed, feature_space=args.feature_space,
                                         workers=args.eval_workers)
            results[sampler, steps, seed] = result
            print(f"{sampler} {steps}, seed {seed}: {wall:.1f} s (generation {result.report.seconds['generate']:.1f} s)",
                  file=sys.stderr)
    first = samplers[0]
    space = next(iter(results.values())).report.feature_space
    print(f"\nmodel {args.model}; {args.num_images} generations per run; quality space {space or 'none'}")
    print("| sampler | seed | generate s | " + " | ".join(f"MQ@{t} (95% CI) | z vs {first[0]} {first[1]}" for t in THRESHOLDS)
          + " | r-copied | Fréchet (real) | mean confidence (real) | coverage |")
    print("| " + " | ".join(["---"] * (6 + 2 * len(THRESHOLDS))) + " |")
    for (sampler, steps, seed), result in results.items():
        report, reference = result.report, results[(*first, seed)].report
        m, n = report.memorization, report.plan.num_images
        cells = []
        for t in THRESHOLDS:
            count, ref_count = int((m.r < t).sum()), int((reference.memorization.r < t).sum())
            low, high = _wilson(count, n)
            cells += [f"{count} ({100 * count / n:.2f}%, {100 * low:.2f}–{100 * high:.2f})", f"{_z(count, ref_count, n):+.2f}"]
        q = report.quality
        quality = ["-", "-", "-"] if q is None else [
            f"{q.generated.frechet:.3f} ({q.real.frechet:.3f})",
            "-" if q.generated.mean_confidence is None else f"{q.generated.mean_confidence:.3f} ({q.real.mean_confidence:.3f})",
            "-" if q.generated.coverage is None else f"{q.generated.coverage:.2f}"]
        print(f"| {sampler} {steps} | {seed} | {report.seconds['generate']:.1f} | " + " | ".join(cells)
              + f" | {int(result.metrics['r_copied_training_samples'])} | " + " | ".join(quality) + " |")
    print(f"\npaired (same seeded noise): share of generations whose verdict r < t matches {first[0]} {first[1]}'s")
    for (sampler, steps, seed), result in results.items():
        if (sampler, steps) != first:
            a, b = results[(*first, seed)].report.memorization.r, result.report.memorization.r
            agree = ", ".join(f"t={t}: {100 * np.mean((a < t) == (b < t)):.1f}%" for t in THRESHOLDS)
            print(f"- {sampler} {steps}, seed {seed}: {agree}; median |Δr| {np.median(np.abs(a - b)):.4f}")


def _wilson(count: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = count / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _z(count: int, ref_count: int, n: int) -> float:
    """Two-proportion z of count/n against ref_count/n (0 when both are 0)."""
    pooled = (count + ref_count) / (2 * n)
    spread = np.sqrt(2 * pooled * (1 - pooled) / n)
    return 0.0 if spread == 0 else (count - ref_count) / n / spread


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4", help="comma-separated W values (workers mode)")
    parser.add_argument("--samplers", help="comma-separated sampler:steps, e.g. ddim:100,dpm-solver++:20 (samplers mode)")
    parser.add_argument("--model", help="anything memshard evaluate takes (default: an untrained digits UNet)")
    parser.add_argument("--tracking-uri", help="the model's MLflow store (evaluation runs are logged there too)")
    parser.add_argument("--data", help="the training data (default: the model's training run's; digits without --model)")
    parser.add_argument("--nodes", type=int, default=os.cpu_count(), help="simulated worker nodes")
    parser.add_argument("--cpus-per-node", type=float, default=1.0)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--sampler", default="ddim", help="workers mode")
    parser.add_argument("--sampling-steps", type=int, default=100, help="workers mode")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seeds", default="0", help="samplers mode: comma-separated seeds")
    parser.add_argument("--eval-workers", type=int, help="samplers mode: generation workers (default: every CPU slot)")
    parser.add_argument("--feature-space", default="auto", help="quality space (auto: as memshard evaluate chooses)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    quiet_terminal(args.verbose)
    if args.samplers and not args.model:
        parser.error("--samplers needs --model: a trained model (an untrained one copies nothing)")
    workdir = tempfile.mkdtemp(prefix="memshard-evaluate-bench-")
    store = args.tracking_uri or f"sqlite:///{workdir}/mlflow.db"
    if not args.tracking_uri:  # else stay: a given store may be a relative sqlite path
        os.chdir(workdir)
    if not args.model:
        cfg = build_config("digits")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = build_unet(cfg, cfg.data.channels or 1)
        args.model = str(save_pipeline(build_pipeline(cfg, cfg.data.channels or 1, state_to_numpy(unet)),
                                       f"{workdir}/untrained-digits"))
        args.data = args.data or "digits"

    print(f"device: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, Ray {ray.__version__}; "
          f"{args.nodes} simulated nodes x {args.cpus_per_node:g} CPU + a 0-CPU head; load average at start "
          f"{load_average()}; {time.strftime('%Y-%m-%d %H:%M')}")
    print("command: python " + shlex.join(sys.argv))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=args.cpus_per_node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=args.verbose, logging_level="info" if args.verbose else "error")
    try:
        samplers_mode(args, store) if args.samplers else workers_mode(args, store)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"\nload average at end {load_average()}")


if __name__ == "__main__":
    main()
