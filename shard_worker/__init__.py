"""The proxy-model side of memshard: model construction, local training with AGC/TAA, scores.

`ProxyTrainer` is a plain class (usable and testable without Ray); `ShardWorker` is the same class
as a Ray actor. No MLflow and no driver logic live here: a worker trains, scores and returns numbers.
"""

from memshard.model import build_scheduler, build_unet
from memshard.shard_worker.trainer import ProxyTrainer, RoundResult

__all__ = ["ProxyTrainer", "RoundResult", "build_scheduler", "build_unet"]
