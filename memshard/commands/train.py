"""`memshard train`: flags -> Config -> `orchestrator.train`, its curve measured and the round that copies
least within the budget registered (`checkpoint_choice`) -> the curve, the choice, the run id and model URI
printed."""

from __future__ import annotations

import argparse
import sys

from memshard.commands.checkpoint_choice import CheckpointChoice, parse_quality_loss
from memshard.config import DEFAULT_PRESET, Config, build_config, build_partial
from memshard.errors import MemshardError
from memshard.orchestrator.tracking import ui_command
from memshard.orchestrator.train import resume_config, train


def run_train_command(args: argparse.Namespace) -> int:
    overrides = {
        "data.path": args.data,
        "iet.shards": args.shards,
        "iet.rounds": args.rounds,
        "iet.local_steps": args.local_steps,
        "iet.method": args.method,
        "data.balanced_by_label": args.balanced_by_label,
        "mlflow.experiment": args.experiment,
        "mlflow.register_as": args.register_as,
        "selection.max_quality_loss": None if args.max_quality_loss is None else parse_quality_loss(args.max_quality_loss),
        "selection.register": "last" if args.register_last_round else None,
    }
    if args.resume:
        if args.config or args.preset:
            raise MemshardError("--resume continues a run with its saved configuration: drop --config / --preset")
        cfg = resume_config(args.resume, overrides, args.set)
    else:
        cfg = build_config(args.preset or DEFAULT_PRESET, args.config, overrides=overrides, sets=args.set)
    note = ddpm_shards_note(cfg, build_partial(overrides, args.set).get("iet.shards"))  # --set wins, as in cfg
    if note:
        print(note, file=sys.stderr)
    choice = CheckpointChoice(cfg)
    choice.prepare()
    result = train(cfg, show_progress=not args.no_progress, resume_run_id=args.resume, hooks=choice.hooks())
    choice.remove_candidates()
    print("\n".join(choice.summary()))
    print(f"run id: {result.run_id}")
    print(f"registered model: {result.registered_name} version {result.registered_version}")
    print(f"model uri: models:/{result.registered_name}/{result.registered_version}")
    print(f"open the MLflow UI: {ui_command(result.tracking_uri)}")
    return 0


def ddpm_shards_note(cfg: Config, shards_asked: int | None) -> str | None:
    """ddpm, the default, folds K shards into one model with their compute (config.fold_baseline_to_equal_compute):
    a user who asked for K > 1 shards, say on a cluster of K GPUs, learns at once that one actor trains."""
    if cfg.iet.method != "ddpm" or not shards_asked or shards_asked < 2:
        return None
    return (f"--method ddpm trains one model, not {shards_asked} shard actors: {cfg.iet.local_steps} steps per round, "
            f"the compute of {shards_asked} shards; --method iet-agc-plus trains one actor per shard")
