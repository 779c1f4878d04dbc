"""`memshard data prepare | inspect`: the data layer, printed."""

from __future__ import annotations

import argparse

from memshard import data


def run_data_command(args: argparse.Namespace) -> int:
    if args.data_command == "prepare":
        out = data.prepare_dataset(args.source, args.out, args.resolution, args.channels)
        print(data.format_inspection(data.inspect_dataset(out)))
        print(f"wrote {out}")
    else:
        print(data.format_inspection(data.inspect_dataset(args.path)))
    return 0
