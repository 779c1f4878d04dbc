"""`memshard` command line: parse, dispatch, and turn user-fixable errors into one line and exit 2."""

from __future__ import annotations

import argparse
import sys

from orchestrator.errors import MemshardError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memshard", description=__doc__)
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
    if args.command == "data":
        from orchestrator import data

        if args.data_command == "prepare":
            out = data.prepare_dataset(args.source, args.out, args.resolution, args.channels)
            print(data.format_inspection(data.inspect_dataset(out)))
            print(f"wrote {out}")
        else:
            print(data.format_inspection(data.inspect_dataset(args.path)))
        return 0
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
