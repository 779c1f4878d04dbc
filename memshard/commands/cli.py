"""`memshard` command line: parse, dispatch, and turn user-fixable errors into one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings

from memshard.config import DEFAULT_PRESET, GUARD_MODES, METHODS, NEAR_COPY_QUANTILE, PRESETS, GuardConfig, IETConfig
from memshard.errors import MemshardError, one_line
from memshard.evaluation.memorization import DEFAULT_R_COPY_THRESHOLD

# The MODEL forms memshard.orchestrator.registry resolves, written out so that --help imports no MLflow.
# orchestrator.tracking.DEFAULT_TRACKING_URI, quoted (importing it would load MLflow for --help)
TRACKING_URI_HELP = "MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db, in the workspace root)"
MODEL_HELP = ("models:/NAME/VERSION or NAME/VERSION, models:/NAME or NAME (latest version), runs:/RUN_ID/model, "
              "or a folder holding a saved pipeline")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in memshard's form: one `error: ...` line, exit 2 (no usage block)."""

    def error(self, message: str):
        print(f"error: {one_line(message)} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memshard", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    verbose = _Parser(add_help=False)  # -v also after the command name
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    commands.add_parser = _with_parents(commands.add_parser, [verbose])

    data = commands.add_parser("data", help="prepare and inspect image datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prepare = data_commands.add_parser("prepare", help="write a canonical Parquet dataset")
    prepare.add_argument("source", help="'digits', an image folder, a Parquet file/folder (HF layout), or .npy/.npz")
    prepare.add_argument("--out", required=True, help="output dataset directory")
    prepare.add_argument("--resolution", type=int, help="resize and centre-crop to R x R (multiple of 8)")
    prepare.add_argument("--channels", type=int, choices=(1, 3), help="convert to 1 (gray) or 3 (RGB) channels")
    inspect = data_commands.add_parser("inspect", help="count, shape, labels and exact duplicates")
    inspect.add_argument("path", help="a prepared dataset directory")

    train = commands.add_parser("train", help="train a diffusion model on Ray (ddpm with the EMA, or an IET method "
                                              "on K shard actors), log it to MLflow")
    train.add_argument("--config", help="a YAML or TOML file of settings (sections: data, model, training, ...)")
    train.add_argument("--preset", help=_listed(PRESETS, DEFAULT_PRESET))
    train.add_argument("--data", help="a prepared dataset dir or any source 'memshard data prepare' takes")
    train.add_argument("--shards", type=int, help="number of shards K: one proxy actor each for the IET methods; "
                                                  "ddpm trains one model with their compute (K x local steps)")
    train.add_argument("--rounds", type=int, help="number of rounds")
    train.add_argument("--local-steps", type=int, help="optimizer steps per proxy per round")
    train.add_argument("--method", help=_listed(METHODS, IETConfig.method))
    train.add_argument("--balanced-by-label", action="store_true", default=None,
                       help="spread every label evenly over the shards (the dataset must have labels)")
    train.add_argument("--experiment", help="MLflow experiment name")
    train.add_argument("--register-as", help="registered model name (a new version per run)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="any setting, e.g. --set msr.rule=least-familiar (repeatable)")
    train.add_argument("--max-quality-loss", metavar="LOSS",
                       help="the registered round's quality budget: Fréchet at most this much above the run's best "
                            "measured round, as 10%% or 0.1 (selection.max_quality_loss)")
    train.add_argument("--register-last-round", action="store_true", default=None,
                       help="register the last round, not the one that copies least within the budget "
                            "(the curve is still measured and logged)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    train.add_argument("--resume", metavar="RUN_ID",
                       help="continue an interrupted run from its last checkpoint, into the same MLflow run")

    evaluate = commands.add_parser("evaluate", help="measure how often a model copies its training images, and quality")
    evaluate.add_argument("model", help=MODEL_HELP)
    evaluate.add_argument("--data", help="training data to scan (default: the dataset the model's training run used)")
    evaluate.add_argument("--protocol", choices=("auto", "published", "quick"), default="auto",
                          help="published: 65,536 generations, ddpm with the training timesteps (1000); quick: 1,000 "
                               "generations, ddim 100; auto (default): published when the Ray cluster has GPUs, "
                               "else quick")
    evaluate.add_argument("--num-images", type=int, help="generations M (default: the protocol's)")
    evaluate.add_argument("--sampler", choices=("ddpm", "ddim", "dpm-solver++"), help="default: the protocol's")
    evaluate.add_argument("--sampling-steps", type=int,
                          help="default: the protocol's; else the training timesteps for ddpm, 100 for ddim, "
                               "20 for dpm-solver++")
    evaluate.add_argument("--batch", type=int, help="generations per batch (default: 256 published, 50 quick)")
    evaluate.add_argument("--workers", type=_count_or_auto, default=None, metavar="N|auto",
                          help="generation workers on the Ray cluster (default auto: one per GPU, else one per CPU)")
    evaluate.add_argument("--batch-timeout", type=float, metavar="SECONDS",
                          help="a generation worker with no batch back within this is replaced, as a dead one is "
                               "(default: an hour)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--feature-space", default="auto",
                          help="quality features: auto (default: inception-v3 where torch-fidelity and its weights are "
                               "installed, else the training set's own classifier for labelled data, else none), "
                               "inception-v3, classifier, pixels-random-projection-64, or none")
    evaluate.add_argument("--inception-weights", metavar="FILE", help="a local copy of the FID Inception weights")
    evaluate.add_argument("--r-copy-threshold", type=float, default=DEFAULT_R_COPY_THRESHOLD,
                          help=f"a generation is an r-copy of its nearest training image when r < this (default {DEFAULT_R_COPY_THRESHOLD})")
    evaluate.add_argument("--device", default="auto",
                          help="where generation runs: auto (the cluster's GPUs when it has them), cpu or cuda")
    evaluate.add_argument("--guard", metavar="|".join(GUARD_MODES),
                          help="also make every generation through the copy guard and measure both side by side "
                               "(default: the model's own guard section, else off)")
    evaluate.add_argument("--guard-quantile", type=float, metavar="Q",
                          help=f"the guard's near-copy quantile, {NEAR_COPY_QUANTILE} (the calibration) or more: "
                               "stricter only (default: the model's guard section's)")
    evaluate.add_argument("--guard-scale", type=float, metavar="S",
                          help="guidance: how far x0-hat moves, in units of its shortfall to the threshold "
                               f"(default: the model's guard section's, else {GuardConfig.scale:g})")
    evaluate.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    evaluate.add_argument("--ray-address", metavar="HOST:PORT|auto",
                          help="the Ray cluster to generate on (default: RAY_ADDRESS, else a local Ray instance)")
    evaluate.add_argument("--experiment", default="memshard",
                          help="experiment for a model with no training run (else the training run's)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")

    compare = commands.add_parser("compare", help="evaluation results side by side (table, markdown, MLflow)")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="evaluation run ids, or training runs (their latest evaluation)")
    compare.add_argument("--out", metavar="FILE", help="also write the markdown table here")
    compare.add_argument("--tracking-uri", help=TRACKING_URI_HELP)

    unlearn = commands.add_parser("unlearn", help="remove a forget set from a trained model, register it, audit it")
    unlearn.add_argument("model", help=MODEL_HELP)
    unlearn.add_argument("--forget", required=True, metavar="SPEC",
                         help="sample ids (comma-separated), a file of ids, image files or a folder, or evaluation:RUN_ID "
                              "(the training images that evaluation found near copies of; evaluation:RUN_ID:r-copies "
                              "for its r-copies)")
    unlearn.add_argument("--method", default="siss", help="siss (default), naive, neggrad, erasediff or retrain")
    unlearn.add_argument("--steps", type=int,
                         help="the cap on optimizer steps (default 300); it stops earlier once the forget checks find "
                              "the forget set no longer reproduced")
    unlearn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="rho, forget_scale_mode, c, check_every, lam, learning_rate, batch_size, seed, "
                              "audit.num_images, ... (repeatable)")
    tune = commands.add_parser("tune", help="sweep the settings that trade copying against quality on Ray Tune, "
                                             "choose the one with the fewest near copies within a quality budget")
    tune.add_argument("--preset", help=f"{_listed(PRESETS, DEFAULT_PRESET)}: the base of every trial")
    tune.add_argument("--data", help="a prepared dataset dir or any source 'memshard data prepare' takes (labelled)")
    tune.add_argument("--max-quality-loss", default="10%", metavar="LOSS",
                      help="the quality budget: Fréchet at most this much above ddpm's at the full length, "
                           "as 10%% or 0.1 (default 10%%)")
    space = tune.add_mutually_exclusive_group()
    space.add_argument("--trials", type=int, help="N trials from the default space (default 8)")
    space.add_argument("--grid", metavar="FILE", help="a YAML/JSON/TOML file of `section.key: [values]`: every "
                                                      "combination is a trial")
    tune.add_argument("--num-images", type=int, default=500, help="generations per point (default 500)")
    tune.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps per generation (default 50)")
    tune.add_argument("--eval-every", type=int, help="rounds between a trial's points (default: a fifth of the "
                                                     "reference's rounds)")
    tune.add_argument("--register-as", help="register the chosen trial's model as a new version of NAME")
    tune.add_argument("--experiment", help="MLflow experiment of the sweep and its trials")
    tune.add_argument("--seed", type=int, default=0, help="seed of the default space's draws and the generations")
    tune.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="a setting for every trial, e.g. --set training.batch_size=32 (repeatable)")
    return parser


