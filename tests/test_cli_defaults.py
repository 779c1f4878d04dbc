"""Every default the command line restates (an argparse default, a default or a list of names quoted in a
help text) equals the library's own: the library decides, memshard/commands/cli.py only repeats it for --help."""

from __future__ import annotations

import argparse
import inspect
import re

import pytest

from memshard.commands.cli import build_parser
from memshard.commands.evaluate import evaluate_settings
from memshard.commands.tune import parse_quality_loss
from memshard.commands.unlearn import parse_unlearn_sets, unlearn_model
from memshard.config import DEFAULT_PRESET, METHODS, PRESETS, IETConfig, MLflowConfig, ModelConfig, build_config
from memshard.evaluation.evaluate import AUTO, DEVICES, PROTOCOLS, PUBLISHED, QUICK, EvaluateSettings
from memshard.evaluation.fid import FEATURE_SPACES
from memshard.evaluation.memorization import DEFAULT_R_COPY_THRESHOLD
from memshard.orchestrator.sharding import destination_rule
from memshard.orchestrator.tracking import DEFAULT_TRACKING_URI
from memshard.pipeline import DEFAULT_SAMPLING_STEPS, SAMPLERS
from memshard.tuning.space import sweep_space
from memshard.tuning.sweep import SweepSettings
from memshard.unlearning.audit import AuditSettings
from memshard.unlearning.methods import UnlearnSettings
from memshard.unlearning.runner import ALL_METHODS


