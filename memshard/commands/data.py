"""`memshard data prepare | inspect`: the data layer, printed."""

from __future__ import annotations

import argparse

from memshard import data

MAX_DUPLICATE_GROUPS_SHOWN = 10  # the largest groups; the rest are counted in one line


def run_data_command(args: argparse.Namespace) -> int:
    if args.data_command == "prepare":
        out = data.prepare_dataset(args.source, args.out, args.resolution, args.channels)
        print(format_inspection(data.inspect_dataset(out)))
        print(f"wrote {out}")
    else:
        print(format_inspection(data.inspect_dataset(args.path)))
    return 0


def format_inspection(report: dict, max_groups: int = MAX_DUPLICATE_GROUPS_SHOWN) -> str:
    """`inspect_dataset`'s report as the lines `memshard data inspect` prints."""
    c, h, w = report["shape"]
    lines = [f"dataset      {report['path']}",
             f"samples      {report['count']} images, {c}x{h}x{w} uint8",
             f"fingerprint  {report['fingerprint']}"]
    hist = ", ".join(f"{k}: {v}" for k, v in report["label_histogram"].items()) or "none"
    lines.append(f"labels       {hist} (unlabeled: {report['unlabeled']})")
    groups = report["duplicate_groups"]
    lines.append(f"duplicates   {len(groups)} groups of identical images, "
                 f"{sum(len(g) for g in groups)} samples")
    lines += [f"  {len(g)} x  {', '.join(g)}" for g in groups[:max_groups]]
    if len(groups) > max_groups:
        lines.append(f"  ... and {len(groups) - max_groups} more groups")
    return "\n".join(lines)
