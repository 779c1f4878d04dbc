"""The IET round (method.md §1–3), driven from here; the proxies are Ray actors that hold the state.

A round: the global weights go into the object store once and every actor loads them by reference →
all actors train their local steps concurrently → per-sample skip counts and losses come back →
FedAvg weighted by the shard sizes the proxies trained on, then the server optimizer's step
(`aggregation.server_optimizer`, method.md §8; fedavg takes the average as it is); with
`training.ema` the proxies' EMAs are averaged the same way (no server step: an EMA is not a
gradient) and the averaged EMA is the model that is sampled and registered → MSR moves
memorization-prone samples between shards (on exchange rounds) → the shard assignment is checked.

An exchange round does not average (method.md §3, the published prototype; `msr.exchange_averages`
false, the default): the proxies keep their own weights, EMAs and optimizers into the next round, which
starts without a broadcast, and the global weights and the server optimizer stay as they were. The
FedAvg of the proxies is still computed, for what the round reports (sample grids, `after_round`
hooks), and never loaded back. The last round always averages: it has no exchange, and the run
delivers the average.

Where a proxy's state lives between rounds: in its actor, and on checkpoint rounds also in a file
the actor writes itself (`save_worker_states`; layout in `orchestrator.checkpoint`). The driver never
holds a proxy's state. A replacement for a proxy lost in round r resumes from that proxy's last file
(round c, or the freshly built actor, which is the round-0 state, before the first checkpoint) and
re-runs rounds c+1 … r with the inputs they had: the global weights broadcast in each (their
object-store references, kept by the driver since the last checkpoint; none after a round that did not
average, where the proxy continued from its own weights) and the shard's samples in each.
Only round r's result counts; on the CPU it is bitwise what the lost actor would have returned. So
the checkpoint interval trades the bytes written per round against the rounds a replay re-runs
(at most `mlflow.checkpoint_every` − 1 extra) and the driver's references kept meanwhile.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from memshard.aggregation import ServerState, server_update, weighted_average
from memshard.config import Config
from memshard.errors import MemshardError
from memshard.orchestrator.actor_pool import ActorPool, CallError, Lost
from memshard.orchestrator.checkpoint import check_worker_files, checkpoint_not_written, worker_state_file
from memshard.orchestrator.cluster import ActorResources, place_actors, release
from memshard.orchestrator.settings import server_hyperparameters
from memshard.orchestrator.sharding import (
    Moves,
    apply_moves,
    check_partition,
    destination_rule,
    is_exchange_round,
    reset_skip_counts,
    select_memorized_samples,
)
from memshard.pipeline import SamplingPlan
from memshard.shard_worker.actor import ShardWorker
from memshard.shard_worker.faults import FaultPlan
from memshard.shard_worker.trainer import NonFiniteLossError, RoundResult


@dataclass
class RoundReport:
    round_index: int
    results: list[RoundResult]
    moves: Moves | None
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase
    averaged: bool = True  # False: an exchange round that left each proxy its own weights (msr.exchange_averages)

    @property
    def mean_loss(self) -> float:
        sizes = np.array([len(r.indices) for r in self.results], dtype=np.float64)
        return float(np.dot(sizes, [r.mean_loss_all for r in self.results]) / sizes.sum())

    @property
    def kept_fraction(self) -> float:
        seen = np.array([r.seen_counts.sum() for r in self.results], dtype=np.float64)
        return float(np.dot(seen, [r.kept_fraction for r in self.results]) / max(seen.sum(), 1))

    @property
    def skips_stale(self) -> int:
        """AGC skips against a bank entry written long ago, all shards (shard_worker.agc)."""
        return sum(r.skips_stale for r in self.results)

    @property
    def skips_low_loss(self) -> int:
        """AGC skips against a recent bank entry, all shards."""
        return sum(r.skips_low_loss for r in self.results)

    @property
    def samples_moved(self) -> int:
        return 0 if self.moves is None else len(self.moves.indices)

    @property
    def images_per_second(self) -> float:
        """Aggregate training throughput: images per second summed over the shards."""
        return float(sum(r.images_per_second for r in self.results))


@dataclass(frozen=True)
class RoundInputs:
    """What a proxy trained on in a round: the broadcast (global weights, global EMA or None), as
    object-store references, or None where the round started from the proxies' own weights; and every
    shard's samples. A replay re-runs a round from these."""

    weights_refs: tuple | None
    shards: list[np.ndarray]