def subcommand(name: str) -> argparse.ArgumentParser:
    actions = build_parser()._actions  # argparse offers no public way to walk a parser's flags
    return next(a for a in actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def flag(command: str, name: str) -> argparse.Action:
    return next(a for a in subcommand(command)._actions if name in a.option_strings)


def help_of(command: str, name: str) -> str:
    return flag(command, name).help.replace("%%", "%")  # as --help prints it


def listed(text: str) -> tuple[list[str], list[str]]:
    """The names of a help text such as 'tiny, digits (default) or cifar32', and those marked default."""
    names = [name.strip() for name in re.split(r",|\bor\b", text) if name.strip()]
    return ([name.removesuffix("(default)").strip() for name in names],
            [name.removesuffix("(default)").strip() for name in names if name.endswith("(default)")])


def quoted_defaults(text: str) -> list[str]:
    """The numbers a help text quotes as its default: '(default 0.5)', '(default: 256 published, ...'."""
    return re.findall(r"default:? ([0-9][0-9.,]*%?)", text.replace("%%", "%"))


# (command, flag) -> the library value its help quotes as "default N", as --help shows it.
QUOTED = {
    ("evaluate", "--batch"): f"{PUBLISHED.batch_size}",  # "256 published, 50 quick": both checked below
    ("evaluate", "--r-copy-threshold"): f"{DEFAULT_R_COPY_THRESHOLD}",
    ("unlearn", "--steps"): f"{UnlearnSettings.max_steps}",
    ("tune", "--max-quality-loss"): f"{SweepSettings.max_quality_loss:.0%}",
    ("tune", "--trials"): "8",  # tuning.space's default count: pinned by what it builds, below
    ("tune", "--num-images"): f"{SweepSettings.num_images}",
    ("tune", "--sampling-steps"): f"{SweepSettings.sampling_steps}",
}


def test_every_default_a_help_text_quotes_is_pinned_to_the_library():
    """A new '(default N)' in cli.py fails here until its library value is added to QUOTED; a quote that
    is dropped from a help text restates nothing and may leave its entry behind."""
    found = {}
    for command, parser in next(a for a in build_parser()._actions
                                if isinstance(a, argparse._SubParsersAction)).choices.items():
        for action in parser._actions:
            for number in quoted_defaults(action.help or ""):
                found[(command, action.option_strings[0] if action.option_strings else action.dest)] = number
    assert found.items() <= QUOTED.items()
    assert len(found) >= 5  # the walk does find the quotes


def test_evaluate_flags_left_out_are_evaluate_settings_defaults():
    args = build_parser().parse_args(["evaluate", "models:/m/1"])
    assert evaluate_settings(args) == EvaluateSettings()
    assert EvaluateSettings().r_copy_threshold == DEFAULT_R_COPY_THRESHOLD
    assert args.experiment == MLflowConfig.experiment


def test_evaluate_help_quotes_the_protocols_samplers_spaces_and_devices():
    assert flag("evaluate", "--protocol").choices == (AUTO, *PROTOCOLS)
    protocol = help_of("evaluate", "--protocol")
    assert f"published: {PUBLISHED.num_images:,} generations, {PUBLISHED.sampler} with the training timesteps " \
           f"({ModelConfig.num_train_timesteps})" in protocol
    assert f"quick: {QUICK.num_images:,} generations, {QUICK.sampler} {QUICK.sampling_steps}" in protocol
    assert PUBLISHED.sampling_steps is None  # "with the training timesteps"
    assert f"{PUBLISHED.batch_size} published, {QUICK.batch_size} quick" in help_of("evaluate", "--batch")
    assert flag("evaluate", "--sampler").choices == SAMPLERS
    steps = help_of("evaluate", "--sampling-steps")
    for sampler, default in DEFAULT_SAMPLING_STEPS.items():
        assert (f"the training timesteps for {sampler}" if default is None else f"{default} for {sampler}") in steps
    spaces = help_of("evaluate", "--feature-space")
    assert all(space in spaces for space in (*FEATURE_SPACES, "none", f"{AUTO} (default"))
    assert all(device in help_of("evaluate", "--device") for device in DEVICES)
    for command in ("evaluate", "compare"):
        assert f"else {DEFAULT_TRACKING_URI}, in the workspace root)" in help_of(command, "--tracking-uri")


def test_train_and_tune_list_the_presets_and_methods_with_their_defaults():
    for command in ("train", "tune"):
        assert listed(help_of(command, "--preset").split(":")[0]) == (list(PRESETS), [DEFAULT_PRESET])
    assert listed(help_of("train", "--method")) == (list(METHODS), [IETConfig.method])
    assert inspect.signature(build_config).parameters["preset"].default == DEFAULT_PRESET


def test_unlearn_method_and_steps_are_the_librarys():
    args = build_parser().parse_args(["unlearn", "models:/m/1", "--forget", "a"])
    assert args.method == inspect.signature(unlearn_model).parameters["method"].default
    assert listed(help_of("unlearn", "--method")) == (list(ALL_METHODS), [args.method])
    assert parse_unlearn_sets(args.set, args.steps).settings == UnlearnSettings()


def test_unlearn_set_names_the_settings_it_takes():
    names = help_of("unlearn", "--set").removesuffix(", ... (repeatable)").split(", ")
    fields = {f"{prefix}{name}" for prefix, settings in (("", UnlearnSettings), ("audit.", AuditSettings))
              for name in inspect.signature(settings).parameters}
    assert len(names) > 5 and set(names) <= fields


def test_tune_flags_left_out_are_sweep_settings_defaults():
    args = build_parser().parse_args(["tune"])
    given = SweepSettings(max_quality_loss=parse_quality_loss(args.max_quality_loss), num_images=args.num_images,
                          sampling_steps=args.sampling_steps, seed=args.seed)
    assert given == SweepSettings()
    assert "DDIM steps" in help_of("tune", "--sampling-steps") and SweepSettings.sampler == "ddim"


def test_tune_trials_default_is_the_count_the_space_builds_without_trials():
    trials = int(QUOTED[("tune", "--trials")])

    def names(count):
        return [(trial.name, trial.settings) for trial in sweep_space("tiny", None, [], trials=count).trials]

    assert names(None) == names(trials) != names(trials - 1)


@pytest.mark.parametrize("command", ["train", "tune"])
def test_the_set_examples_in_the_help_are_settings(command):
    setting = re.search(r"e\.g\. --set (\S+)", help_of(command, "--set")).group(1)
    cfg = build_config(DEFAULT_PRESET, sets=[setting])  # raises MemshardError on an unknown or bad setting
    destination_rule(cfg.msr.rule)  # a rule's name is checked against the registry when training starts
