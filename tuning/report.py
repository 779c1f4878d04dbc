"""What a sweep leaves behind: the table of trials and points, the trade-off picture, the chosen
setting as a config file `memshard train --config` takes. Pure functions of the trials' outcomes."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from memshard.config import WHERE_SETTINGS, Config, GuardConfig, to_dict
from memshard.tuning.choice import UNGUARDED, Choice, Point, guard_suffix, pareto_front
from memshard.tuning.space import SAMPLING_SECTION, Trial


@dataclass
class TrialOutcome:
    trial: Trial
    status: str = "QUEUED"  # QUEUED, RUNNING, FINISHED, FAILED
    points: list[Point] = field(default_factory=list)
    run_id: str | None = None  # its training run (the nested run)
    model_uri: str | None = None  # the model its training run logged (the final round's weights)
    round_pipelines: dict[int, str] = field(default_factory=dict)  # round -> saved pipeline folder
    error: str | None = None


def point_rows(outcomes: list[TrialOutcome], choice: Choice | None) -> list[dict]:
    """Every point of every trial, with whether it is within the budget, on the front, chosen."""
    everything = [p for o in outcomes for p in o.points if o.status != "FAILED"]
    front = set(pareto_front(everything))
    within = set(choice.within) if choice else set()
    rows = []
    for outcome in outcomes:
        for p in outcome.points:
            rows.append({"trial": p.trial, "setting": outcome.trial.describe(), "guard": p.guard,
                         "status": outcome.status, "round": p.round, "training_images_nearly_copied": p.near_copied,
                         "generations_near_copies": round(p.near_copy_fraction, 4), "frechet": round(p.frechet, 4),
                         "coverage": p.coverage, "shards": p.shards, "optimizer_steps": p.compute,
                         "reference": outcome.trial.reference and choice is not None and p == choice.budget.reference,
                         "within_budget": p in within, "pareto": p in front,
                         "chosen": choice is not None and p == choice.chosen})
    return rows


def trial_rows(outcomes: list[TrialOutcome], choice: Choice | None) -> list[dict]:
    """One row per trial: its setting, status, and its best point within the budget (else its last)."""
    within = set(choice.within) if choice else set()
    rows = []
    for outcome in outcomes:
        cfg = outcome.trial.cfg
        best = next((p for p in (choice.within if choice else ()) if p.trial == outcome.trial.name), None)
        shown = best or (outcome.points[-1] if outcome.points else None)
        rows.append({
            "trial": outcome.trial.name, "setting": outcome.trial.describe(), "status": outcome.status,
            "reference": outcome.trial.reference, "shards": cfg.iet.shards, "local_steps": cfg.iet.local_steps,
            "rounds": cfg.iet.rounds, "points": len(outcome.points),
            "points_within_budget": sum(p in within for p in outcome.points),
            "shown_round": shown.round if shown else None, "shown_guard": shown.guard if shown else None,
            "shown_is": "best within budget" if best else
            ("last point (none within budget)" if shown else ""),
            "training_images_nearly_copied": shown.near_copied if shown else None,
            "frechet": round(shown.frechet, 4) if shown else None,
            "run_id": outcome.run_id or "", "error": outcome.error or "",
        })
    return rows


def as_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def as_markdown(rows: list[dict], columns: tuple[str, ...]) -> str:
    def cell(value) -> str:
        return "" if value is None else str(value).replace("|", "/")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


TRIAL_COLUMNS = ("trial", "setting", "status", "shards", "local_steps", "rounds", "points", "points_within_budget",
                 "shown_round", "shown_guard", "training_images_nearly_copied", "frechet", "error")


def chosen_config(cfg: Config, rounds: int, guard: GuardConfig | None = None) -> str:
    """`cfg` stopped at `rounds`, sampled with `guard` (None: its own guard section), as YAML for
    `memshard train --config` (where-settings left out)."""
    tree = json.loads(json.dumps(to_dict(cfg)))  # tuples to lists: YAML writes plain sequences
    tree["iet"]["rounds"] = rounds
    if guard is not None:
        tree[SAMPLING_SECTION] = asdict(guard)
    for dotted in WHERE_SETTINGS:  # where to run and log, never what to train: `memshard train` asks for them
        section, key = dotted.split(".")
        tree[section].pop(key, None)
    return yaml.safe_dump(tree, sort_keys=False)


def tradeoff_figure(outcomes: list[TrialOutcome], choice: Choice | None, path: Path, title: str) -> None:
    """Copying against quality: every trial's points joined in round order, the Pareto front, the
    budget line, the reference and the choice (or the closest point, when none is within budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    panels = ((axes[0], "near_copied", 1.0, "training images nearly copied"),
              (axes[1], "near_copy_fraction", 100.0, "generations that are near copies (%)"))
    everything = [p for o in outcomes for p in o.points if o.status != "FAILED"]
    colours = iter(plt.cm.tab20.colors * 10)
    for outcome in outcomes:
        for guard in dict.fromkeys(p.guard for p in outcome.points):  # a line per guard setting, in round order
            points = [p for p in outcome.points if p.guard == guard]
            colour = "black" if outcome.trial.reference and guard == UNGUARDED else next(colours)
            style = "--" if outcome.status == "FAILED" else "-"
            label = (f"{outcome.trial.name} {outcome.trial.describe()}" + guard_suffix(guard)
                     + (" [failed]" if outcome.status == "FAILED" else ""))
            for axis, key, scale, _ in panels:
                xs = [p.frechet for p in points]
                ys = [getattr(p, key) * scale for p in points]
                axis.plot(xs, ys, style, marker="o", markersize=3, linewidth=1, color=colour, label=label)
    for axis, key, scale, ylabel in panels:
        front = pareto_front(everything, measure=key)
        if front:
            axis.step([p.frechet for p in front], [getattr(p, key) * scale for p in front], where="post",
                      color="tab:red", linewidth=2, alpha=0.6, label="Pareto front")
        if choice is not None:
            reference = choice.budget.reference
            axis.plot(reference.frechet, getattr(reference, key) * scale, "*", markersize=16, color="black",
                      label=f"reference: {reference.trial} round {reference.round}")
            axis.axvline(choice.budget.max_frechet, color="grey", linestyle="--", linewidth=1,
                         label=f"budget: Fréchet +{choice.budget.max_quality_loss:.0%}")
            marked = choice.chosen or choice.closest
            if marked is not None:
                axis.plot(marked.frechet, getattr(marked, key) * scale, "o", markersize=14, fillstyle="none",
                          color="tab:green" if choice.chosen else "tab:orange", markeredgewidth=2,
                          label=("chosen" if choice.chosen else "closest (over budget)") +
                          f": {marked.trial} round {marked.round}{guard_suffix(marked.guard)}")
        axis.set_xlabel("classifier-space Fréchet distance (lower is better)")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
