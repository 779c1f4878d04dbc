"""`memshard` command line: parse, dispatch, and turn user-fixable errors into one line and exit 2."""

from __future__ import annotations

import argparse
import sys

from memshard.errors import MemshardError, one_line

# The MODEL forms memshard.orchestrator.registry resolves, written out so that --help imports no MLflow.
MODEL_HELP = ("models:/NAME/VERSION or NAME/VERSION, models:/NAME or NAME (latest version), runs:/RUN_ID/model, "
              "or a folder holding a saved pipeline")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in memshard's form: one `error: ...` line, exit 2 (no usage block)."""

    def error(self, message: str):
        print(f"error: {one_line(message)} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memshard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="prepare and inspect image datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prepare = data_commands.add_parser("prepare", help="write a canonical Parquet dataset")
    prepare.add_argument("source", help="'digits', an image folder, a Parquet file/folder (HF layout), or .npy/.npz")
    prepare.add_argument("--out", required=True, help="output dataset directory")
    prepare.add_argument("--resolution", type=int, help="resize and centre-crop to R x R (multiple of 8)")
    prepare.add_argument("--channels", type=int, choices=(1, 3), help="convert to 1 (gray) or 3 (RGB) channels")
    inspect = data_commands.add_parser("inspect", help="count, shape, labels and exact duplicates")
    inspect.add_argument("path", help="a prepared dataset directory")

    train = commands.add_parser("train", help="train a diffusion model with IET-AGC+ on Ray, log it to MLflow")
    train.add_argument("--config", help="a YAML or TOML file of settings (sections: data, model, training, ...)")
    train.add_argument("--preset", help="tiny, digits (default) or cifar32")
    train.add_argument("--data", help="a prepared dataset dir or any source 'memshard data prepare' takes")
    train.add_argument("--shards", type=int, help="number of shards K (one proxy actor each)")
    train.add_argument("--rounds", type=int, help="number of rounds")
    train.add_argument("--local-steps", type=int, help="optimizer steps per proxy per round")
    train.add_argument("--method", help="ddpm, iet, iet-agc or iet-agc-plus (default)")
    train.add_argument("--balanced-by-label", action="store_true", default=None,
                       help="spread every label evenly over the shards (the dataset must have labels)")
    train.add_argument("--experiment", help="MLflow experiment name")
    train.add_argument("--register-as", help="registered model name (a new version per run)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="any setting, e.g. --set msr.rule=least-familiar (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    train.add_argument("--resume", metavar="RUN_ID",
                       help="continue an interrupted run from its last checkpoint, into the same MLflow run")

    evaluate = commands.add_parser("evaluate", help="measure how often a model copies its training images, and FID")
    evaluate.add_argument("model", help=MODEL_HELP)
    evaluate.add_argument("--data", help="training data to scan (default: the dataset the model's training run used)")
    evaluate.add_argument("--num-images", type=int, default=65_536, help="generations M (default 65,536, published)")
    evaluate.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="default ddpm (published)")
    evaluate.add_argument("--sampling-steps", type=int,
                          help="default: the training timesteps (1000) for ddpm, 100 for ddim")
    evaluate.add_argument("--batch", type=int, default=256, help="generations per batch on the device")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--feature-space", default="inception-v3",
                          help="FID features: inception-v3 (needs the fid extra), "
                               "pixels-random-projection-64 (offline), or none")
    evaluate.add_argument("--inception-weights", metavar="FILE", help="a local copy of the FID Inception weights")
    evaluate.add_argument("--copy-threshold", type=float, default=0.5,
                          help="a generation copies its nearest training image when r < this (default 0.5)")
    evaluate.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    evaluate.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    evaluate.add_argument("--experiment", default="memshard",
                          help="experiment for a model with no training run (else the training run's)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")

    compare = commands.add_parser("compare", help="evaluation results side by side (table, markdown, MLflow)")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="evaluation run ids, or training runs (their latest evaluation)")
    compare.add_argument("--out", metavar="FILE", help="also write the markdown table here")
    compare.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")

    unlearn = commands.add_parser("unlearn", help="remove a forget set from a trained model, register it, audit it")
    unlearn.add_argument("model", help=MODEL_HELP)
    unlearn.add_argument("--forget", required=True, metavar="SPEC",
                         help="sample ids (comma-separated), a file of ids, image files or a folder, or evaluation:RUN_ID")
    unlearn.add_argument("--method", default="siss", help="siss (default), naive, neggrad, erasediff or retrain")
    unlearn.add_argument("--steps", type=int, help="optimizer steps (default 300, the published MNIST-scale setting)")
    unlearn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="lam, c, learning_rate, batch_size, grad_clip, seed, audit.num_images, ... (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except MemshardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


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
    if args.command == "unlearn":
        from memshard.commands.unlearn import run_unlearn_command

        return run_unlearn_command(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
