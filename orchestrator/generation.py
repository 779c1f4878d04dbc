"""Generation on Ray: the batches of a SamplingPlan spread over actors that hold the loaded pipeline.

The plan fixes every batch before a worker starts (`memshard.pipeline.SamplingPlan.batches`: batch
b is seeded from the b-th state of SeedSequence(seed)), and the images come back in batch order, so
they do not depend on how many workers made them; on CPUs they are bitwise the same for any W.

Workers are placed like the shard actors, by `cluster.place_actors` in one placement group:
- on a cluster with GPUs (and device auto or cuda): one worker per GPU by default; W workers get
  1/⌈W/GPUs⌉ of a GPU and at most one CPU each, as `ray.gpus_per_actor=auto` sizes shard actors;
- else one worker per CPU slot by default, each holding the auto CPU share and at least one whole
  CPU (a generation worker is one sampling loop: less than a CPU only slows it down).
A `--workers` count that can never fit is a one-line error, before any actor starts.

With a copy guard (`memshard.guard.Guard`, put into the object store once like the pipeline) every
worker makes each batch twice: plain, then guarded (`Guard.batch`, which in reject mode starts from
the plain batch), timing each; the driver gathers both, and the batches' GuardLogs, in batch order.
The guard depends only on the batch's seed, so guarded images too are the same for any W.

The driver hands out batches as workers free up (two in flight per worker), draws one progress
bar over all of them, prints an estimate of the total once the first batch is back, and replaces a
worker that dies or stalls (no batch back within `--batch-timeout`; `actor_pool.ActorPool`): its
batches are made again, the same images.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np
import ray
import torch
from diffusers import DDPMPipeline
from tqdm import tqdm

from memshard.config import Config
from memshard.errors import MemshardError
from memshard.guard import Guard, GuardLog
from memshard.orchestrator.actor_pool import ActorPool, CallError, Lost
from memshard.orchestrator.cluster import (
    ActorResources,
    ActorRole,
    assigned_device,
    check_feasible,
    node_resources,
    place_actors,
    plan_actor_resources,
    release,
)
from memshard.pipeline import SamplingPlan, generate_batch, use_sampler
from memshard.shard_worker.faults import FaultPlan

GENERATION_WORKER = ActorRole("generation worker", "--workers")
IN_FLIGHT = 2  # batches queued per worker: the next one starts while the last one's images travel


@dataclass(frozen=True)
class WorkerPlan:
    """How many generation workers, each with which resources, on GPUs or not."""

    count: int
    resources: ActorResources
    gpu: bool

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else "cpu"

    def describe(self) -> str:
        share = f"{self.resources.gpus:g} GPU, " if self.gpu else ""
        return f"{self.count} generation worker{'s' * (self.count != 1)} ({share}{self.resources.cpus:g} CPU each)"


def cluster_has_gpu(device: str = "auto") -> bool:
    """Whether generation runs on GPUs: the cluster offers one and `device` (auto, cpu, cuda) allows it.
    `device` cuda on a cluster without a GPU is a one-line error."""
    gpus = sum(node.get("GPU", 0.0) for node in node_resources())
    if device == "cuda" and gpus < 1:
        raise MemshardError("--device cuda, but the Ray cluster has no GPU: use --device auto or cpu, or add GPU nodes")
    return device != "cpu" and gpus >= 1


def plan_workers(requested: int | None, device: str, batches: int) -> WorkerPlan:
    """W workers (`requested`, else every GPU or CPU slot, at most one per batch) and their resources,
    checked against the cluster: a W that can never fit is a one-line error."""
    nodes = node_resources()
    gpu = cluster_has_gpu(device)
    slots = sum(math.floor(node.get("GPU" if gpu else "CPU", 0.0) + 1e-9) for node in nodes)
    count = requested or max(1, min(slots, batches))
    cfg = Config()  # default ray settings: auto CPU and GPU shares, no custom resources
    cfg.ray.gpus_per_actor = "auto" if gpu else "0"
    resources = plan_actor_resources(cfg, count, nodes)
    if gpu:
        resources = replace(resources, gpus=max(resources.gpus, 0.01))
    else:
        resources = replace(resources, cpus=max(resources.cpus, 1.0))
    check_feasible(resources, count, nodes, GENERATION_WORKER)
    return WorkerPlan(count, resources, gpu)


@dataclass(frozen=True)
class GuardedBatch:
    """One batch made plain and guarded, by a worker holding a guard."""

    plain: np.ndarray = field(repr=False)  # (count, C, H, W) uint8
    guarded: np.ndarray = field(repr=False)  # the same batch through the guard
    log: GuardLog
    plain_seconds: float  # the worker's time for the plain batch
    guard_seconds: float  # its time for `Guard.batch` after it (reject: checks and redraws; guidance: a full batch)


@ray.remote
class GenerationWorker:
    """Holds one copy of the pipeline, with the plan's sampler, and makes batches on request."""

    def __init__(self, pipeline: DDPMPipeline, plan: SamplingPlan, threads: int, faults: FaultPlan | None = None,
                 guard: Guard | None = None):
        torch.set_num_threads(threads)
        self.plan = plan
        self.pipeline = use_sampler(pipeline, plan.sampler).to(assigned_device())
        self.faults = faults  # test-only (shard_worker.faults); None in a real run
        self.guard = guard

    def describe(self) -> dict:
        """Where this worker runs (waiting on it also waits for the pipeline to load)."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "device": self.pipeline.device.type,
                "threads": torch.get_num_threads()}

    def generate(self, batch: int, count: int, seed: int) -> np.ndarray | GuardedBatch:
        """The plan's batch `batch`: `count` images from `seed`; with a guard, plain and guarded."""
        if self.faults is not None:
            self.faults.before_batch(batch)
        if self.guard is None:
            return generate_batch(self.pipeline, self.plan, count, seed)
        start = time.perf_counter()
        plain = generate_batch(self.pipeline, self.plan, count, seed)
        plain_seconds = time.perf_counter() - start
        start = time.perf_counter()
        guarded, log = self.guard.batch(self.pipeline, self.plan, count, seed, plain=plain)
        return GuardedBatch(plain, guarded, log, plain_seconds, time.perf_counter() - start)


