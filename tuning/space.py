"""The sweep's trials: the settings that trade copying against quality, each trial a full training
configuration, every one checked as `memshard train` checks it before any work.

Training length is in every trial twice over: each trial is evaluated every few rounds (several
points per run: stopping early), and its number of rounds is a setting like any other. The reference
is ddpm at the base configuration's full length (the preset's rounds, or the rounds --set gives):
always a trial, whatever the grid says, because the quality budget is measured against it.

The default space (`--trials N`): ddpm (the reference; its early points are plain early stopping, the
trade to beat), and iet, iet-agc and iet-agc-plus at the preset's settings, then seeded random draws
from each method's settings below. The averaged methods train twice the reference's rounds: they need
more sequential steps to reach the same quality (method.md §7), and their early points cover the
shorter lengths. `--grid FILE` instead: `section.key: [values]` (YAML, JSON or TOML; a single value
fixes a key; `section: {key: [values]}` also reads), every combination one trial.

Trials that differ only in settings their method does not use (agc.* for iet, msr.* and taa.* for
all but iet-agc-plus) are one trial.

The `guard` section (memshard.guard) is how a trained model is sampled, not what it trains: a grid may
name `guard.mode`, `guard.scale`, `guard.quantile` (or any guard.* key), and settings that differ only
there are one trial that trains once and measures every guard setting on its model (`Trial.guards`),
each a point of its own. The reference trial always measures the unguarded point too: the budget is the
plain model's quality.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from memshard.config import (
    WHERE_SETTINGS,
    Config,
    GuardConfig,
    build_config,
    from_dict,
    load_config_file,
    to_dict,
    with_default_places,
)
from memshard.errors import MemshardError, shown
from memshard.orchestrator.settings import check
from memshard.tuning.choice import UNGUARDED

REFERENCE_METHOD = "ddpm"
MAX_TRIALS = 1000  # a grid past this is a typo, not a sweep
SAMPLING_SECTION = "guard"  # the settings a trained model is sampled with: measured on it, never trained again


@dataclass(frozen=True)
class Trial:
    name: str  # t00, t01, ...: the order the sweep made them in
    settings: dict[str, Any]  # what this trial sets over the base configuration (`section.key`: value)
    cfg: Config  # the whole training configuration (its guard section at the default: see `what_to_train`)
    reference: bool = False
    guards: tuple[GuardConfig, ...] = (GuardConfig(),)  # each measured on the trained model: a point apiece

    def describe(self) -> str:
        shown_settings = {k: v for k, v in self.settings.items() if k != "iet.method"}
        inner = ", ".join(f"{k}={v}" for k, v in shown_settings.items())
        return f"{self.cfg.iet.method}" + (f" ({inner})" if inner else "")

    def guard_named(self, label: str) -> GuardConfig:
        """The guard setting of this trial's points labelled `label` (`guard_label`)."""
        return next(g for g in self.guards if guard_label(g) == label)


@dataclass(frozen=True)
class SweepSpace:
    trials: tuple[Trial, ...]
    reference: Trial
    reference_round: int  # the full length: the reference point is the reference trial at this round
    base: Config


def default_families(base: Config) -> dict[str, dict[str, list]]:
    """Each method's settings to draw from (the first value of each list is the preset's)."""
    shards, steps, rounds = base.iet.shards, base.iet.local_steps, base.iet.rounds
    averaged = {"iet.rounds": [2 * rounds], "iet.shards": [shards, 2 * shards], "iet.local_steps": [steps, 2 * steps]}
    agc = {"agc.lam": [base.agc.lam, 1.25, 3.0]}
    plus = {"msr.fraction": [base.msr.fraction, 0.1, 0.5], "msr.rule": [base.msr.rule, "least-familiar" if
                                                                         base.msr.rule == "ring" else "ring"],
            "msr.schedule": [base.msr.schedule, "every" if base.msr.schedule == "alternate" else "alternate"],
            "taa.max_translate": [base.taa.max_translate, base.taa.max_translate / 2, min(1.0, 2 * base.taa.max_translate)]}
    return {
        "ddpm": {"iet.method": ["ddpm"]},
        "iet": {"iet.method": ["iet"], **averaged},
        "iet-agc": {"iet.method": ["iet-agc"], **averaged, **agc},
        "iet-agc-plus": {"iet.method": ["iet-agc-plus"], **averaged, **agc, **plus},
    }


