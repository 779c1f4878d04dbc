"""Configuration: presets, YAML/TOML files, CLI overrides, `--set`, and one-line validation errors."""

import pytest

from memshard.config import build_config, flatten, from_dict, to_dict
from memshard.errors import MemshardError


def test_defaults_and_presets():
    digits = build_config()
    # the default trains what measured best (ddpm + EMA, issue 24): one model with the 4-shard run's compute
    assert digits.data.path == "digits" and digits.iet.method == "ddpm" and digits.training.ema
    assert (digits.iet.shards, digits.iet.local_steps) == (1, 400)
    assert not (digits.uses_agc or digits.uses_msr or digits.uses_taa)
    sharded = build_config(overrides={"iet.method": "iet-agc-plus"})
    assert (sharded.iet.shards, sharded.iet.local_steps) == (4, 100)
    assert sharded.uses_agc and sharded.uses_msr and sharded.uses_taa
    cifar = build_config("cifar32")
    assert cifar.model.block_out_channels == (128, 256, 256, 256)
    assert cifar.model.layers_per_block == 2 and cifar.model.attention_resolutions == (16,)
    assert cifar.model.dropout == 0.1
    assert (cifar.training.batch_size, cifar.training.learning_rate, cifar.training.grad_clip) == (128, 2e-4, 1.0)
    assert cifar.iet.method == "iet-agc-plus" and cifar.iet.shards == 10
    tiny = build_config("tiny")
    assert tiny.data.resolution == 8 and tiny.iet.local_steps <= 5 and tiny.iet.method == "iet-agc-plus"


def test_asking_ddpm_for_shards_says_that_one_model_trains_with_their_compute():
    from memshard.commands.train import ddpm_shards_note
    eight = build_config(overrides={"iet.shards": 8})
    assert (eight.iet.shards, eight.iet.local_steps) == (1, 800)
    note = ddpm_shards_note(eight, 8)
    assert "one model, not 8 shard actors: 800 steps per round" in note and "--method iet-agc-plus" in note
    assert ddpm_shards_note(build_config(), None) is None  # the default asks for no shards: nothing to say
    sharded = build_config(overrides={"iet.shards": 8, "iet.method": "iet-agc-plus"})
    assert ddpm_shards_note(sharded, 8) is None


def test_msr_defaults_alternate_on_the_ring_and_the_published_exchange_is_a_setting():
    """method.md §3: exchange and averaging rounds alternate, on the ring; the prototype's exchange round
    without averaging and its sender-wide reset are settings until measured (the defaults keep averaging
    after every round and resetting the moved samples); every preset keeps that."""
    for preset in ("tiny", "digits", "cifar32"):
        msr = build_config(preset).msr
        assert (msr.schedule, msr.exchange_averages, msr.reset, msr.rule) == ("alternate", True, "moved", "ring")
    published = build_config("tiny", sets=["msr.exchange_averages=false", "msr.reset=sender"]).msr
    assert published.exchange_averages is False and published.reset == "sender"


