"""Evaluations side by side: one row per evaluation (from the params and metrics it logged), one
column per measure, and notes that say what the numbers mean and where runs are not like for like.

No MLflow here: `memshard.commands.evaluate` finds the runs and logs the table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from memshard.evaluation.memorization import THRESHOLDS

# Old name -> name: evaluations logged before the r-copy measure was named apart from the others.
RENAMED = {"copy_threshold": "r_copy_threshold", "copied_training_samples": "r_copied_training_samples"}


@dataclass(frozen=True)
class CompareRow:
    eval_run_id: str
    source_run_id: str | None
    method: str
    train_steps: int | None  # optimizer steps over all proxies: K x rounds x local steps (ddpm: 1 x rounds x K*S)
    num_images: int
    sampler: str  # "ddim 100"
    seed: int
    r_copy_threshold: float
    r_neighbors: int | None  # k in r = d1^2 / mean(d1^2..dk^2); None: not logged
    dataset_fingerprint: str | None
    feature_space: str  # "none": no FID
    fid: float | None
    metrics: dict[str, float]  # the memorization metrics (FID apart)


def compare_row(eval_run_id: str, params: dict[str, str], metrics: dict[str, float], source_run_id: str | None,
                source_method: str | None, train_params: dict[str, str]) -> CompareRow:
    """A row from what `memshard evaluate` logged (params, metrics) and its training run's params;
    evaluations logged before r-copies had their name are read under today's names (RENAMED)."""
    params = {RENAMED.get(key, key): value for key, value in params.items()}
    metrics = {RENAMED.get(key, key): value for key, value in metrics.items()}
    steps = [train_params.get(f"iet.{key}") for key in ("shards", "rounds", "local_steps")]
    space = params.get("feature_space", "none")
    return CompareRow(
        eval_run_id=eval_run_id,
        source_run_id=source_run_id,
        method=train_params.get("method", source_method or "?"),
        train_steps=int(np.prod([int(s) for s in steps])) if all(steps) else None,
        num_images=int(params["num_images"]),
        sampler=f"{params['sampler']} {params['sampling_steps']}",
        seed=int(params["seed"]),
        r_copy_threshold=float(params["r_copy_threshold"]),
        r_neighbors=int(params["r_neighbors"]) if "r_neighbors" in params else None,
        dataset_fingerprint=params.get("dataset.fingerprint"),
        feature_space=space,
        fid=metrics.get(f"fid.{space}"),
        metrics={key: value for key, value in metrics.items() if not key.startswith("fid.")},
    )


@dataclass(frozen=True)
class CompareTable:
    rows: tuple[CompareRow, ...]
    columns: tuple[str, ...]
    cells: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...]

    def text(self) -> str:
        """For a terminal: aligned columns, then the notes."""
        widths = [max(len(c), *(len(row[i]) for row in self.cells)) for i, c in enumerate(self.columns)]

        def line(values) -> str:
            return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

        return "\n".join([line(self.columns), line(["-" * w for w in widths]), *map(line, self.cells), "",
                          *self.notes])

    def markdown(self) -> str:
        rows = ["| " + " | ".join(self.columns) + " |", "|" + " --- |" * len(self.columns)]
        rows += ["| " + " | ".join(row) + " |" for row in self.cells]
        return "\n".join(["# memshard compare", "", *rows, "", *[f"- {note}" for note in self.notes], ""])

    def to_json(self) -> dict:
        return {"rows": [dataclasses.asdict(row) for row in self.rows], "notes": list(self.notes)}


def compare_table(rows: list[CompareRow]) -> CompareTable:
    """The table of `rows`; a FID column per feature space, since FIDs of different spaces do not compare."""
    spaces = sorted({row.feature_space for row in rows if row.feature_space != "none"})
    columns = ("method", "train run", "train steps", "eval run", "M", "sampler", "seed",
               *[f"MQ@{t}" for t in THRESHOLDS], "NN1/NN2<1/3", "r-copied train imgs",
               "near-copied train imgs", *[f"FID [{s}]" for s in spaces])
    cells = tuple(tuple(_cell(row, column) for column in columns) for row in rows)
    return CompareTable(tuple(rows), columns, cells, tuple(_notes(rows)))


def _cell(row: CompareRow, column: str) -> str:
    m = row.metrics
    if column.startswith("MQ@"):
        t = column[3:]
        return f"{int(m[f'mq_{t}_count'])} ({100 * m[f'mq_{t}_fraction']:.2f}%)"
    if column.startswith("FID ["):
        return f"{row.fid:.2f}" if column == f"FID [{row.feature_space}]" and row.fid is not None else "-"
    return {
        "method": row.method,
        "train run": (row.source_run_id or "-")[:8],
        "train steps": "-" if row.train_steps is None else f"{row.train_steps:,}",
        "eval run": row.eval_run_id[:8],
        "M": f"{row.num_images:,}",
        "sampler": row.sampler,
        "seed": str(row.seed),
        "NN1/NN2<1/3": f"{int(m['nn_ratio_copy_count'])} ({100 * m['nn_ratio_copy_fraction']:.2f}%)",
        "r-copied train imgs": str(int(m["r_copied_training_samples"])),
        "near-copied train imgs": (str(int(m["near_copied_training_samples"]))
                                   if "near_copied_training_samples" in m else "-"),
    }[column]


def _notes(rows: list[CompareRow]) -> list[str]:
    ks = sorted({row.r_neighbors for row in rows if row.r_neighbors is not None})
    k = str(ks[0]) if len(ks) == 1 else "k"  # several k: the like-for-like note below says so
    notes = [f"MQ@t: generations with r < t, r = d1^2 / mean(d1^2..d{k}^2) over the {k} nearest training images, "
             f"pixels in [0, 1]; NN1/NN2<1/3: nearest / second-nearest distance ratio; r-copied train imgs: training "
             f"images that some generation with r < {rows[0].r_copy_threshold} has as its nearest; near-copied "
             "train imgs: training images some generation is a near copy of (calibrated on real images; "
             "-: too few distinct images)."]
    for key, what in (("num_images", "number of generations"), ("sampler", "sampler/steps"), ("seed", "seed"),
                      ("dataset_fingerprint", "training data"), ("train_steps", "training compute"),
                      ("r_copy_threshold", "r-copy threshold"), ("r_neighbors", "number of neighbours k in r")):
        if len({str(getattr(row, key)) for row in rows}) > 1:
            notes.append(f"not like for like: the {what} differs between these runs")
    if len({row.feature_space for row in rows}) > 1:
        notes.append("FIDs in different feature spaces are in separate columns: they are not comparable")
    return notes
