"""Actor sizing from the nodes a cluster reports (pure functions: plain dicts in, numbers out)."""

import pytest

from memshard.config import build_config
from memshard.errors import MemshardError
from memshard.orchestrator.cluster import ActorResources, check_feasible, largest_packable_share, plan_actor_resources


def test_gpus_auto_shares_each_gpu_among_ceil_k_over_g_actors():
    nodes = [{"CPU": 16.0, "GPU": 1.0}]
    for shards, share in [(1, 1.0), (2, 0.5), (4, 0.25), (10, 0.1), (3, 0.33)]:
        resources = plan_actor_resources(build_config("tiny", sets=[f"iet.shards={shards}"]), shards, nodes)
        assert resources.gpus == share and resources.cpus == 1.0
    two_gpus = plan_actor_resources(build_config("tiny"), 4, [{"CPU": 8.0, "GPU": 2.0}])
    assert two_gpus.gpus == 0.5


def test_cpu_only_cluster_shares_cpus_and_requests_no_gpu():
    resources = plan_actor_resources(build_config("tiny"), 16, [{"CPU": 2.0}])
    assert resources.gpus == 0 and resources.cpus == 0.12 and "GPU" not in resources.bundle()
    check_feasible(resources, 16, [{"CPU": 2.0}])


def test_cpu_share_packs_onto_uneven_nodes():
    assert largest_packable_share([2.0, 1.0, 1.0], 3) == 1.0  # 4/3 would not fit on the 1-CPU nodes
    assert largest_packable_share([8.0, 8.0], 3) == 4.0
    check_feasible(ActorResources(1.0, 0.0, {}), 4, [{"CPU": 2.0}, {"CPU": 1.0}, {"CPU": 1.0}])


def test_impossible_requests_are_clear_errors():
    with pytest.raises(MemshardError, match="no node can hold one shard actor"):
        check_feasible(ActorResources(1.0, 1.0, {}), 2, [{"CPU": 4.0}])
    with pytest.raises(MemshardError, match="the nodes hold 2; use --shards 2 or fewer"):
        check_feasible(ActorResources(2.0, 0.0, {}), 3, [{"CPU": 2.0}, {"CPU": 3.0}])
    with pytest.raises(MemshardError, match="no node can hold"):
        check_feasible(ActorResources(0.5, 0.0, {"accelerator_x": 1.0}), 1, [{"CPU": 2.0}])
