"""Ray: join or start a cluster, size the shard actors, place them, and fail fast when they cannot fit.

Ray leaves an actor whose resources no node can ever provide pending forever; memshard checks the
request against the cluster first and waits on the placement group with a timeout, so the user
gets a one-line error instead of a hang.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
import torch
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from memshard.config import Config
from memshard.errors import MemshardError


def resolve_ray_address(requested: str | None) -> str | None:
    """Where a command runs on Ray, by the one rule every command follows: the address asked for now
    (a flag or `--set ray.address=...`) > RAY_ADDRESS (which `ray job submit` sets) > None, a local
    instance of our own. Never a saved run's address: a where-setting is asked for again each time.
    `auto` joins the cluster already running on this machine."""
    return requested or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def ray_session(requested: str | None) -> Iterator[None]:
    """Ray connected for the block, at `resolve_ray_address(requested)`; a Ray this call started is shut
    down on the way out. Inside a Ray driver or task that is already connected (a Tune trial, the
    tests' cluster) it joins nothing and shuts nothing down."""
    if ray.is_initialized():
        yield
        return
    address = resolve_ray_address(requested)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            _check_address_answers(address)
            ray.init(address=address)  # actor output reaches this terminal unless RAY_LOG_TO_DRIVER=0 (memshard.commands.cli)
        else:
            # A local instance sized to this machine, without a dashboard: never silently some other
            # cluster running here (`auto` asks for that).
            ray.init(address="local", include_dashboard=False)
    except (ConnectionError, OSError, ValueError) as error:  # OSError: refused, no route; ValueError: a malformed address
        raise MemshardError(f"cannot reach the Ray cluster at {address} ({error}): check ray.address "
                            "(evaluate: --ray-address) or RAY_ADDRESS") from None
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        # ray.init replaced the process's SIGTERM handler with its own, which exits (or, for a local
        # instance, kills Ray's processes under the running driver) past every open run and context:
        # the handler the caller chose comes back (memshard's command line: SIGTERM as SIGINT).
        signal.signal(signal.SIGTERM, sigterm)
    try:
        yield
    finally:
        ray.shutdown()


def _check_address_answers(address: str, timeout_s: float = 5.0) -> None:
    """A plain TCP connect to a `host:port` (or `ray://host:port`) address first: Ray itself retries a
    closed port for minutes before it gives up."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port, auto or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise ConnectionError(f"nothing answers on {host}:{port}: {error.strerror or error}") from None


@dataclass(frozen=True)
class ActorRole:
    """What a group of actors is, for the one-line errors: its name, the flag that sets how many, and
    the settings (by resource) that size one actor (none: memshard sizes it, nothing to lower)."""

    name: str
    count_flag: str
    settings: tuple[tuple[str, str], ...] = ()


SHARD_ACTOR = ActorRole("shard actor", "--shards", (("CPU", "ray.cpus_per_actor"), ("GPU", "ray.gpus_per_actor")))


@dataclass(frozen=True)
class ActorResources:
    cpus: float
    gpus: float
    custom: dict[str, float]

    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus, **self.custom}
        if self.gpus > 0:
            bundle["GPU"] = self.gpus
        return bundle


def plan_actor_resources(cfg: Config, num_shards: int, nodes: list[dict[str, float]]) -> ActorResources:
    """Resources for one shard actor; `auto` shares the nodes' CPUs and GPUs among the K actors."""
    custom = dict(cfg.ray.actor_resources)
    usable = [n for n in nodes if all(n.get(name, 0.0) >= amount for name, amount in custom.items())]
    total_gpus = sum(n.get("GPU", 0.0) for n in usable)
    if cfg.ray.gpus_per_actor == "auto":
        # K actors on G GPUs: ceil(K/G) actors share each GPU. Rounded down to 1/100 for Ray.
        gpus = math.floor(100 / math.ceil(num_shards / total_gpus)) / 100 if total_gpus >= 1 else 0.0
    else:
        gpus = float(cfg.ray.gpus_per_actor)
    if cfg.ray.cpus_per_actor == "auto":
        if gpus > 0:
            usable = [n for n in usable if n.get("GPU", 0.0) >= gpus]
        cpus = largest_packable_share([n.get("CPU", 0.0) for n in usable], num_shards)
        if gpus > 0:
            cpus = min(cpus, 1.0)  # a GPU actor needs one CPU to feed it; more would idle
    else:
        cpus = float(cfg.ray.cpus_per_actor)
    return ActorResources(cpus=cpus, gpus=gpus, custom=custom)


def largest_packable_share(node_cpus: list[float], count: int) -> float:
    """The largest CPU amount c (in 1/100s) such that `count` actors of c CPUs fit on these nodes."""
    # Nodes with no CPUs (a head kept free of actors) hold none and offer no candidate share.
    candidates = [cpus / m for cpus in node_cpus if cpus > 0 for m in range(1, count + 1)]
    fitting = [c for c in candidates if sum(math.floor(n / c + 1e-9) for n in node_cpus) >= count]
    return max(0.01, math.floor(100 * max(fitting, default=0.01)) / 100)


def check_feasible(resources: ActorResources, num_shards: int, nodes: list[dict[str, float]],
                   role: ActorRole = SHARD_ACTOR, beside: int = 0) -> None:
    """Raise when no placement could ever hold the K actors and `beside` more bundles like theirs (a
    Ray Tune trial's measurement holds one on a GPU cluster: `memshard.tuning.sweep`). Identical
    bundles pack node by node."""
    bundle = resources.bundle()

    def holds(node: dict[str, float]) -> int:
        return min(math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in bundle.items())

    capacity = sum(holds(node) for node in nodes)
    if capacity == 0:
        lacking = [name for name, amount in bundle.items() if all(n.get(name, 0.0) + 1e-9 < amount for n in nodes)]
        lacking = lacking or [name for name, amount in bundle.items() if any(n.get(name, 0.0) + 1e-9 < amount for n in nodes)]
        raise MemshardError(
            f"no node can hold one {role.name} needing {bundle}: nodes offer "
            f"{_offers(nodes, bundle)}; {_lower(lacking, role, ', or ')}add nodes with more {' and '.join(lacking)}"
        )
    if capacity < num_shards + beside:
        # The resources that stop each node from holding one more actor.
        limiting = {name for node in nodes for name, amount in bundle.items()
                    if math.floor(node.get(name, 0.0) / amount + 1e-9) == holds(node)}
        also = f" and {beside} more bundle{'s' * (beside != 1)} like theirs" if beside else ""
        fewer = f"use {role.count_flag} {capacity - beside} or fewer, " if capacity > beside else ""
        raise MemshardError(
            f"{num_shards} {role.name}s{also} needing {bundle} each do not fit: the nodes hold {capacity}; "
            f"{fewer}{_lower(sorted(limiting), role, ', ')}or add nodes"
        )


def _offers(nodes: list[dict[str, float]], bundle: dict[str, float]) -> list[dict[str, float]]:
    """What each node offers of the requested resources, largest first (Ray lists nodes in no fixed order)."""
    offers = [{name: amount for name, amount in node.items() if name in bundle} for node in nodes]
    return sorted(offers, key=lambda offer: sorted(offer.items()), reverse=True)


def _lower(names: list[str], role: ActorRole, then: str) -> str:
    """The settings that ask for these resources, as a fix followed by `then` (empty: none to lower)."""
    if not role.settings:
        return ""
    settings = dict(role.settings)
    fixes = [f"lower {settings[n]} (auto fits the nodes)" if n in settings else f"lower or drop {n} in ray.actor_resources"
             for n in names]
    return " / ".join(fixes) + then


def assigned_device() -> str:
    """Where this Ray task or actor computes: cuda when Ray assigned it a GPU and torch can use it, else
    cpu. Ray hides the node's GPUs from a process that reserved none, and a fake GPU (a node that
    declares num_gpus without one) is no CUDA device."""
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def node_resources() -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def place_actors(cfg: Config, num_shards: int, actor_class, make_args, role: ActorRole = SHARD_ACTOR,
                 resources: ActorResources | None = None):
    """Start K actors in one placement group; `make_args(k, resources)` gives actor k's arguments.
    `resources` None: `plan_actor_resources` sizes them from `cfg.ray`.

    Called from inside a placement group (a Ray Tune trial, whose group reserves a bundle per actor:
    `memshard.tuning.sweep`), the actors go into that group's last K bundles, sized by them: a second
    group would need the trial's resources twice over and deadlock a cluster the trials fill.

    Returns (actors, placement group, resources, start_actor) where `start_actor(k)` starts a
    replacement for actor k in the same bundle (used when an actor dies). The group is None when it is
    the caller's own (so `release` leaves it alone).
    """
    current = get_current_placement_group()
    if current is not None:
        group, owned = current, None
        first_bundle, resources = _bundles_for_actors(current, num_shards, role)
    else:
        nodes = node_resources()
        resources = resources or plan_actor_resources(cfg, num_shards, nodes)
        check_feasible(resources, num_shards, nodes, role)
        group = owned = placement_group([resources.bundle()] * num_shards, strategy=cfg.ray.placement_strategy)
        first_bundle = 0
        ready, _ = ray.wait([group.ready()], timeout=cfg.ray.placement_timeout_s)
        if not ready:
            remove_placement_group(group)
            raise MemshardError(
                f"the cluster did not free {num_shards} x {resources.bundle()} within {cfg.ray.placement_timeout_s:g} s "
                f"(other jobs hold them?): retry later, use fewer {role.count_flag}, or raise ray.placement_timeout_s"
            )

    def start_actor(k: int):
        return actor_class.options(
            num_cpus=resources.cpus,
            num_gpus=resources.gpus,
            resources=resources.custom or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=first_bundle + k),
        ).remote(*make_args(k, resources))

    return [start_actor(k) for k in range(num_shards)], owned, resources, start_actor


def _bundles_for_actors(group: PlacementGroup, count: int, role: ActorRole) -> tuple[int, ActorResources]:
    """The first of the last `count` bundles of the caller's group, and the resources of one actor:
    the bundle itself (they must all be alike)."""
    specs = group.bundle_specs
    if len(specs) < count:
        raise MemshardError(f"this runs in a placement group of {len(specs)} bundles, too few for {count} "
                            f"{role.name}s (one bundle each): reserve a bundle per actor")
    mine = specs[len(specs) - count:]
    if any(spec != mine[0] for spec in mine):
        raise MemshardError(f"the placement group's last {count} bundles differ ({mine}): give every {role.name} "
                            "the same bundle")
    spec = {name: float(amount) for name, amount in mine[0].items() if name != "memory"}
    cpus, gpus = spec.pop("CPU", 0.0), spec.pop("GPU", 0.0)
    return len(specs) - count, ActorResources(cpus=cpus, gpus=gpus, custom=spec)


def release(actors: list, group) -> None:
    for actor in actors:
        ray.kill(actor)
    if group is not None:
        remove_placement_group(group)
