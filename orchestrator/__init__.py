"""The Ray driver: the training rounds over shard actors (`train`, `rounds`), the shard split and MSR
(`sharding`), cluster placement (`cluster`), checkpoints, MLflow tracking, the registered pyfunc model and
which model a name means (`registry`), and evaluation's generation workers (`generation`).

The command line lives in `memshard.commands`, the configuration and data in `memshard`."""
