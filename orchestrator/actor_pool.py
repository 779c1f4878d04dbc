"""K Ray actors in one placement group, each replaceable: the one place that decides when an actor
has failed and how it is replaced.

Calls run on the actors with a timeout. An actor has failed when it dies (RayActorError,
ObjectLostError) or stalls: it has calls in flight and returns none of them within `timeout_s` of
the later of its last result and the moment it became busy. A failed actor is killed and a fresh one
started in the same bundle (`cluster.place_actors`' `start_actor`), `restore`d by the caller, and the
calls it lost are handed back to the caller to send again; past `max_restarts` over the pool's
life the caller's one-line error is raised instead.

Both drivers use it and keep only their own part: the training rounds (`orchestrator.rounds`: the
replacement resumes its shard's state from the start of the round and re-runs it) and generation
(`orchestrator.generation`: the lost batches are made again).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import ray


@dataclass(frozen=True)
class Done:
    """A call that returned: actor k, the caller's tag for the call, its value."""

    actor: int
    tag: object
    value: object


@dataclass(frozen=True)
class Lost:
    """Actor k failed and was replaced: the tags of the calls it lost, why (one phrase), and which
    restart of the pool's budget this was (1 for the first)."""

    actor: int
    tags: tuple
    reason: str
    restart: int


class CallError(Exception):
    """A call raised inside its actor, which lives on: the caller decides what the error means."""

    def __init__(self, actor: int, tag: object, error: Exception):
        super().__init__(f"actor {actor}: {error}")
        self.actor, self.tag, self.error = actor, tag, error


class ActorPool:
    """The actors (`actors[k]` is always the live one), their calls in flight, and the restart budget.

    `timeout_setting` names the setting that sets `timeout_s` (for the failure reason); `restore(k,
    actor)` readies a fresh actor k before calls are sent again (None: nothing to restore);
    `out_of_restarts(lost)` is the caller's one-line error once the budget is spent.
    """

    def __init__(self, actors: list, start_actor: Callable[[int], object], *, max_restarts: int, timeout_s: float,
                 timeout_setting: str, out_of_restarts: Callable[[Lost], Exception],
                 restore: Callable[[int, object], None] | None = None):
        self.actors = actors
        self.start_actor = start_actor
        self.max_restarts, self.restarts = max_restarts, 0
        self.timeout_s, self.timeout_setting = timeout_s, timeout_setting
        self.out_of_restarts, self.restore = out_of_restarts, restore
        self.pending: dict = {}  # ObjectRef -> (actor k, tag), in the order sent
        self.deadlines: dict[int, float] = {}  # busy actor k -> when it has stalled

    def submit(self, k: int, method: str, *args, tag: object = None) -> None:
        """Call `method(*args)` on actor k; its result comes back from `results` with `tag`."""
        self.pending[getattr(self.actors[k], method).remote(*args)] = (k, tag)
        self.deadlines.setdefault(k, time.monotonic() + self.timeout_s)

    def results(self) -> Iterator[Done | Lost]:
        """Each call's outcome as it comes, until none is in flight (the caller may submit more between
        them): Done, or Lost once a failed actor has been replaced (send its tags again)."""
        while self.pending:
            wait_s = max(0.0, min(self.deadlines.values()) - time.monotonic())
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=wait_s)
            if not ready:
                now = time.monotonic()
                for k in [k for k, deadline in self.deadlines.items() if deadline <= now]:
                    yield self._replace(k, f"no result within {self.timeout_setting} = {self.timeout_s:g} s")
                continue
            k, tag = self.pending.pop(ready[0])
            try:
                value = ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as error:
                yield self._replace(k, f"actor died ({type(error).__name__})", failed=(tag,))
                continue
            except ray.exceptions.RayTaskError as error:
                raise CallError(k, tag, error) from error
            self._progressed(k)
            yield Done(k, tag, value)

    def _progressed(self, k: int) -> None:
        """Actor k returned a result: its clock starts again while it has calls left, stops when idle."""
        if any(owner == k for owner, _ in self.pending.values()):
            self.deadlines[k] = time.monotonic() + self.timeout_s
        else:
            self.deadlines.pop(k, None)

    def _replace(self, k: int, reason: str, failed: tuple = ()) -> Lost:
        """Actor k failed: its calls (`failed`, the one that reported it, then those in flight) are
        dropped, it is killed, and a fresh one takes its bundle."""
        lost = [ref for ref, (owner, _) in self.pending.items() if owner == k]
        tags = failed + tuple(self.pending.pop(ref)[1] for ref in lost)
        self.deadlines.pop(k, None)
        self.restarts += 1
        failure = Lost(k, tags, reason, self.restarts)
        if self.restarts > self.max_restarts:
            raise self.out_of_restarts(failure)
        ray.kill(self.actors[k], no_restart=True)
        actor = self.start_actor(k)
        if self.restore is not None:
            self.restore(k, actor)
        self.actors[k] = actor
        return failure
