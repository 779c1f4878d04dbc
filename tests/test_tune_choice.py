"""The sweep's choice rule and Pareto front (tuning/choice.py) on constructed trial results, and the
parts of the sweep that need no cluster: the space, the grid file, the quality-loss flag, the config file."""

from __future__ import annotations

import math

import pytest
import yaml

from memshard.config import GuardConfig, build_config
from memshard.errors import MemshardError
from memshard.tuning.choice import UNGUARDED, Point, choose, pareto_front, quality_budget
from memshard.tuning.report import chosen_config
from memshard.tuning.space import guard_label, sweep_space


def point(trial: str, near_copied: float, frechet: float, shards: int = 2, compute: float = 100.0, round_: int = 1,
          coverage: float | None = 1.0) -> Point:
    return Point(trial, round_, near_copied, near_copied / 100, frechet, coverage, shards, compute)


REFERENCE = point("ref", near_copied=30, frechet=10.0, shards=1, compute=200.0)


def test_the_fewest_copies_within_budget_is_chosen_and_over_budget_never_is():
    over = point("over", near_copied=0, frechet=11.5)  # copies least, but 15% worse than the reference
    inside = point("inside", near_copied=4, frechet=10.9)  # 9% worse: within 10%
    choice = choose([REFERENCE, over, inside], quality_budget(REFERENCE, 0.10))
    assert choice.chosen == inside
    assert over not in choice.within and choice.within == (inside, REFERENCE)
    assert math.isclose(choice.budget.max_frechet, 11.0)


def test_coverage_worse_than_the_reference_is_over_budget():
    narrow = point("narrow", near_copied=0, frechet=9.0, coverage=0.8)
    assert choose([REFERENCE, narrow], quality_budget(REFERENCE, 0.10)).chosen == REFERENCE


def test_ties_go_to_fewer_shards_then_less_compute():
    many = point("many", near_copied=2, frechet=10.5, shards=4, compute=50.0)
    few_costly = point("few-costly", near_copied=2, frechet=10.5, shards=2, compute=300.0)
    few_cheap = point("few-cheap", near_copied=2, frechet=10.8, shards=2, compute=100.0)
    choice = choose([many, few_costly, few_cheap, REFERENCE], quality_budget(REFERENCE, 0.10))
    assert choice.chosen == few_cheap
    assert choice.within[:3] == (few_cheap, few_costly, many)
    # The order the trials finished in does not matter.
    assert choose(reversed([many, few_costly, few_cheap, REFERENCE]), quality_budget(REFERENCE, 0.10)).chosen == few_cheap


def test_no_point_within_budget_recommends_the_closest_and_chooses_nothing():
    far = point("far", near_copied=0, frechet=20.0)
    near = point("near", near_copied=9, frechet=11.5)
    nan = point("nan", near_copied=0, frechet=float("nan"))
    choice = choose([far, near, nan], quality_budget(REFERENCE, 0.10))  # the reference itself not a candidate
    assert choice.chosen is None and choice.within == ()
    assert choice.closest == near


def test_pareto_front_keeps_only_points_nothing_beats_on_both():
    a, b, c = point("a", 10, 5.0), point("b", 4, 7.0), point("c", 1, 12.0)
    dominated = point("d", 6, 8.0)
    equal_quality_more_copies = point("e", 12, 5.0)
    assert pareto_front([dominated, c, a, equal_quality_more_copies, b]) == [a, b, c]
    assert pareto_front([point("x", 1, float("nan")), a]) == [a]


