"""The proxy-model side of memshard: a proxy's local training with AGC and TAA, and its per-sample scores.

`trainer.ProxyTrainer` is a plain class (usable and testable without Ray); `actor.ShardWorker` runs it
as a Ray actor, one per shard. The UNet and noise schedule come from the model layer (`memshard.model`).
No MLflow and no driver logic live here: a worker trains, scores and returns numbers.
"""
