"""Pure functions over state dicts: weighted averaging (FedAvg) and EMA. No Ray, no torch."""

from memshard.aggregation.average import AggregationError, ema_update, weighted_average

__all__ = ["AggregationError", "ema_update", "weighted_average"]