@dataclass(frozen=True)
class GeneratedImages:
    images: np.ndarray = field(repr=False)  # (M, C, H, W) uint8, in batch order
    workers: WorkerPlan
    placement: list[dict]  # per worker: node id, device, torch threads
    first_batch_seconds: float  # wall time until the first batch came back (workers already loaded)
    estimated_seconds: float  # the estimate printed then
    seconds: float  # wall time of the whole generation, placement and loading included
    restarts: int
    guarded: np.ndarray | None = field(default=None, repr=False)  # with a guard: the same plan guarded, batch order
    guard_log: GuardLog | None = None  # with a guard: what it did, all batches merged
    guard_seconds: float | None = None  # with a guard: the workers' time in `Guard.batch`, summed over batches
    plain_batch_seconds: float | None = None  # with a guard: the workers' time for the plain batches, summed

    def details(self) -> dict:
        """For report.json: how the images were made."""
        details = {"workers": self.workers.count, "worker_resources": self.workers.resources.bundle(),
                   "nodes": len({p["node_id"] for p in self.placement}), "device": self.workers.device,
                   "first_batch_seconds": round(self.first_batch_seconds, 3),
                   "estimated_seconds": round(self.estimated_seconds, 1), "worker_restarts": self.restarts}
        if self.guard_seconds is not None:
            details.update({"plain_batch_seconds": round(self.plain_batch_seconds, 3),
                            "guard_batch_seconds": round(self.guard_seconds, 3)})
        return details