def test_the_reference_is_always_a_trial_and_settings_a_method_ignores_make_no_second_trial(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("iet.method: [iet, iet-agc]\nagc.lam: [1.5, 3.0]\n")
    space = sweep_space("tiny", None, [], grid_file=str(grid))
    methods = [t.cfg.iet.method for t in space.trials]
    assert methods.count("ddpm") == 1 and space.reference.cfg.iet.method == "ddpm" and space.reference.reference
    assert methods.count("iet") == 1 and methods.count("iet-agc") == 2  # iet ignores agc.lam: one trial
    assert space.reference_round == build_config("tiny").iet.rounds


def test_guard_settings_are_measured_on_one_trained_model_not_trained_again(tmp_path):
    """guard.* values are how a model is sampled: one trial per training setting, every guard setting a
    point of it (those differing only where their mode ignores them are one); the reference keeps its
    plain point, and a chosen guarded point's setting is the chosen config's guard section."""
    grid = tmp_path / "grid.yaml"
    grid.write_text("iet.method: [ddpm, iet]\nguard.mode: [reject, guidance]\nguard.scale: [1, 2]\n")
    space = sweep_space("tiny", None, [], grid_file=str(grid))
    assert [t.cfg.iet.method for t in space.trials] == ["ddpm", "iet"]
    assert all(t.cfg.guard == GuardConfig() for t in space.trials)  # what is trained holds no guard
    labels = {t.cfg.iet.method: [guard_label(g) for g in t.guards] for t in space.trials}
    guarded = ["reject (max_redraws=8, quantile=0.05)", "guidance (scale=1, quantile=0.05)",
               "guidance (scale=2, quantile=0.05)"]
    assert labels == {"ddpm": [UNGUARDED, *guarded], "iet": guarded}
    trial = space.trials[1]
    written = yaml.safe_load(chosen_config(trial.cfg, 2, trial.guard_named(guarded[2])))
    assert written["guard"]["mode"] == "guidance" and written["guard"]["scale"] == 2.0
    assert build_config("tiny", _write(tmp_path / "chosen.yaml", written)).guard.scale == 2.0


def _write(path, tree):
    path.write_text(yaml.safe_dump(tree))
    return path


def test_the_default_space_starts_with_every_method_at_its_preset_values():
    space = sweep_space("tiny", None, [], trials=6, seed=3)
    assert [t.cfg.iet.method for t in space.trials[:4]] == ["ddpm", "iet", "iet-agc", "iet-agc-plus"]
    assert len(space.trials) == 6 and space.trials[0].reference
    assert space.trials[1].cfg.iet.rounds == 2 * space.reference_round  # averaged methods train longer


@pytest.mark.parametrize(("text", "message"), [
    ("agc.lamb: [1, 2]\n", "unknown key"),
    ("agc.lam: [-1]\n", "agc.lam = -1.0: must be > 0"),
    ("msr.rule: [nearest]\n", "msr.rule"),
    ("agc.lam: []\n", "has no values"),
    ("[1, 2]\n", "must hold sections"),
    ("guard.mode: [off, sometimes]\n", "guard.mode = 'sometimes': choose one of off, reject, guidance"),
    ("guard.mode: [guidance]\nguard.scale: [1, 0]\n", "guard.scale = 0.0"),
    ("guard.quantile: [0.01]\n", "guard.quantile = 0.01"),
])
def test_a_bad_grid_is_one_line_before_any_work(tmp_path, text, message):
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    with pytest.raises(MemshardError, match=message) as error:
        sweep_space("tiny", None, [], grid_file=str(grid))
    assert "\n" not in str(error.value)


def test_a_grid_reads_json_and_sections(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text('{"agc": {"lam": [1.5, 2.5]}, "iet.method": "iet-agc"}')
    lams = sorted(t.cfg.agc.lam for t in sweep_space("tiny", None, [], grid_file=str(grid)).trials
                  if t.cfg.iet.method == "iet-agc")
    assert lams == [1.5, 2.5]


@pytest.mark.parametrize(("text", "value"), [("10%", 0.10), ("0.1", 0.10), ("0", 0.0), ("25 %", 0.25)])
def test_max_quality_loss_takes_percent_or_fraction(text, value):
    from memshard.commands.tune import parse_quality_loss

    assert math.isclose(parse_quality_loss(text), value)


@pytest.mark.parametrize("text", ["ten", "-5%", "nan", "inf"])
def test_max_quality_loss_refuses_what_is_not_a_fraction(text):
    from memshard.commands.tune import parse_quality_loss

    with pytest.raises(MemshardError, match="--max-quality-loss"):
        parse_quality_loss(text)


def test_the_chosen_config_is_the_trial_stopped_at_its_round_and_builds_again(tmp_path):
    cfg = build_config("tiny", sets=["iet.method=iet-agc", "agc.lam=3.0", "iet.rounds=6",
                                     "mlflow.tracking_uri=https://user:secret@host"])
    path = tmp_path / "chosen.yaml"
    path.write_text(chosen_config(cfg, rounds=4))
    assert "secret" not in path.read_text() and "tracking_uri" not in yaml.safe_load(path.read_text())["mlflow"]
    again = build_config("digits", path)  # any preset: the file holds every setting
    assert (again.iet.method, again.agc.lam, again.iet.rounds, again.model.block_out_channels) == \
        ("iet-agc", 3.0, 4, cfg.model.block_out_channels)


def test_a_guarded_points_model_carries_its_guard_setting_as_its_default(tmp_path):
    """What `--register-as` logs for a point: a guarded point's model carries the point's guard setting as
    its default (written beside the pipeline by the tracker), a plain point's the trial's own."""
    from memshard.tuning.report import TrialOutcome
    from memshard.tuning.sweep import point_guard

    grid = tmp_path / "grid.yaml"
    grid.write_text("iet.method: [ddpm]\nguard.mode: [off, guidance]\nguard.scale: [3]\n")
    trial = sweep_space("tiny", None, [], grid_file=str(grid)).trials[0]
    outcome = TrialOutcome(trial, round_pipelines={1: str(tmp_path)})
    assert point_guard(outcome, point(trial.name, 1, 1.0)) == trial.cfg.guard == GuardConfig()
    guarded = Point(trial.name, 1, 0, 0.0, 1.0, 1.0, 2, 100.0, guard="guidance (scale=3, quantile=0.05)")
    assert point_guard(outcome, guarded) == GuardConfig(mode="guidance", scale=3.0)
