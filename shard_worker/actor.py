"""`ShardWorker`: ProxyTrainer as a Ray actor (one per shard; the driver sets its resources)."""

from __future__ import annotations

import numpy as np
import ray
import torch

from memshard.config import Config
from memshard.pipeline import SamplingPlan, build_pipeline, generate_batch, use_sampler
from memshard.shard_worker.faults import FaultPlan
from memshard.shard_worker.trainer import ProxyTrainer


@ray.remote
class ShardWorker(ProxyTrainer):
    def __init__(self, cfg: Config, images: np.ndarray, shard: int, torch_threads: int, faults: FaultPlan | None = None):
        # Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors; match torch to what the actor was given.
        torch.set_num_threads(max(1, torch_threads))
        super().__init__(cfg, images, shard, faults)

    def describe(self) -> dict:
        """Where this proxy runs: node and device, for MLflow tags and placement checks."""
        context = ray.get_runtime_context()
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"shard": self.shard, "node_id": context.get_node_id(), "device": device}

    def generate(self, weights: dict, plan: SamplingPlan, batches: list[int]) -> list[np.ndarray]:
        """The plan's batches `batches` from a pipeline of `weights` (a model the run delivers), made on this
        proxy's device between rounds: (count, C, H, W) uint8 arrays, on the CPU. Batch b is seeded by the
        plan alone, so the images are those any other process makes of it (on CPUs bitwise)."""
        pipeline = use_sampler(build_pipeline(self.cfg, self.images.shape[1], weights), plan.sampler).to(self.device)
        seeds = plan.batches()
        return [generate_batch(pipeline, plan, *seeds[b]) for b in batches]
