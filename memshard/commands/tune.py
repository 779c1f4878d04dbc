"""`memshard tune`: flags -> the trials (`tuning.space`) -> the sweep on Ray Tune (`tuning.sweep`) ->
the table, the choice (or the closest trial, flagged over budget), the config file, the parent run."""

from __future__ import annotations

import argparse

from memshard.commands.checkpoint_choice import parse_quality_loss
from memshard.config import DEFAULT_PRESET, check_model_name
from memshard.errors import MemshardError
from memshard.orchestrator.tracking import redact_uri, ui_command
from memshard.tuning.choice import guard_suffix
from memshard.tuning.space import sweep_space
from memshard.tuning.sweep import SweepResult, SweepSettings, run_sweep


def run_tune_command(args: argparse.Namespace) -> int:
    settings = SweepSettings(max_quality_loss=parse_quality_loss(args.max_quality_loss), num_images=args.num_images,
                             sampling_steps=args.sampling_steps, eval_every=args.eval_every,
                             register_as=args.register_as, seed=args.seed)
    settings.evaluate_settings()  # checked before the trials are built
    if args.eval_every is not None and args.eval_every < 1:
        raise MemshardError(f"--eval-every {args.eval_every}: need at least 1 round")
    if args.register_as is not None:
        check_model_name(args.register_as, "--register-as")
    preset = args.preset or DEFAULT_PRESET
    space = sweep_space(preset, args.data, args.set, grid_file=args.grid, trials=args.trials, seed=args.seed,
                        experiment=args.experiment)
    result = run_sweep(space, settings, preset, tune_output=args.verbose)
    print_result(result)
    return 0


def print_result(result: SweepResult) -> None:
    print(result.table, end="")
    choice = result.choice
    if choice is None:
        print("no choice: the reference trial failed, so there is no quality budget to measure against")
    elif choice.chosen is not None:
        p = choice.chosen
        print(f"chosen: {p.trial} stopped at round {p.round}{guard_suffix(p.guard)}: {p.near_copied:g} training images nearly copied, "
              f"{100 * p.near_copy_fraction:.1f}% of generations near copies, Fréchet {p.frechet:.3f} "
              f"(budget {choice.budget.max_frechet:.3f}: reference {choice.budget.reference.trial} round "
              f"{choice.budget.reference.round} at {choice.budget.reference.frechet:.3f} "
              f"+{choice.budget.max_quality_loss:.0%})")
    else:
        p = choice.closest
        print(f"no trial within budget (Fréchet <= {choice.budget.max_frechet:.3f}); closest: {p.trial} round "
              f"{p.round}{guard_suffix(p.guard)}, Fréchet {p.frechet:.3f}, {p.near_copied:g} nearly copied — not chosen, nothing registered")
    if result.config_file is not None:
        print(f"config file: {result.config_file} (memshard train --config {result.config_file})")
    if result.registered is not None:
        print(f"registered model: {result.registered[0]} version {result.registered[1]}")
    failed = [o.trial.name for o in result.outcomes if o.status == "FAILED"]
    if failed:
        print(f"failed trials: {', '.join(failed)} (their runs hold error.txt)")
    print(f"MLflow parent run: {result.parent_run_id}")
    print(f"open the MLflow UI: {ui_command(redact_uri(result.tracking_uri))}")
