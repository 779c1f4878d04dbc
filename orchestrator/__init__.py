"""The Ray driver of memshard: CLI, configuration, data, rounds, redistribution, MLflow."""