def _with_parents(add_parser, parents):
    def add(name, **kwargs):
        return add_parser(name, parents=[*parents, *kwargs.pop("parents", [])], **kwargs)

    return add


def _listed(names, default: str) -> str:
    """The library's own names for a help text, e.g. 'tiny, digits (default) or cifar32'."""
    names = [f"{name} (default)" if name == default else name for name in names]
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _count_or_auto(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive count or auto")
    return int(text)


VERBOSE_HELP = "also show the libraries' output (Ray, MLflow, diffusers logs and warnings)"
# At default verbosity: memshard's own lines and progress bars only. Set before the libraries are
# imported (they read these then), and only where the user has not set them.
QUIET_ENVIRONMENT = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" bars
    "MLFLOW_LOGGING_LEVEL": "ERROR",  # "Creating initial MLflow database tables...", "Experiment ... does not exist"
    "DIFFUSERS_VERBOSITY": "error",  # notices such as "install accelerate"
    "RAY_LOGGER_LEVEL": "error",  # "Started a local Ray instance", token notices (ray.init's logging_level)
    "RAY_LOG_TO_DRIVER": "0",  # actors' own output; their errors still reach the driver as exceptions
}


def quiet_terminal(verbose: bool, libraries: bool = True) -> None:
    """The one place the terminal is quieted: library logs, bars and warnings off unless `verbose`.
    `libraries` False: the command imports none of them (data), so nothing is imported here either."""
    logging.getLogger("memshard").setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    # Ray Tune's own lines (its loggers, a failed trial's traceback): `memshard tune` reports trials itself.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    if libraries:
        import mlflow.types.responses  # noqa: F401  importing it turns MLflow's event stream back on: import it first
        from diffusers.utils import logging as diffusers_logging
        from mlflow.utils.logging_utils import disable_logging

        diffusers_logging.set_verbosity_error()  # also when diffusers was imported before DIFFUSERS_VERBOSITY was set
        diffusers_logging.disable_progress_bar()  # "Loading pipeline components..."
        disable_logging()  # MLflow's "Successfully registered model ..." (memshard prints the version itself)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises KeyboardInterrupt, so both take one path: the runs open in the
    command end FAILED or KILLED as their context managers unwind, Ray is shut down (`ray_session`), and
    `main` prints one line."""


_signals_received: list[int] = []  # what `main` reports: a library may re-raise a bare KeyboardInterrupt (Ray's get)


def _raise_terminated(signum, frame):
    _signals_received.append(signum)
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_terminal(args.verbose, libraries=args.command != "data")
    # The one place signals are decided. Ray's own SIGTERM handlers (installed by ray.init) would exit
    # past the open runs; `ray_session` puts this one back. Ray Tune's SIGINT handler would end the sweep
    # as if it had finished: it is turned off, so Ctrl+C interrupts `tune` as every other command.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    _signals_received.clear()
    try:
        return run_command(args)
    except MemshardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated) or signal.SIGTERM in _signals_received
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)  # the shell's code for the signal
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(args: argparse.Namespace) -> int:
    # Each command's module is imported only when it runs: `memshard data inspect` needs no Ray or torch.
    if args.command == "data":
        from memshard.commands.data import run_data_command

        return run_data_command(args)
    if args.command == "train":
        from memshard.commands.train import run_train_command

        return run_train_command(args)
    if args.command in ("evaluate", "compare"):
        from memshard.commands.evaluate import run_evaluation_command

        return run_evaluation_command(args)
    if args.command == "tune":
        from memshard.commands.tune import run_tune_command

        return run_tune_command(args)
    if args.command == "unlearn":
        from memshard.commands.unlearn import run_unlearn_command

        return run_unlearn_command(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
