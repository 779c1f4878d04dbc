"""Training throughput: memshard's K-shard IET-AGC+ against a plain single-process diffusers loop.

One command, one run, both measured side by side on the same machine and model:

    python bench/train_throughput.py [--preset digits] [--shards 4] [--steps 60] [--batch 64]

1. plain   — the textbook diffusers loop (noise, add_noise, UNet, MSE, backward, clip, AdamW)
             in this process, `shards * steps` steps, all of the machine's cores.
2. memshard — the real driver on a local Ray instance: K shard actors, IET-AGC+, `steps` local
             steps each per round, 2 rounds; aggregate images/s = sum over shards, taken from the
             second round (the first pays actor start-up and first-touch costs).
3. AGC cost — ProxyTrainer in this process with `iet` (no AGC) vs `iet-agc`, same steps and seed,
             and the AGC bookkeeping alone (keep mask + bank update) timed per step.

Prints a table with ratios. Record results in BENCHMARKS.md with the device, date and command.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from memshard.config import build_config
from memshard.data import load_dataset, resolve_dataset
from memshard.model import build_scheduler, build_unet
from memshard.shard_worker.agc import agc_keep_mask, update_memory_bank
from memshard.shard_worker.trainer import ProxyTrainer


def plain_diffusers_loop(cfg, images: np.ndarray, steps: int) -> float:
    """images/s of the standard diffusers training step on one model."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_unet(cfg, images.shape[1]).to(device).train()
    scheduler = build_scheduler(cfg)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.training.learning_rate, fused=device.type == "cuda")
    data = torch.from_numpy(images).to(device).float() / 127.5 - 1
    batch = cfg.training.batch_size
    generator = torch.Generator(device).manual_seed(0)
    bf16 = cfg.training.mixed_precision == "bf16" and device.type == "cuda"  # the same setting memshard uses

    def step():
        rows = torch.randint(0, len(data), (batch,), generator=generator, device=device)
        x0 = data[rows]
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            prediction = model(scheduler.add_noise(x0, noise, t), t).sample
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def memshard_aggregate(cfg, work_dir: str) -> tuple[float, dict[str, float]]:
    """Aggregate images/s over shards in round 2 of a real `train`, and round-2 phase times."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from memshard.orchestrator.train import train

    result = train(cfg, show_progress=False)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    metrics = {m: client.get_metric_history(result.run_id, m)[-1].value
               for m in ("images_per_second", "time_train_s", "time_gather_s", "time_aggregate_s", "time_broadcast_s")}
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    return metrics.pop("images_per_second"), metrics


def agc_cost(cfg, images: np.ndarray, steps: int) -> tuple[float, float, float]:
    """(seconds/step without AGC, with AGC, AGC bookkeeping alone per step)."""
    shard = np.arange(min(len(images), 512))
    times = []
    for method in ("iet", "iet-agc"):
        method_cfg = copy.deepcopy(cfg)
        method_cfg.iet.method = method
        trainer = ProxyTrainer(method_cfg, images, 0)
        trainer.train_round(shard, 3)  # warm-up, fills the bank
        result = trainer.train_round(shard, steps)
        times.append(result.seconds / steps)
    bank = torch.rand(cfg.model.num_train_timesteps)
    t = torch.randint(0, cfg.model.num_train_timesteps, (cfg.training.batch_size,))
    losses = torch.rand(cfg.training.batch_size)
    start = time.perf_counter()
    for _ in range(1000):
        agc_keep_mask(bank, t, losses, cfg.agc.lam)
        bank = update_memory_bank(bank, t, losses, cfg.agc.decay)
    return times[0], times[1], (time.perf_counter() - start) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60, help="local steps per shard per round")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    work_dir = tempfile.mkdtemp(prefix="memshard-bench-")
    os.chdir(work_dir)
    cfg = build_config(args.preset, overrides={  # the sharded method: ddpm would fold the shards into one model
        "iet.method": "iet-agc-plus", "iet.shards": args.shards, "iet.rounds": 2, "iet.local_steps": args.steps,
        "training.batch_size": args.batch, "mlflow.tracking_uri": f"sqlite:///{work_dir}/mlflow.db",
        "mlflow.sample_grid_every": 0, "mlflow.register_as": "bench"})
    dataset = load_dataset(resolve_dataset(cfg.data.path, cfg.data.resolution, cfg.data.channels, cfg.data.cache_dir))

    plain = plain_diffusers_loop(cfg, dataset.images, args.shards * args.steps)
    sharded, phases = memshard_aggregate(cfg, work_dir)
    no_agc, with_agc, agc_alone = agc_cost(cfg, dataset.images, args.steps)

    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"device: {device}; torch {torch.__version__}; preset {args.preset}; batch {args.batch}; "
          f"K={args.shards}; {args.steps} local steps per round")
    print("| measurement | value | ratio |")
    print("| --- | --- | --- |")
    print(f"| plain diffusers loop, 1 model | {plain:.0f} img/s | 1.00 |")
    print(f"| memshard iet-agc-plus, K={args.shards}, aggregate (round 2) | {sharded:.0f} img/s | {sharded / plain:.2f} x plain |")
    round_time = sum(phases.values())
    overhead = phases["time_gather_s"] + phases["time_aggregate_s"] + phases["time_broadcast_s"]
    print(f"| round 2: train / gather / aggregate / broadcast | {phases['time_train_s']:.2f} / {phases['time_gather_s']:.3f} / "
          f"{phases['time_aggregate_s']:.3f} / {phases['time_broadcast_s']:.3f} s | overhead {100 * overhead / round_time:.2f}% of round |")
    print(f"| step time without AGC (iet) | {1000 * no_agc:.1f} ms | 1.00 |")
    print(f"| step time with AGC (iet-agc) | {1000 * with_agc:.1f} ms | {with_agc / no_agc:.3f} |")
    print(f"| AGC bookkeeping alone per step | {1000 * agc_alone:.3f} ms | {100 * agc_alone / with_agc:.2f}% of step |")


if __name__ == "__main__":
    main()