def generate_on_ray(pipeline: DDPMPipeline, plan: SamplingPlan, workers: WorkerPlan, *, batch_timeout_s: float,
                    show_progress: bool = True, max_restarts: int | None = None,
                    guard: Guard | None = None) -> GeneratedImages:
    """The plan's images, made by `workers` placed on the cluster (see the module notes). A worker that
    returns no batch within `batch_timeout_s` (EvaluateSettings.batch_timeout_s) is replaced, as is one
    that dies, up to `max_restarts` times (None: ray.max_actor_restarts' default). The estimate after
    the first batch is printed to stdout; the progress bar goes to stderr. With `guard`, the plan's
    images also through the guard (`GeneratedImages.guarded`, with what it did and its time)."""
    started = time.perf_counter()
    batches = plan.batches()
    cfg = Config()
    limit = cfg.ray.max_actor_restarts if max_restarts is None else max_restarts
    faults = FaultPlan.from_environment()  # test-only; None in a real run
    pipeline_ref = ray.put(pipeline.to("cpu"))  # once into the object store; each worker loads its copy
    guard_ref = None if guard is None else ray.put(guard)  # likewise: the training images travel once
    actors, group = [], None
    try:
        actors, group, resources, start_actor = place_actors(
            cfg, workers.count, GenerationWorker,
            lambda k, r: (pipeline_ref, plan, max(1, int(r.cpus)), faults, guard_ref),
            role=GENERATION_WORKER, resources=workers.resources)
        placement = ray.get([actor.describe.remote() for actor in actors])

        def out_of_restarts(lost: Lost) -> MemshardError:
            return MemshardError(f"generation worker {lost.actor} failed ({lost.reason}) and the evaluation has used "
                                 f"its {limit} restarts: check the nodes' memory and logs, raise --batch-timeout for "
                                 f"slow batches, or use fewer --workers")

        pool = ActorPool(actors, start_actor, max_restarts=limit, timeout_s=batch_timeout_s,
                         timeout_setting="--batch-timeout", out_of_restarts=out_of_restarts,
                         restore=lambda k, actor: ray.get(actor.describe.remote()))  # its pipeline loaded first
        results, first, estimate = _BatchRun(pool, batches).collect(plan, show_progress)
        seconds = time.perf_counter() - started
        if guard is None:
            return GeneratedImages(_joined(results), workers, placement, first, estimate, seconds, pool.restarts)
        log = GuardLog(guard.mode)
        for made in results:
            log = log.merge(made.log)
        return GeneratedImages(_joined([made.plain for made in results]), workers, placement, first, estimate,
                               seconds, pool.restarts, guarded=_joined([made.guarded for made in results]),
                               guard_log=log, guard_seconds=sum(made.guard_seconds for made in results),
                               plain_batch_seconds=sum(made.plain_seconds for made in results))
    finally:
        release(actors, group)


def _joined(batches: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(batches))


class _BatchRun:
    """The driver's loop: queue the batches, keep IN_FLIGHT per worker, gather them in order; the
    batches of a worker the pool replaced go back to the front of the queue."""

    def __init__(self, pool: ActorPool, batches: list[tuple[int, int]]):
        self.pool, self.batches = pool, batches
        self.queue = deque(range(len(batches)))

    def submit(self, k: int) -> None:
        if self.queue:
            b = self.queue.popleft()
            count, seed = self.batches[b]
            self.pool.submit(k, "generate", b, count, seed, tag=b)

    def collect(self, plan: SamplingPlan, show_progress: bool) -> tuple[list, float, float]:
        """Every batch's result (images, or a GuardedBatch), in batch order; the first batch's time and the estimate."""
        results: list[np.ndarray | GuardedBatch | None] = [None] * len(self.batches)
        workers = len(self.pool.actors)
        for _ in range(IN_FLIGHT):
            for k in range(workers):
                self.submit(k)
        start = time.perf_counter()
        first = estimate = 0.0
        bar = tqdm(total=plan.num_images, desc="generating", unit="img", disable=not show_progress, file=sys.stderr)
        try:
            for outcome in self.pool.results():
                if isinstance(outcome, Lost):  # a fresh worker, idle: the lost batches first
                    self.queue.extendleft(reversed(outcome.tags))
                    for _ in range(IN_FLIGHT):
                        self.submit(outcome.actor)
                    continue
                b = outcome.tag
                results[b] = outcome.value
                if not first:
                    first = time.perf_counter() - start
                    estimate = first * math.ceil(len(self.batches) / workers)
                    bar.write(f"first batch: {self.batches[b][0]} images in {_duration(first)} on "
                              f"{workers} worker{'s' * (workers != 1)}; estimated generation "
                              f"time for {plan.num_images:,} images: {_duration(estimate)}", file=sys.stdout)
                    sys.stdout.flush()
                bar.update(self.batches[b][0])
                self.submit(outcome.actor)
        except CallError as failed:
            raise _task_error(failed.error, self.batches[failed.tag][0]) from None
        finally:
            bar.close()
        return results, first, estimate


def _task_error(error: Exception, count: int) -> Exception:
    """A worker's out-of-memory is the user's to fix (a smaller batch), as is its MemshardError (a guard
    mode the model cannot take); anything else stays a traceback."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, MemshardError):
        return MemshardError(str(cause))
    if isinstance(cause, torch.OutOfMemoryError | MemoryError):
        return MemshardError(f"a generation worker ran out of memory on a batch of {count} images: "
                             f"use a smaller --batch")
    return error


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 90 else f"{minutes / 60:.1f} h"