def default_settings(count: int, base: Config, seed: int = 0) -> list[dict[str, Any]]:
    """`count` distinct settings: each method at its preset values first, then seeded random draws."""
    if count < 1:
        raise MemshardError(f"--trials {count}: need at least 1 (the ddpm reference is always one)")
    families = default_families(base)
    firsts = [{key: values[0] for key, values in family.items()} for family in families.values()]
    space_size = sum(_combinations(family) for family in families.values())
    draws = random.Random(seed)
    chosen = firsts[:count]
    seen = {json.dumps(s, sort_keys=True) for s in chosen}
    averaged = [family for name, family in families.items() if name != REFERENCE_METHOD]
    while len(chosen) < min(count, space_size):
        family = draws.choice(averaged)
        settings = {key: draws.choice(values) for key, values in family.items()}
        if json.dumps(settings, sort_keys=True) not in seen:
            seen.add(json.dumps(settings, sort_keys=True))
            chosen.append(settings)
    return chosen


def _combinations(family: dict[str, list]) -> int:
    return len(list(itertools.product(*(dict.fromkeys(map(str, v)) for v in family.values()))))


def read_grid(path: str | Path) -> dict[str, list]:
    """A grid file as `section.key` -> its values (a single value becomes a list of one)."""
    tree = load_config_file(path, flag="--grid", what="grid file")
    grid: dict[str, list] = {}
    for key, values in tree.items():
        if isinstance(values, dict):  # `agc: {lam: [1, 2]}`
            for inner, inner_values in values.items():
                grid[f"{key}.{inner}"] = inner_values
        else:
            grid[str(key)] = values
    for key, values in list(grid.items()):
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise MemshardError(f"--grid {path}: {shown(key)} has no values: give at least one")
        grid[key] = values
    if not grid:
        raise MemshardError(f"--grid {path} names no settings: write e.g. `agc.lam: [1.25, 2.0]`")
    where = [key for key in grid if key in WHERE_SETTINGS]
    if where:  # its values would become trial names, the table and the parent run's files: never a credential
        raise MemshardError(f"--grid {path}: {where[0]} is a where-setting (where the sweep runs and logs, "
                            f"not what a trial trains): drop it from the grid and give it once, --set {where[0]}=...")
    return grid


def grid_settings(grid: dict[str, list], where: str) -> list[dict[str, Any]]:
    count = 1
    for values in grid.values():
        count *= len(values)
    if count > MAX_TRIALS:
        raise MemshardError(f"{where} makes {count:,} trials: at most {MAX_TRIALS:,}; give fewer values")
    keys = list(grid)
    return [dict(zip(keys, combination, strict=True)) for combination in itertools.product(*grid.values())]


def trial_config(preset: str, overrides: dict[str, Any], sets: list[str], settings: dict[str, Any],
                 where: str) -> Config:
    """The full configuration of one trial, checked like `memshard train` checks it (a one-line error)."""
    try:
        cfg = build_config(preset, overrides={**overrides, **settings}, sets=sets)
        check(cfg)
    except MemshardError as error:
        raise MemshardError(f"{where}, trial {shown(settings)}: {error}") from None
    return cfg


def what_to_train(cfg: Config) -> Config:
    """A trial's configuration without its where-settings and its guard (back at their defaults): a
    trial is what it trains. Where the sweep runs and logs stays with the sweep's base and reaches the
    trials through `trial.TrialContext`, so nothing Ray Tune keeps (its param space, its callbacks in
    tuner.pkl) holds a tracking URI's credentials; how its model is sampled is `Trial.guards`
    (`sampling_settings` takes it out first)."""
    setattr(cfg, SAMPLING_SECTION, GuardConfig())
    return with_default_places(cfg, WHERE_SETTINGS)


def sampling_settings(cfg: Config) -> GuardConfig:
    """How a trial's model is sampled: the checked configuration's guard section."""
    return GuardConfig(**asdict(getattr(cfg, SAMPLING_SECTION)))


