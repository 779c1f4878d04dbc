"""Pure functions over state dicts: weighted averaging (FedAvg) and server-side optimizers
(FedAvgM, FedAdam, FedYogi). No Ray, no torch."""

from memshard.aggregation.average import AggregationError, weighted_average
from memshard.aggregation.server_optimizers import (
    SERVER_OPTIMIZERS,
    ServerState,
    fedadam,
    fedavg,
    fedavgm,
    fedyogi,
    server_optimizer,
    server_optimizer_settings,
    server_update,
)

__all__ = [
    "AggregationError",
    "SERVER_OPTIMIZERS",
    "ServerState",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedyogi",
    "server_optimizer",
    "server_optimizer_settings",
    "server_update",
    "weighted_average",
]