class IETDriver:
    """Holds the global weights, the shard assignment and the per-sample tables; runs rounds."""

    def __init__(self, cfg: Config, actors: list, shards: list[np.ndarray], num_samples: int,
                 weights: dict[str, np.ndarray], start_actor: Callable[[int], object]):
        self.cfg = cfg
        # The proxies; one that dies or stalls is replaced in its bundle and resumes its shard (`_restore`).
        self.pool = ActorPool(actors, start_actor, max_restarts=cfg.ray.max_actor_restarts,
                              timeout_s=cfg.ray.round_timeout_s, timeout_setting="ray.round_timeout_s",
                              out_of_restarts=self._out_of_restarts, restore=self._restore)
        self.round_index = 0  # the round being run, for the failure records
        self.shards = shards
        self.num_samples = num_samples
        self.weights = weights
        # With training.ema: the averaged EMA, which starts at the initial weights (as each proxy's does).
        self.ema_weights = dict(weights) if cfg.training.ema else None
        # After a round that did not average: the FedAvg of the proxies (and of their EMAs), reported, never
        # loaded back; None after a round that averaged.
        self.proxy_average: dict[str, np.ndarray] | None = None
        self.proxy_average_ema: dict[str, np.ndarray] | None = None
        self.destination_rule = destination_rule(cfg.msr.rule)
        self.server_hyperparameters = server_hyperparameters(cfg)
        self.server_state = ServerState()  # the server optimizer's moments: checkpointed with the driver
        # MSR's memorization score: skips since the sample's count was last reset (msr.reset, on an exchange).
        self.skips_since_move = np.zeros(num_samples, dtype=np.int64)
        self.skips_total = np.zeros(num_samples, dtype=np.int64)  # over the whole run, for the report
        self.last_loss = np.full(num_samples, np.nan)
        self.rounds_done = 0
        self.failure_events: list[dict] = []
        # Where a replacement resumes from (module docstring): the proxies' files of round `saved_round`
        # (none before the first checkpoint: a fresh actor is the round-0 state), then every round since
        # (kept until the next `save_worker_states`; a caller that never saves keeps every round's).
        self.saved_round = 0
        self.saved_files: list[Path] = []
        self.rounds_since_saved: list[RoundInputs] = []

    @property
    def actors(self) -> list:
        """The live proxy of each shard (replacements included)."""
        return self.pool.actors

    @property
    def restarts(self) -> int:
        """Actors replaced over the run (checkpointed: the budget ray.max_actor_restarts is per run)."""
        return self.pool.restarts

    @property
    def averaged_weights(self) -> dict[str, np.ndarray]:
        """The proxies' average after the last round: the global weights, or after a round that did not
        average, the FedAvg computed for reporting (module docstring)."""
        return self.weights if self.proxy_average is None else self.proxy_average

    @property
    def model_weights(self) -> dict[str, np.ndarray]:
        """The weights of the model this run delivers (sampled, evaluated, registered): the averaged
        EMA with `training.ema`, else the averaged weights."""
        if self.ema_weights is None:
            return self.averaged_weights
        return self.ema_weights if self.proxy_average_ema is None else self.proxy_average_ema

    def exchanges_after(self, round_index: int, is_last: bool) -> bool:
        """MSR moves samples after this round: IET-AGC+ with shards, on its schedule, never after the last."""
        return self.cfg.uses_msr and not is_last and is_exchange_round(round_index, self.cfg.msr.schedule)

    def averages_after(self, round_index: int, is_last: bool) -> bool:
        """The driver averages the proxies after this round unless it is an exchange round that does
        not average (`msr.exchange_averages` false, the published prototype)."""
        return self.cfg.msr.exchange_averages or not self.exchanges_after(round_index, is_last)

    def broadcasts_before(self, round_index: int) -> bool:
        """The proxies start this round from the global weights, unless the round before did not average
        (then each continues from its own). A round before another is never the last."""
        return round_index == 1 or self.averages_after(round_index - 1, is_last=False)

    def run_round(self, round_index: int, is_last: bool) -> RoundReport:
        cfg, seconds = self.cfg, {}
        with _timed(seconds, "broadcast"):
            weights_refs = None
            if self.broadcasts_before(round_index):
                weights_refs = (ray.put(self.weights), None if self.ema_weights is None else ray.put(self.ema_weights))
                ray.get([actor.set_weights.remote(*weights_refs) for actor in self.actors])
            self.rounds_since_saved.append(RoundInputs(weights_refs, list(self.shards)))
        with _timed(seconds, "train"):
            results = self._train_all_shards(round_index)
        for result in results:
            self.skips_since_move[result.indices] += result.skip_counts
            self.skips_total[result.indices] += result.skip_counts
            drawn = result.seen_counts > 0
            self.last_loss[result.indices[drawn]] = result.mean_loss[drawn]
        with _timed(seconds, "gather"):
            local = ray.get([actor.get_weights.remote() for actor in self.actors])
            local_ema = None if self.ema_weights is None else ray.get([actor.get_ema_weights.remote() for actor in self.actors])
        averages = self.averages_after(round_index, is_last)
        with _timed(seconds, "aggregate"):
            sizes = [len(shard) for shard in self.shards]  # the sizes each proxy trained on this round
            ema_average = None if local_ema is None else weighted_average(list(zip(local_ema, sizes, strict=True)))
            if averages:
                self.weights, self.server_state = server_update(
                    cfg.aggregation.server_optimizer, self.weights, list(zip(local, sizes, strict=True)),
                    self.server_state, self.server_hyperparameters)
                if ema_average is not None:
                    self.ema_weights = ema_average
                self.proxy_average = self.proxy_average_ema = None
            else:  # reported only; the global weights and the server optimizer wait for the next average
                self.proxy_average = weighted_average(list(zip(local, sizes, strict=True)))
                self.proxy_average_ema = ema_average
        moves = None
        if self.exchanges_after(round_index, is_last):
            with _timed(seconds, "redistribute"):
                moves = self.redistribute_memorized_samples(round_index)
        check_partition(self.shards, self.num_samples)
        self.rounds_done = round_index
        return RoundReport(round_index, results, moves, seconds, averaged=averages)

    def _train_all_shards(self, round_index: int) -> list[RoundResult]:
        """Every shard's local steps, concurrently; a shard whose actor dies or stalls is re-run on a
        replacement (`ActorPool`) that resumes it from its last saved state and re-runs the rounds since
        (module docstring); only the result tagged with the shard counts."""
        self.round_index = round_index
        steps = self.cfg.iet.local_steps

        def launch(k: int) -> None:
            self.pool.submit(k, "train_round", self.shards[k], steps, tag=k)

        def replay(k: int) -> None:
            """Shard k's replacement (restored by `_restore`) re-runs every round since its saved state."""
            *earlier, current = self.rounds_since_saved
            for past in earlier:
                if past.weights_refs is not None:
                    self.pool.submit(k, "set_weights", *past.weights_refs)
                self.pool.submit(k, "train_round", past.shards[k], steps)  # untagged: its result was used then
            if current.weights_refs is not None:
                self.pool.submit(k, "set_weights", *current.weights_refs)
            launch(k)

        for k in range(len(self.actors)):
            launch(k)
        results: dict[int, RoundResult] = {}
        try:
            for outcome in self.pool.results():
                if isinstance(outcome, Lost):
                    self.failure_events.append({"round": round_index, "shard": outcome.actor, "reason": outcome.reason,
                                                "restart": outcome.restart})
                    replay(outcome.actor)
                elif outcome.tag is not None:
                    results[outcome.actor] = outcome.value
        except CallError as failed:
            if not isinstance(failed.error, NonFiniteLossError):
                raise failed.error from None
            cause = getattr(failed.error, "cause", failed.error)
            raise MemshardError(
                f"shard {failed.actor} produced a non-finite loss at step {getattr(cause, 'step', '?')} in round "
                f"{round_index}; the round was rolled back and the last checkpoint kept: lower training.learning_rate "
                f"or training.grad_clip, or set training.mixed_precision=no"
            ) from None
        return [results[k] for k in range(len(self.actors))]

    def _restore(self, k: int, actor) -> None:
        """A replacement for shard k takes shard k's last saved state (a fresh actor already is the
        round-0 state); `replay` then brings it to this round. Waited for first, so the round's timeout
        counts its work and not a process start (seconds on a loaded node; the generation workers alike)."""
        ray.get(actor.describe.remote())
        if self.saved_files:
            ray.get(actor.load_state_file.remote(str(self.saved_files[k])))

    def _out_of_restarts(self, lost: Lost) -> MemshardError:
        return MemshardError(
            f"shard {lost.actor} failed in round {self.round_index} ({lost.reason}) and the run has used its "
            f"{self.cfg.ray.max_actor_restarts} restarts (ray.max_actor_restarts): the last checkpoint is kept, "
            f"continue with memshard train --resume RUN_ID"
        )

    def redistribute_memorized_samples(self, round_index: int) -> Moves:
        """MSR: each shard's top `msr.fraction` by skip count moves to another shard (method.md §3)."""
        cfg = self.cfg
        selected = select_memorized_samples(self.shards, self.skips_since_move, self.last_loss, cfg.msr.fraction)

        def proxy_losses(candidates: np.ndarray) -> np.ndarray:
            """Every proxy scores every candidate at the same seeded (t, ε), with its local weights."""
            seed = cfg.training.seed * 1000 + round_index
            return np.stack(ray.get([actor.score.remote(candidates, seed) for actor in self.actors]))

        moves = self.destination_rule(selected, proxy_losses)
        self.skips_since_move = reset_skip_counts(self.skips_since_move, self.shards, moves, cfg.msr.reset)
        self.shards = apply_moves(self.shards, moves, self.num_samples)
        return moves

    def save_worker_states(self, directory: str | Path) -> dict:
        """Every proxy writes its state to its file for this round under `directory` (the run's
        checkpoint folder), concurrently; once all are found there this is what a replacement resumes
        from. Returns the manifest: the round, the files' names (relative to `directory`) and sizes."""
        directory = Path(directory).absolute()  # the actors may run in other folders, on other nodes
        names = [worker_state_file(self.rounds_done, k) for k in range(len(self.actors))]
        refs = [actor.save_state.remote(str(directory / name)) for actor, name in zip(self.actors, names, strict=True)]
        sizes = []
        for ref, name in zip(refs, names, strict=True):
            try:
                sizes.append(ray.get(ref))
            except ray.exceptions.RayTaskError as error:
                if not isinstance(error.cause, OSError):
                    raise
                # A proxy could not write (disk full): this round's files are no checkpoint; the last one stands.
                ray.wait(refs, num_returns=len(refs))
                if self.rounds_done != self.saved_round:
                    shutil.rmtree(directory / Path(name).parent, ignore_errors=True)
                raise checkpoint_not_written(directory, directory / name, error.cause) from None
        manifest = {"round": self.rounds_done, "files": names, "bytes": [int(size) for size in sizes]}
        self.saved_files = check_worker_files(directory, manifest)
        self.saved_round, self.rounds_since_saved = self.rounds_done, []
        return manifest

    def state(self, directory: str | Path) -> dict:
        """The driver's part of a checkpoint, after every proxy has written its own state under
        `directory` (`save_worker_states`): the manifest of those files, not their contents."""
        worker_files = self.save_worker_states(directory)
        return {
            "rounds_done": self.rounds_done,
            "weights": self.weights,
            "ema_weights": self.ema_weights,
            "shards": list(self.shards),
            "skips_since_move": self.skips_since_move,
            "skips_total": self.skips_total,
            "last_loss": self.last_loss,
            "restarts": self.restarts,
            "server_state": self.server_state.to_checkpoint(),
            "worker_files": worker_files,
        }

    def load_state(self, state: dict, directory: str | Path) -> None:
        """Continue from a checkpoint in `directory`: driver tables, assignment, weights, and every
        proxy's state from the file its manifest names."""
        self.rounds_done = int(state["rounds_done"])
        self.weights = state["weights"]
        if self.ema_weights is not None:  # the checkpoint's config is the run's, so it has them
            self.ema_weights = state["ema_weights"]
        self.shards = [np.asarray(s, dtype=np.int64) for s in state["shards"]]
        check_partition(self.shards, self.num_samples)
        self.skips_since_move = state["skips_since_move"]
        self.skips_total = state["skips_total"]
        self.last_loss = state["last_loss"]
        self.pool.restarts = int(state["restarts"])
        # Checkpoints from before the server optimizers were plain FedAvg, whose state is a round count.
        saved = state.get("server_state")
        self.server_state = ServerState(rounds=self.rounds_done) if saved is None else ServerState.from_checkpoint(saved)
        if "workers" in state:  # written before the proxies wrote their own files: their states inline
            ray.get([actor.load_state_dict.remote(ws) for actor, ws in zip(self.actors, state["workers"], strict=True)])
            self.save_worker_states(directory)  # from here on, the files are what a replacement resumes from
            return
        self.saved_files = check_worker_files(Path(directory).absolute(), state["worker_files"])
        ray.get([actor.load_state_file.remote(str(path)) for actor, path in zip(self.actors, self.saved_files, strict=True)])
        self.saved_round, self.rounds_since_saved = self.rounds_done, []

    def generate(self, weights: dict[str, np.ndarray], plan: SamplingPlan) -> np.ndarray:
        """The plan's images from a pipeline of `weights`, made by the proxies between rounds (batch b on
        proxy b mod K), in batch order: (M, C, H, W) uint8, the images `pipeline.generate_plan` makes in one
        process (on CPUs bitwise). Not retried: a proxy lost here fails the run, which resumes from its
        last checkpoint (a replacement would first have to replay its shard's rounds)."""
        weights_ref = ray.put(weights)
        count, proxies = len(plan.batches()), len(self.actors)
        work = [(actor, list(range(k, count, proxies))) for k, actor in enumerate(self.actors) if k < count]
        parts = ray.get([actor.generate.remote(weights_ref, plan, batches) for actor, batches in work])
        images: list[np.ndarray] = [None] * count
        for (_, batches), made in zip(work, parts, strict=True):
            for b, batch_images in zip(batches, made, strict=True):
                images[b] = batch_images
        return np.concatenate(images)

    def placement(self) -> list[dict]:
        """Where each proxy runs: shard, node and device."""
        return ray.get([actor.describe.remote() for actor in self.actors])


@contextmanager
def start_shard_driver(cfg: Config, images: np.ndarray, shards: list[np.ndarray],
                       faults: FaultPlan | None = None) -> Iterator[tuple[IETDriver, ActorResources]]:
    """One ShardWorker per shard, placed on the cluster, and the driver over them; released on exit.

    The images go into the object store once and every actor reads them by reference. All proxies
    start from the same weights; the driver can replace an actor that dies (in its bundle).
    `faults` is the test-only fault plan (shard_worker.faults); None in a real run.
    """
    images_ref = ray.put(images)
    actors, group = [], None
    try:
        actors, group, resources, start_actor = place_actors(
            cfg, len(shards), ShardWorker, lambda k, r: (cfg, images_ref, k, max(1, int(r.cpus)), faults))
        weights = ray.get(actors[0].get_weights.remote())
        yield IETDriver(cfg, actors, shards, len(images), weights, start_actor), resources
    finally:
        release(actors, group)  # the driver replaces dead actors in this same list


@contextmanager
def _timed(seconds: dict[str, float], phase: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start