def test_file_then_flags_then_set(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("iet:\n  shards: 3\n  rounds: 7\nagc:\n  lam: 1.25\nmodel:\n  block_out_channels: [16, 32]\n")
    cfg = build_config("tiny", yaml_file, overrides={"iet.rounds": 9, "iet.method": None}, sets=["msr.rule=least-familiar", "agc.decay=0.5"])
    assert cfg.iet.shards == 3 and cfg.iet.rounds == 9  # the flag beats the file
    assert cfg.agc.lam == 1.25 and cfg.agc.decay == 0.5 and cfg.msr.rule == "least-familiar"
    assert cfg.model.block_out_channels == (16, 32)
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('[training]\nbatch_size = 8\nlearning_rate = 1e-3\n[ray]\ngpus_per_actor = "0.5"\n')
    cfg = build_config("tiny", toml_file)
    assert cfg.training.batch_size == 8 and cfg.training.learning_rate == 1e-3 and cfg.ray.gpus_per_actor == "0.5"


def test_ints_widen_to_floats_and_method_selects_components():
    cfg = build_config("tiny", sets=["agc.lam=2", "iet.method=iet"])
    assert cfg.agc.lam == 2.0 and isinstance(cfg.agc.lam, float)
    assert not cfg.uses_agc and not cfg.uses_msr and not cfg.uses_taa
    cfg = build_config("tiny", sets=["iet.method=iet-agc"])
    assert cfg.uses_agc and not cfg.uses_msr and not cfg.uses_taa


def test_ddpm_baseline_is_one_model_with_equal_compute():
    sharded = build_config("tiny", overrides={"iet.shards": 4, "iet.local_steps": 10})
    baseline = build_config("tiny", overrides={"iet.shards": 4, "iet.local_steps": 10, "iet.method": "ddpm"})
    assert baseline.iet.shards == 1 and not baseline.uses_agc
    assert baseline.iet.local_steps == sharded.iet.shards * sharded.iet.local_steps


def test_round_trip_through_dict_and_flatten():
    cfg = build_config("cifar32", sets=["msr.schedule=every"])
    assert from_dict(to_dict(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["model.block_out_channels"] == "[128, 256, 256, 256]" and flat["msr.schedule"] == "every"


def test_a_float_without_a_dot_reads_as_a_number():
    """YAML 1.1 reads 5e-5 as text; a float setting takes it as the number a user means."""
    cfg = build_config("tiny", sets=["training.learning_rate=5e-5", "agc.lam=2"])
    assert cfg.training.learning_rate == 5e-5 and cfg.agc.lam == 2.0
    for bad in ("training.learning_rate=fast", "training.learning_rate=nan", "training.learning_rate=1e999"):
        with pytest.raises(MemshardError, match="wrong type|finite"):
            build_config("tiny", sets=[bad])


@pytest.mark.parametrize(
    "sets, fragment",
    [
        (["iet.bogus=1"], "unknown key 'iet.bogus'"),
        (["nosection.key=1"], "unknown setting"),
        (["iet.shards=two"], "wrong type"),
        (["iet.shards=1.5"], "wrong type"),
        (["agc.decay=true"], "wrong type"),
        (["iet.shards=0"], "at least 1 shard"),
        (["training.ema_max_decay=1"], "training.ema_max_decay = 1.0: must be in (0, 1)"),
        (["training.ema_power=0"], "training.ema_power = 0.0: must be > 0"),
        (["iet.rounds=-1"], "at least 1 round"),
        (["iet.local_steps=0"], "at least 1 step"),
        (["iet.method=magic"], "unknown method"),
        (["agc.decay=1.5"], "agc.decay"),
        (["msr.fraction=0"], "msr.fraction"),
        (["msr.reset=everyone"], "msr.reset = 'everyone': choose one of sender, moved (published: sender)"),
        (["msr.exchange_averages=sometimes"], "wrong type"),
        (["data.resolution=12"], "data.resolution = 12 cannot be used"),
        (["model.block_out_channels=12,24"], "multiples of 8"),
        (["model.attention_resolutions=5"], "feature maps"),
        (["training.mixed_precision=fp8"], "mixed_precision"),
        (["ray.gpus_per_actor=lots"], "gpus_per_actor"),
        (["noequals"], "no '='"),
    ],
)
def test_bad_settings_are_one_line_errors(sets, fragment):
    with pytest.raises(MemshardError) as error:
        build_config("tiny", sets=sets)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_files_and_presets(tmp_path):
    with pytest.raises(MemshardError, match="unknown preset"):
        build_config("huge")
    with pytest.raises(MemshardError, match="does not exist"):
        build_config("tiny", tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("iet: [unclosed\n")
    with pytest.raises(MemshardError, match="does not parse"):
        build_config("tiny", broken)
    flat = tmp_path / "flat.yaml"
    flat.write_text("shards: 3\n")
    with pytest.raises(MemshardError, match="must be a section"):
        build_config("tiny", flat)
    wrong_suffix = tmp_path / "run.json"
    wrong_suffix.write_text("{}")
    with pytest.raises(MemshardError, match="yaml"):
        build_config("tiny", wrong_suffix)


def test_configs_saved_before_ema_and_fault_injection_were_removed_still_load():
    """Checkpoints and MLflow lineage of older runs hold training.ema_decay and a faults section."""
    tree = to_dict(build_config("tiny"))
    tree["training"]["ema_decay"] = 0.99
    tree["faults"] = {"shard": -1, "exit_at_steps": [], "marker_dir": ".memshard/faults"}
    assert from_dict(tree) == build_config("tiny")


def test_the_default_preset_samples_the_ema_and_the_others_do_not():
    """Measured better on digits (BENCHMARKS.md, issue 12); not measured for tiny and cifar32."""
    assert build_config().training.ema and build_config("digits").training.ema
    assert not build_config("tiny").training.ema and not build_config("cifar32").training.ema
    assert not build_config(sets=["training.ema=false"]).training.ema
