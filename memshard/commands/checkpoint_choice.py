"""`memshard train`'s checkpoint choice: the run measures its own copying-against-quality curve and
registers the round that copies least within a quality budget of its best (README "Which round is
registered"; settings: the `selection` section).

Every `selection.every` rounds and at the last, inside the run while the proxies wait, the weights
the run delivers are measured (`evaluation.curve_point.measure`, the measurement of tune's trials and
the efficacy bench): `selection.num_images` seeded generations made by the shard actors
(`RoundEnd.generate`: the images one process would make), near copies against the training images
calibrated on held-out real ones as `memshard evaluate` calibrates them, and Fréchet in the default
quality space. Each point goes to MLflow (metrics `selection.*`, step = round) and to CURVE_FILE in
the run's checkpoint folder. The weights of a measured round that may still be chosen are kept there
too (`selection/round_NNNN.npz`); those of a round that never can be are deleted: its Fréchet is
above the budget of the best point so far, and the best only gets better. At the end the choice
(`tuning.choice.choose`: tune's rule, with the run's best point as the reference) gives train() the
weights to log and register. The folder survives a failure, so `--resume` continues the curve; it
is removed once the model is logged.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np

from memshard.config import Config, check_quality_loss
from memshard.data import load_dataset, resolve_dataset
from memshard.errors import MemshardError
from memshard.evaluation.curve_point import Data, evaluation_rounds, measure
from memshard.evaluation.evaluate import EvaluateSettings, Generation
from memshard.evaluation.quality import default_quality_space
from memshard.files import replace_file
from memshard.guard import distinct_rows
from memshard.model import resolve_device
from memshard.orchestrator.tracking import tracker
from memshard.orchestrator.train import RoundEnd, RunHooks, checkpoint_dir
from memshard.tuning.choice import Choice, Point, best_quality_budget, choose

FOLDER = "selection"  # under the run's checkpoint folder
CURVE_FILE = "curve.json"
REGISTERED_ROUND_TAG = "memshard.registered_round"


def parse_quality_loss(text: str) -> float:
    """`10%` or `0.1`: the quality given up against the reference (`--max-quality-loss`), as a fraction."""
    given = text.strip()
    try:
        value = float(given[:-1]) / 100 if given.endswith("%") else float(given)
    except ValueError:
        raise MemshardError(f"--max-quality-loss {text[:40]!r} is not a fraction: write 10% or 0.1") from None
    return check_quality_loss(value, f"--max-quality-loss {text[:40]!r}")


def measured_rounds(cfg: Config) -> set[int]:
    """Every `selection.every`-th round and the last; none with `selection.every` 0."""
    return evaluation_rounds(cfg.iet.rounds, cfg.selection.every) if cfg.selection.every else set()


class CheckpointChoice:
    """The curve of one run, the weights still in the running, and at the end the round registered."""

    def __init__(self, cfg: Config, say: Callable[[str], None] = lambda line: print(line, file=sys.stderr)):
        self.cfg, self.say = cfg, say
        self.rounds = measured_rounds(cfg)
        self.points: dict[int, Point] = {}
        self.data: Data | None = None
        self.space = None
        self.space_name = ""
        self.unavailable: str | None = None if self.rounds else "selection.every = 0"  # why no curve
        self.device = resolve_device("auto").type  # the k-NN scan and the quality measure, in this process
        self.folder: Path | None = None  # the run's, known once it runs
        self.choice: Choice | None = None
        self.registered_round: int | None = None

    def prepare(self) -> None:
        """Before the run: the data and the quality space (the training set's classifier is trained, or
        read from its cache, now), or why the run cannot measure its curve (the last round is registered)."""
        if self.unavailable:
            return
        cfg = self.cfg
        dataset = load_dataset(resolve_dataset(cfg.data.path, cfg.data.resolution, cfg.data.channels, cfg.data.cache_dir))
        if len(distinct_rows(dataset)) < 3:
            self.unavailable = f"{dataset.path} has fewer than 3 distinct images: near copies cannot be calibrated"
            return
        space = default_quality_space(dataset, self.device)
        if space.space is None:
            self.unavailable = space.reason
            return
        self.data, self.space, self.space_name = Data(dataset, dataset, "full"), space.space, space.space.name

    def hooks(self) -> RunHooks:
        return RunHooks(after_round=self.after_round, final_model=self.final_model)

    # ------------------------------------------------------------ inside the run

    def after_round(self, end: RoundEnd) -> None:
        self._open_folder()
        round_index = end.round_index
        # A resumed run re-runs the rounds after its last checkpoint: their points are measured again.
        self.points = {r: p for r, p in self.points.items() if r < round_index}
        if self.unavailable or round_index not in self.rounds:
            return
        cfg, sel = self.cfg, self.cfg.selection
        settings = EvaluateSettings(protocol="quick", num_images=sel.num_images, sampler=sel.sampler,
                                    sampling_steps=sel.sampling_steps, batch_size=sel.batch_size,
                                    seed=cfg.training.seed, feature_space=None)

        def generate(plan):
            return Generation(end.generate(end.model_weights, plan), end.generation_device,
                              {"workers": cfg.iet.shards, "where": "the run's shard actors"})

        figures = measure(cfg, end.model_weights, self.data, settings, self.space, self.device, generate).figures
        point = Point("run", round_index, float(figures["copied_near"]), float(figures["generations_near_copies"]),
                      float(figures["frechet"]), figures["coverage"], cfg.iet.shards,
                      float(round_index * cfg.iet.shards * cfg.iet.local_steps))
        self.points[round_index] = point
        tracker.log_metrics({"selection.near_copied_training_images": point.near_copied,
                             "selection.near_copy_fraction": point.near_copy_fraction,
                             "selection.frechet": point.frechet}, step=round_index)
        if round_index < cfg.iet.rounds:  # the last round's weights are the run's checkpoint already
            replace_file(self._weights_file(round_index), lambda file: np.savez(file, **end.model_weights))
        self._prune()
        replace_file(self.folder / CURVE_FILE, lambda file: file.write(json.dumps(
            {"space": self.space_name, "points": [asdict(p) for p in self.points.values()]}).encode()))
        self.say(f"round {round_index}: {point.near_copied:.0f} training images nearly copied "
                 f"({point.near_copy_fraction:.1%} of {sel.num_images} generations), Fréchet {point.frechet:.1f} "
                 f"({self.space_name})")

    def final_model(self, last_weights: dict) -> dict:
        """The weights train() logs and registers: the chosen round's, or the last round's with
        `selection.register` last, without a curve, or with no point within the budget."""
        self._open_folder()
        cfg, last = self.cfg, self.cfg.iet.rounds
        budget = best_quality_budget(self.points.values(), cfg.selection.max_quality_loss)
        self.choice = None if budget is None else choose(self.points.values(), budget)
        chosen = self.chosen_round
        self.registered_round = last if cfg.selection.register == "last" or chosen is None else chosen
        tracker.set_tags({REGISTERED_ROUND_TAG: self.registered_round})
        tracker.log_metrics({"selection.registered_round": self.registered_round})
        tracker.log_dict({"registered_round": self.registered_round, "chosen_round": chosen,
                          "rule": self.rule(), "register": cfg.selection.register,
                          "max_quality_loss": cfg.selection.max_quality_loss, "space": self.space_name,
                          "why_no_curve": self.unavailable,
                          "budget": None if budget is None else {"max_frechet": budget.max_frechet,
                                                                 "min_coverage": budget.min_coverage,
                                                                 "best_round": budget.reference.round},
                          "points": [asdict(p) for p in sorted(self.points.values(), key=lambda p: p.round)]},
                         "selection.json")
        if self.registered_round == last:
            return last_weights
        with np.load(self._weights_file(self.registered_round)) as saved:
            return {name: saved[name] for name in saved.files}

    @property
    def chosen_round(self) -> int | None:
        """The round the rule chose (None: no choice made, or no round within the budget)."""
        return None if self.choice is None or self.choice.chosen is None else self.choice.chosen.round

    def remove_candidates(self) -> None:
        """Once the model is logged: the kept weights are no longer needed to resume."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    # ------------------------------------------------------------ the terminal

    def rule(self) -> str:
        # Ties in near copies go to the earlier round: tune's rule (less compute), here the earlier stop,
        # already within the budget; a later round that copies as much buys quality the budget did not ask for.
        return (f"fewest training images nearly copied among the rounds with Fréchet within "
                f"+{self.cfg.selection.max_quality_loss:.0%} of the run's best (and class coverage no worse); "
                f"ties: the earlier round")

    def summary(self) -> list[str]:
        """The curve and the choice, as lines for the terminal."""
        if self.unavailable:
            return [f"registered the last round (round {self.registered_round}): no curve measured ({self.unavailable})"]
        within = set() if self.choice is None else {p.round for p in self.choice.within}
        lines = [f"{'round':>5}  {'nearly copied':>13}  {'near-copy %':>11}  {'Fréchet':>9}  within budget",
                 *(f"{p.round:>5}  {p.near_copied:>13.0f}  {p.near_copy_fraction:>11.1%}  {p.frechet:>9.2f}  "
                   f"{'yes' if p.round in within else 'no'}" for p in sorted(self.points.values(), key=lambda p: p.round))]
        chosen = self.chosen_round
        if self.cfg.selection.register == "last":
            lines.append(f"registered the last round (round {self.registered_round}, --register-last-round); "
                         f"the rule would choose round {chosen}")
        elif chosen is None:
            lines.append(f"registered the last round (round {self.registered_round}): no round within the budget")
        else:
            lines.append(f"registered round {chosen} of {self.cfg.iet.rounds}: {self.rule()}; Fréchet in {self.space_name}")
        return lines

    # ------------------------------------------------------------ files

    def _open_folder(self) -> None:
        """The run's folder, and on a resume the curve measured before it stopped."""
        if self.folder is not None:
            return
        self.folder = checkpoint_dir(self.cfg, mlflow.active_run().info.run_id) / FOLDER
        curve = self.folder / CURVE_FILE
        if curve.is_file():
            self.points = {p["round"]: Point(**p) for p in json.loads(curve.read_text())["points"]}

    def _weights_file(self, round_index: int) -> Path:
        return self.folder / f"round_{round_index:04d}.npz"

    def _prune(self) -> None:
        """Delete the weights of every round that can no longer be chosen (module notes)."""
        budget = best_quality_budget(self.points.values(), self.cfg.selection.max_quality_loss)
        for point in self.points.values():
            if budget is None or not point.frechet <= budget.max_frechet:
                self._weights_file(point.round).unlink(missing_ok=True)