def guard_label(guard: GuardConfig) -> str:
    """A guard setting's name in the sweep's points, and its identity: only the settings its mode uses
    (settings that differ only where the mode ignores them are one point)."""
    if guard.mode == UNGUARDED:
        return UNGUARDED
    used = f"scale={guard.scale:g}" if guard.mode == "guidance" else f"max_redraws={guard.max_redraws}"
    return f"{guard.mode} ({used}, quantile={guard.quantile:g})"


def _training_part(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if not k.startswith(f"{SAMPLING_SECTION}.")}


def effective(cfg: Config) -> str:
    """The settings that change what the trial trains: a trial's identity for de-duplication."""
    tree = to_dict(cfg)
    for section, used in (("agc", cfg.uses_agc), ("msr", cfg.uses_msr), ("taa", cfg.uses_taa)):
        if not used:
            tree.pop(section)
    return json.dumps(tree, sort_keys=True, default=str)


def is_reference_run(cfg: Config, reference: Config) -> bool:
    """A ddpm trial that is the reference trained at least as long (its point at the reference round is it)."""
    if cfg.iet.method != REFERENCE_METHOD or cfg.iet.rounds < reference.iet.rounds:
        return False
    shortened = build_like(cfg, rounds=reference.iet.rounds)
    return effective(shortened) == effective(reference)


def build_like(cfg: Config, rounds: int) -> Config:
    """`cfg` trained for `rounds` rounds."""
    tree = to_dict(cfg)
    tree["iet"]["rounds"] = rounds
    tree["mlflow"]["tracking_uri"] = cfg.mlflow.tracking_uri
    return from_dict(tree)


def _what_it_changes(settings: dict[str, Any], cfg: Config, base: Config) -> dict[str, Any]:
    """The settings that make this trial differ from the base (its method always shown)."""
    used = {"agc": cfg.uses_agc, "msr": cfg.uses_msr, "taa": cfg.uses_taa}
    kept = {}
    for dotted in settings:
        section, key = dotted.split(".", 1)
        if dotted == "iet.method" or (used.get(section, True) and getattr(getattr(cfg, section), key)
                                      != getattr(getattr(base, section), key)):
            kept[dotted] = getattr(getattr(cfg, section), key)
    return kept


def sweep_space(preset: str, data: str | None, sets: list[str], grid_file: str | None = None,
                trials: int | None = None, seed: int = 0, experiment: str | None = None) -> SweepSpace:
    """The sweep's trials, every configuration built and checked before any work."""
    overrides = {"data.path": data, "mlflow.experiment": experiment}
    base = trial_config(preset, overrides, sets, {}, "--preset/--data/--set")
    if grid_file is not None:
        all_settings, where = grid_settings(read_grid(grid_file), f"--grid {grid_file}"), f"--grid {grid_file}"
    else:
        all_settings, where = default_settings(8 if trials is None else trials, base, seed), "the default space"
    reference_cfg = what_to_train(trial_config(preset, overrides, sets, {"iet.method": REFERENCE_METHOD},
                                              "the reference (ddpm)"))
    made: dict[str, tuple[dict, Config, dict[str, GuardConfig]]] = {}  # by what it trains: its guards by label
    every_guard: dict[str, GuardConfig] = {}
    for settings in all_settings:
        checked = trial_config(preset, overrides, sets, settings, where)  # the guard's values checked here too
        guard = sampling_settings(checked)
        cfg = what_to_train(checked)
        made.setdefault(effective(cfg), (_training_part(settings), cfg, {}))[2].setdefault(guard_label(guard), guard)
        every_guard.setdefault(guard_label(guard), guard)
    trials = list(made.values())
    position = next((i for i, (_, cfg, _) in enumerate(trials) if is_reference_run(cfg, reference_cfg)), None)
    if position is None:  # the budget is measured against it: always trained, with every guard of the space
        trials.insert(0, ({"iet.method": REFERENCE_METHOD}, reference_cfg, dict(every_guard)))
        position = 0
    trials[position][2].setdefault(UNGUARDED, GuardConfig())  # the budget is the plain model's quality
    built = tuple(Trial(f"t{i:02d}", _what_it_changes(settings, cfg, base), cfg, i == position,
                        tuple(sorted(guards.values(), key=lambda g: g.mode != UNGUARDED)))  # the plain point first
                  for i, (settings, cfg, guards) in enumerate(trials))
    return SweepSpace(built, built[position], reference_cfg.iet.rounds, base)
