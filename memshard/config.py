"""Configuration: one tree of plain dataclasses, presets, YAML/TOML files and `section.key=value`.

Precedence, lowest first: dataclass defaults < preset < config file < explicit CLI flags < --set.
Every value is validated once, in `validate`; the settings that name what lower layers define (msr.rule,
the server optimizer and its hyperparameters) are checked with it by `orchestrator.settings.check`,
which every entry point that trains calls. The rest of the code can trust the values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from memshard.errors import MemshardError, shown

METHODS = ("ddpm", "iet", "iet-agc", "iet-agc-plus")
AMBIENT_WEIGHTINGS = ("epsilon", "x0")  # what memshard.model.ambient_loss computes for each
MSR_SCHEDULES = ("every", "alternate")
MSR_RESETS = ("sender", "moved")  # whose skip counts an exchange resets (orchestrator.rounds, redistribute)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")  # DDPMScheduler's
REGISTERED_ROUNDS = ("least-copying", "last")  # selection.register: which round `memshard train` registers
DEFAULT_MAX_QUALITY_LOSS = 0.10  # a quality budget unless asked otherwise: Fréchet within +10% of its reference's
MAX_QUALITY_LOSS_LIMIT = 10.0  # a budget past 11x the reference's Fréchet admits models that have learnt nothing
GUARD_MODES = ("off", "reject", "guidance")  # memshard.guard: what each does
OFF_SETTINGS = ("guard.mode",)  # text settings where `off` is a value: YAML's false reads as it
GUARD_CARRIES = ("reference", "images")  # what a registered model holds for its guard (memshard.guard)
NEAR_COPY_QUANTILE = 0.05  # near copies: nearer than all but this fraction of real images (memshard.guard)
MAX_CONFIG_FILE_BYTES = 1 << 20  # a config file is a few hundred bytes; past this it is not one
_INT64 = 1 << 63


@dataclass
class DataConfig:
    path: str = "digits"  # a prepared dataset dir, or any source `memshard data prepare` takes
    resolution: int = 16
    channels: int | None = None  # None: keep the source's channel count
    cache_dir: str = ".memshard/data"  # a relative path lies under the workspace root (memshard.files.in_workspace)
    balanced_by_label: bool = False


@dataclass
class ModelConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_resolutions: tuple[int, ...] = ()  # feature-map sizes that get self-attention
    dropout: float = 0.0
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"


@dataclass
class TrainingConfig:
    batch_size: int = 64
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    mixed_precision: str = "no"  # "no" or "bf16" (autocast, CUDA only)
    device: str = "auto"  # "auto", "cpu", "cuda"
    seed: int = 0
    # An exponential moving average of the weights, with warm-up (diffusers' EMAModel, as its
    # train_unconditional.py uses it): each proxy keeps one, the driver averages them like the weights,
    # and the averaged EMA is the model that is sampled and registered. Decay at step n:
    # min(ema_max_decay, 1 - (1 + n)^-ema_power).
    ema: bool = False
    ema_max_decay: float = 0.9999
    ema_power: float = 0.75
    # Ambient training at high noise (method.md §10; model.ambient_loss), for every method: above the level
    # ᾱ_n the model learns only from one fixed noisy copy of each image. None: off. 0.8 is the published
    # σ_n = 0.5. `ambient_weighting` scales the copy loss: "epsilon" (method.md) or "x0" (published code).
    ambient_alpha_bar: float | None = None
    ambient_weighting: str = "epsilon"


@dataclass
class IETConfig:
    # ddpm (one model, the sharded run's compute) with the EMA measured best on every regime so far: no IET
    # variant copied less at equal quality, and IET-AGC+ at the same compute is far from trained
    # (BENCHMARKS.md, issue 24). The tiny and cifar32 presets name the sharded method they exist for.
    method: str = "ddpm"
    shards: int = 4
    rounds: int = 10
    local_steps: int = 100


@dataclass
class AGCConfig:
    lam: float = 2.0  # published default; 1.25 for text-to-image fine-tuning
    decay: float = 0.8


@dataclass
class MSRConfig:
    fraction: float = 0.25  # published prototype
    rule: str = "ring"  # a destination rule registered in orchestrator.sharding, checked by orchestrator.settings.check
    schedule: str = "alternate"  # published prototype alternates exchange and averaging rounds
    # The published prototype (method.md §3): an exchange round moves samples and does not average (each
    # proxy keeps its own weights; false), and a shard that sent samples resets all its counts (sender).
    # The defaults stay memshard's measured variant (average after every round; reset the moved samples)
    # until the published one is measured against it (issue 24): a default changes with numbers only.
    exchange_averages: bool = True
    reset: str = "moved"


@dataclass
class AggregationConfig:
    """The server step after FedAvg (method.md §8). None: the optimizer's own default (`aggregation.server_optimizers`)."""

    server_optimizer: str = "fedavg"  # fedavg | fedavgm | fedadam | fedyogi: checked by orchestrator.settings.check
    server_learning_rate: float | None = None  # fedavgm's η_s (default 1.0)
    server_momentum: float | None = None  # fedavgm's β (default 0.9)
    eta: float | None = None  # fedadam's / fedyogi's η (default 0.1 / 0.01)
    beta_1: float | None = None  # fedadam, fedyogi (default 0.9)
    beta_2: float | None = None  # fedadam, fedyogi (default 0.99)
    tau: float | None = None  # fedadam's / fedyogi's τ (default 1e-9 / 1e-3)


@dataclass
class TAAConfig:
    max_translate: float = 0.125  # fraction of the image side at strength 1
    max_brightness: float = 0.2
    max_contrast: float = 0.2
    flip: bool = False  # horizontal flips are not label-preserving for digits
    # EDM's non-leaky augmentation (method.md §9): the UNet sees each image's augmentation parameters
    # (added to its time embedding) and samples with the zero vector, i.e. "no augmentation".
    non_leaky: bool = False


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS / `ray job submit`, else a local instance
    cpus_per_actor: str = "auto"  # "auto" (the cluster's CPUs shared by the K actors) or a number
    gpus_per_actor: str = "auto"  # "auto" (1/ceil(K/GPUs) when the cluster has GPUs, else 0) or a number
    actor_resources: dict[str, float] = field(default_factory=dict)  # custom resources per actor
    placement_strategy: str = "PACK"
    placement_timeout_s: float = 120.0  # how long to wait for the actors' resources before failing
    round_timeout_s: float = 3600.0  # a shard that has not finished its round by then is failed
    max_actor_restarts: int = 3  # per run; past it the run fails, its last checkpoint kept


@dataclass
class MLflowConfig:
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else mlflow.db in the workspace root
    experiment: str = "memshard"
    register_as: str = "memshard-digits"
    sample_grid_every: int = 5  # rounds; 0 turns the grid off
    sample_grid_images: int = 16
    sample_grid_steps: int = 100  # DDPM sampling steps for the progress grid (the final model uses 1000)
    checkpoint_dir: str = ".memshard/checkpoints"  # relative: under the workspace root
    checkpoint_every: str = "auto"  # rounds between checkpoints, or "auto": by the state's size (orchestrator/checkpoint.py)


@dataclass
class SelectionConfig:
    """Which round `memshard train` registers (memshard.commands.checkpoint_choice): every `every` rounds and
    at the last, the delivered weights' near copies and quality are measured on the shard actors, and the
    round that copies least within `max_quality_loss` of the run's best Fréchet is registered."""

    every: int = 2  # rounds between measurements (the last round always); 0: none, the last round is registered
    max_quality_loss: float = DEFAULT_MAX_QUALITY_LOSS  # Fréchet at most the run's best x (1 + this)
    register: str = "least-copying"  # or "last" (--register-last-round): the curve is measured, the last registered
    # Cheap on a CPU: a few hundred DDIM generations per point, compared along one run (not a full evaluation).
    num_images: int = 200
    sampler: str = "ddim"
    sampling_steps: int = 50
    batch_size: int = 50


@dataclass
class GuardConfig:
    """The copy guard at generation (memshard.guard): the default of the model this run registers, and
    of `memshard evaluate` and the registered model's predict for it unless they name another mode."""

    mode: str = "off"  # off, reject (draw a near copy again) or guidance (steer away from the nearest image)
    # Near-copy threshold: the real images' leave-one-out distance at this quantile. The calibration's
    # NEAR_COPY_QUANTILE is the loosest allowed; a larger quantile is stricter (flags more generations).
    quantile: float = NEAR_COPY_QUANTILE
    # guidance: how far x0-hat moves per step, in units of its shortfall to the threshold. At 1 a moved
    # generation ends on the line (6% near copies left on the first 300 digits); 2 clears it (BENCHMARKS.md).
    scale: float = 2.0
    max_redraws: int = 8  # reject: redraw rounds per batch before a near copy is reported unresolved
    carry: str = "reference"  # what the registered model holds: the dataset's path and fingerprint, or the images


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    iet: IETConfig = field(default_factory=IETConfig)
    agc: AGCConfig = field(default_factory=AGCConfig)
    msr: MSRConfig = field(default_factory=MSRConfig)
    taa: TAAConfig = field(default_factory=TAAConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    @property
    def uses_agc(self) -> bool:
        return self.iet.method in ("iet-agc", "iet-agc-plus")

    @property
    def uses_msr(self) -> bool:
        return self.iet.method == "iet-agc-plus" and self.iet.shards > 1

    @property
    def uses_taa(self) -> bool:
        return self.iet.method == "iet-agc-plus"

    @property
    def conditions_on_augmentation(self) -> bool:
        return self.uses_taa and self.taa.non_leaky


# The settings that say where a run's files go on this machine (relative paths: under the workspace root).
# They are where-settings: a resumed or retrained run takes them from its flags or the defaults here,
# never from its saved configuration, which may name another machine's folders.
PLACE_SETTINGS = ("data.cache_dir", "mlflow.checkpoint_dir")
# Every where-setting (README "Where-settings"): the Ray cluster, the MLflow store (which may hold
# credentials) and the folders. They say where a command runs and writes, never what it computes: each
# command asks for them again, no saved run supplies them and no sweep varies them.
WHERE_SETTINGS = ("ray.address", "mlflow.tracking_uri", *PLACE_SETTINGS)


def with_default_places(cfg: Config, settings: tuple[str, ...] = PLACE_SETTINGS) -> Config:
    """`cfg` with its PLACE_SETTINGS (or other where-`settings`) back at their defaults: a saved
    configuration read on this machine, or a configuration handed on without where it ran."""
    default = Config()
    for dotted in settings:
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, getattr(getattr(default, section), key))
    return cfg


DEFAULT_PRESET = "digits"  # what `memshard train` and `memshard tune` start from without --preset
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # CPU tests: a round of a few local steps takes seconds; the sharded method, so that tests drive the
    # actors, AGC, MSR and averaging unless they name another.
    "tiny": {
        "data": {"resolution": 8},
        "model": {"block_out_channels": (16, 32), "layers_per_block": 1},
        "training": {"batch_size": 16, "warmup_steps": 2},
        "iet": {"method": "iet-agc-plus", "shards": 2, "rounds": 2, "local_steps": 3},
        "mlflow": {"sample_grid_every": 0, "register_as": "memshard-tiny"},
        "selection": {"every": 0},  # a test that asks for the checkpoint choice sets it
    },
    # The default: the bundled digits at 16x16 with a small UNet, a CPU finishes it in minutes. The EMA
    # measured better there for ddpm and IET-AGC+ (BENCHMARKS.md, issue 12): steadier, better quality per
    # round, and no more copying at equal quality. tiny (tests) and cifar32 (not measured) keep it off.
    "digits": {"training": {"ema": True}},
    # The published CIFAR-10 model and setting of IET (method.md §1): 35.7M parameters. Not measured here.
    "cifar32": {
        "data": {"resolution": 32, "channels": 3},
        "model": {
            "block_out_channels": (128, 256, 256, 256),
            "layers_per_block": 2,
            "attention_resolutions": (16,),
            "dropout": 0.1,
        },
        "training": {"batch_size": 128, "learning_rate": 2e-4, "grad_clip": 1.0,
                     "warmup_steps": 5000, "mixed_precision": "bf16"},
        "iet": {"method": "iet-agc-plus", "shards": 10, "rounds": 10, "local_steps": 3900},  # 100 epochs of 5,000 images at batch 128
        "mlflow": {"register_as": "memshard-cifar32"},
    },
}


def build_config(
    preset: str = DEFAULT_PRESET,
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> Config:
    """The one way to make a Config: preset, then file, then explicit flags, then `--set k=v`."""
    if preset not in PRESETS:
        raise MemshardError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    cfg = Config()
    apply_tree(cfg, PRESETS[preset], origin=f"preset {preset}")
    if file is not None:
        apply_tree(cfg, load_config_file(file), origin=str(file))
    for dotted, value in build_partial(overrides, sets).items():
        set_dotted(cfg, dotted, value, origin="command line")
    fold_baseline_to_equal_compute(cfg)
    validate(cfg)
    return cfg


def build_partial(overrides: dict[str, Any] | None, sets: list[str] | None) -> dict[str, Any]:
    """Only the settings named by flags and `--set`, type-checked: {"section.key": value}."""
    scratch = Config()
    named: dict[str, Any] = {}
    pairs = [(k, v, "command line") for k, v in (overrides or {}).items() if v is not None]
    for item in sets or []:
        dotted, sep, text = item.partition("=")
        if not sep:
            raise MemshardError(f"--set {item!r} has no '=': write --set section.key=value")
        pairs.append((dotted.strip(), parse_scalar(text.strip()), "--set"))
    for dotted, value, origin in pairs:
        set_dotted(scratch, dotted, value, origin)
        section, key = dotted.split(".", 1)
        named[dotted] = getattr(getattr(scratch, section), key)
    return named


def fold_baseline_to_equal_compute(cfg: Config) -> None:
    """`--method ddpm` trains ONE model with the compute of the K-shard run it is compared with.

    So `--method ddpm` and `--method iet-agc-plus` are one flag apart and spend the same number of
    optimizer steps: K shards x S local steps per round become 1 model x K*S steps per round.
    """
    if cfg.iet.method == "ddpm" and cfg.iet.shards > 1:
        cfg.iet.local_steps *= cfg.iet.shards
        cfg.iet.shards = 1


def load_config_file(path: str | Path, flag: str = "--config", what: str = "config file") -> dict[str, Any]:
    """A YAML, TOML (or, for a `--grid`, JSON) file as a tree; bounded: at most MAX_CONFIG_FILE_BYTES,
    no YAML anchors/aliases. `flag` and `what` name the file in the errors."""
    path = Path(path)
    try:
        is_file = path.is_file()
    except OSError:  # a name too long for the file system
        is_file = False
    if not is_file:
        raise MemshardError(f"{what} {path} does not exist: check the path given to {flag}")
    if path.suffix not in (".toml", ".yaml", ".yml", *((".json",) if flag == "--grid" else ())):
        kinds = "not .yaml/.yml, .json or .toml" if flag == "--grid" else "neither .yaml/.yml nor .toml"
        raise MemshardError(f"{what} {path} is {kinds}: rename it")
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_FILE_BYTES + 1)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MemshardError(f"{what} {path} cannot be read as UTF-8 text ({exc}): "
                            f"check the path given to {flag}") from None
    if len(data) > MAX_CONFIG_FILE_BYTES:
        raise MemshardError(f"{what} {path} is larger than {MAX_CONFIG_FILE_BYTES >> 10} KiB: "
                            f"a {what} holds a few settings; check the path given to {flag}")
    try:
        tree = (tomllib.loads(text) if path.suffix == ".toml" else json.loads(text) if path.suffix == ".json"
                else yaml.load(text, Loader=_NoAliasLoader) or {})
    except _AliasRefused as exc:
        raise MemshardError(f"{what} {path}: {exc}") from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise MemshardError(f"{what} {path} does not parse ({first_line}): fix its syntax") from None
    if not isinstance(tree, dict):
        raise MemshardError(f"{what} {path} must hold sections (data:, training:, ...) at the top")
    return tree


class _AliasRefused(yaml.YAMLError):
    pass


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases: a few hundred bytes of nested aliases ("billion
    laughs") expand to gigabytes, and a config file never needs them."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise _AliasRefused(f"line {event.start_mark.line + 1} uses the YAML {kind}{event.anchor[:40]}; "
                                "memshard does not expand anchors and aliases: write the values out")
        return super().compose_node(parent, index)


def apply_tree(cfg: Config, tree: dict[str, Any], origin: str) -> None:
    if not isinstance(tree, dict):
        raise MemshardError(f"{origin}: the settings must be sections of keys (data, training, ...), "
                            f"not {type(tree).__name__}")
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise MemshardError(f"{origin}: {shown(section)} must be a section of keys, e.g. {shown(section)}: {{...}}")
        for key, value in values.items():
            set_dotted(cfg, f"{section}.{key}", value, origin)


def set_dotted(cfg: Config, dotted: str, value: Any, origin: str) -> None:
    section_name, _, key = dotted.partition(".")
    sections = {f.name for f in dataclasses.fields(Config)}
    if section_name not in sections or not key:
        raise MemshardError(
            f"{origin}: unknown setting {shown(dotted)}: sections are {', '.join(sorted(sections))}"
        )
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise MemshardError(
            f"{origin}: unknown key {shown(dotted)}: {section_name} has {', '.join(hints)}"
        )
    setattr(section, key, coerce(value, hints[key], dotted, origin))


def coerce(value: Any, hint: Any, dotted: str, origin: str) -> Any:
    """Check `value` against the field's type; ints widen to floats, lists become tuples."""
    wrong = MemshardError(f"{origin}: {shown(dotted)[1:-1]} = {shown(value)} has the wrong type: "
                          f"expected {_type_name(hint)}")
    origin_type = typing.get_origin(hint)
    if origin_type in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        for option in typing.get_args(hint):
            if option is type(None):
                continue
            try:
                return coerce(value, option, dotted, origin)
            except MemshardError:
                pass
        raise wrong
    if origin_type is dict:
        if not isinstance(value, dict):
            raise wrong
        _, item_type = typing.get_args(hint)
        return {str(k): coerce(v, item_type, f"{dotted}.{k}", origin) for k, v in value.items()}
    if origin_type is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `--set model.attention_resolutions=16` means (16,)
        if not isinstance(value, (list, tuple)):
            raise wrong
        (item_type, _) = typing.get_args(hint)
        return tuple(coerce(parse_scalar(v) if isinstance(v, str) else v, item_type, dotted, origin) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -_INT64 <= value < _INT64:
                raise MemshardError(f"{origin}: {shown(dotted)[1:-1]} = {shown(value)} is out of range: "
                                    "give a 64-bit integer")
            return value
        raise wrong
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads a float without a dot (5e-5) as text
            try:
                value = float(value.strip())
            except ValueError:
                raise wrong from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise MemshardError(f"{origin}: {shown(dotted)[1:-1]} = {shown(value)} is not a finite number: "
                                    "give a finite one")
            return number
        raise wrong
    if hint is str:
        if value is False and dotted in OFF_SETTINGS:  # YAML 1.1 (files, --set, grids) reads a bare `off` as false
            return "off"
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong
    raise wrong


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list such as 16,32"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars: 3 -> int, 0.5 -> float, true -> bool, null -> None.

    No anchors or aliases; text that does not parse (or would not be a scalar's worth) stays text."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader) if text else ""
    except (yaml.YAMLError, ValueError, RecursionError):
        return text


def parse_sets(sets: list[str], hints: dict[str, Any], example: str) -> dict[str, Any]:
    """`--set key=value` items for settings outside the training Config (unlearning's): `hints` maps
    each accepted key to its type. Values are read by `parse_scalar` and checked by `coerce`, so a
    missing '=', an unknown key or a wrong type is the same one-line error as for a training setting."""
    chosen: dict[str, Any] = {}
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise MemshardError(f"--set {item!r} has no '=': write --set {example}")
        if key not in hints:
            raise MemshardError(f"--set: unknown setting {key!r}: use one of {', '.join(hints)}")
        chosen[key] = coerce(parse_scalar(text.strip()), hints[key], key, "--set")
    return chosen


def field_hints(cls: type, prefix: str = "") -> dict[str, Any]:
    """`prefix + name` -> type of each field of dataclass `cls` (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {prefix + f.name: hints[f.name] for f in dataclasses.fields(cls)}


def validate(cfg: Config) -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise MemshardError(message)

    m, t, i = cfg.model, cfg.training, cfg.iet
    for section in dataclasses.fields(cfg):
        for name, value in vars(getattr(cfg, section.name)).items():
            require(not (isinstance(value, str) and "\x00" in value), f"{section.name}.{name} holds a NUL character: remove it")
    require(i.method in METHODS, f"unknown method {i.method!r}: choose one of {', '.join(METHODS)}")
    require(i.shards >= 1, f"iet.shards = {i.shards}: need at least 1 shard")
    require(i.rounds >= 1, f"iet.rounds = {i.rounds}: need at least 1 round (--rounds)")
    require(i.local_steps >= 1, f"iet.local_steps = {i.local_steps}: need at least 1 step (--local-steps)")
    require(len(m.block_out_channels) >= 1 and all(c > 0 for c in m.block_out_channels),
            f"model.block_out_channels = {m.block_out_channels}: give positive widths, e.g. 32,64,64")
    require(all(c % 8 == 0 for c in m.block_out_channels),
            f"model.block_out_channels = {m.block_out_channels}: widths must be multiples of 8 (GroupNorm groups)")
    require(m.layers_per_block >= 1, f"model.layers_per_block = {m.layers_per_block}: need at least 1")
    require(0.0 <= m.dropout < 1.0, f"model.dropout = {m.dropout}: must be in [0, 1)")
    require(2 <= m.num_train_timesteps <= 100_000,
            f"model.num_train_timesteps = {m.num_train_timesteps}: need 2 to 100,000 (published: 1000)")
    require(0 < m.beta_start < m.beta_end < 1, f"model betas {m.beta_start}..{m.beta_end}: need 0 < start < end < 1")
    require(m.beta_schedule in BETA_SCHEDULES,
            f"model.beta_schedule = {shown(m.beta_schedule)}: choose one of {', '.join(BETA_SCHEDULES)}")
    r = cfg.data.resolution
    factor = 2 ** (len(m.block_out_channels) - 1)
    require(8 <= r <= 1024 and r % 8 == 0 and r % factor == 0,
            f"data.resolution = {r} cannot be used: the UNet halves it {len(m.block_out_channels) - 1} times; "
            f"choose a multiple of {max(8, factor)} such as {max(8, factor) * 4}")
    require(all(a in _feature_map_sizes(r, len(m.block_out_channels)) for a in m.attention_resolutions),
            f"model.attention_resolutions = {m.attention_resolutions}: the UNet's feature maps are "
            f"{_feature_map_sizes(r, len(m.block_out_channels))}")
    require(cfg.data.channels in (None, 1, 3), f"data.channels = {cfg.data.channels}: must be 1 or 3")
    require(t.batch_size >= 1, f"training.batch_size = {t.batch_size}: need at least 1")
    require(t.learning_rate > 0, f"training.learning_rate = {t.learning_rate}: must be > 0")
    require(t.weight_decay >= 0, f"training.weight_decay = {t.weight_decay}: must be >= 0")
    require(t.warmup_steps >= 0, f"training.warmup_steps = {t.warmup_steps}: must be >= 0")
    require(t.grad_clip > 0, f"training.grad_clip = {t.grad_clip}: must be > 0")
    require(0 < t.ema_max_decay < 1, f"training.ema_max_decay = {t.ema_max_decay}: must be in (0, 1), e.g. 0.9999")
    require(t.ema_power > 0, f"training.ema_power = {t.ema_power}: must be > 0, e.g. 0.75")
    require(t.ambient_alpha_bar is None or 0 < t.ambient_alpha_bar < 1,
            f"training.ambient_alpha_bar = {t.ambient_alpha_bar}: must be in (0, 1), e.g. 0.8, or null (off)")
    require(t.ambient_weighting in AMBIENT_WEIGHTINGS,
            f"training.ambient_weighting = {shown(t.ambient_weighting)}: choose one of {', '.join(AMBIENT_WEIGHTINGS)}")
    require(t.mixed_precision in ("no", "bf16"), f"training.mixed_precision = {t.mixed_precision!r}: use no or bf16")
    require(t.device in ("auto", "cpu", "cuda"), f"training.device = {shown(t.device)}: use auto, cpu or cuda")
    require(not (t.device == "cuda" and cfg.ray.gpus_per_actor != "auto" and _is_nonnegative_number(
        cfg.ray.gpus_per_actor) and float(cfg.ray.gpus_per_actor) == 0),
            "training.device = cuda but ray.gpus_per_actor = 0 gives the actors no GPU: use auto or a number > 0")
    require(0 <= t.seed < _INT64, f"training.seed = {t.seed}: must be in [0, 2**63)")
    require(cfg.agc.lam > 0, f"agc.lam = {cfg.agc.lam}: must be > 0 (published: 2.0)")
    require(0.0 <= cfg.agc.decay < 1.0, f"agc.decay = {cfg.agc.decay}: must be in [0, 1) (published: 0.8)")
    require(0.0 < cfg.msr.fraction <= 1.0, f"msr.fraction = {cfg.msr.fraction}: must be in (0, 1] (published: 0.25)")
    require(cfg.msr.schedule in MSR_SCHEDULES,
            f"msr.schedule = {cfg.msr.schedule!r}: choose one of {', '.join(MSR_SCHEDULES)}")
    require(cfg.msr.reset in MSR_RESETS,
            f"msr.reset = {shown(cfg.msr.reset)}: choose one of {', '.join(MSR_RESETS)} (published: sender)")
    for name in ("max_translate", "max_brightness", "max_contrast"):
        value = getattr(cfg.taa, name)
        require(0.0 <= value <= 1.0, f"taa.{name} = {value}: must be in [0, 1]")
    require(cfg.ray.cpus_per_actor == "auto" or _is_positive_number(cfg.ray.cpus_per_actor),
            f"ray.cpus_per_actor = {cfg.ray.cpus_per_actor!r}: use auto or a number > 0")
    require(all(k.strip() and k not in ("CPU", "GPU", "memory", "object_store_memory") for k in cfg.ray.actor_resources),
            f"ray.actor_resources = {shown(cfg.ray.actor_resources)}: name custom resources only "
            "(CPU and GPU are ray.cpus_per_actor / ray.gpus_per_actor)")
    require(all(v > 0 for v in cfg.ray.actor_resources.values()),
            f"ray.actor_resources = {cfg.ray.actor_resources}: amounts must be > 0")
    require(cfg.ray.placement_timeout_s > 0, f"ray.placement_timeout_s = {cfg.ray.placement_timeout_s}: must be > 0")
    require(cfg.ray.gpus_per_actor == "auto" or _is_nonnegative_number(cfg.ray.gpus_per_actor),
            f"ray.gpus_per_actor = {cfg.ray.gpus_per_actor!r}: use auto or a number >= 0")
    require(cfg.ray.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
            f"ray.placement_strategy = {cfg.ray.placement_strategy!r}: use PACK or SPREAD")
    require(cfg.ray.round_timeout_s > 0, f"ray.round_timeout_s = {cfg.ray.round_timeout_s}: must be > 0")
    require(cfg.ray.max_actor_restarts >= 0, f"ray.max_actor_restarts = {cfg.ray.max_actor_restarts}: must be >= 0")
    require(cfg.mlflow.sample_grid_every >= 0, "mlflow.sample_grid_every must be >= 0 (0 turns it off)")
    require(cfg.mlflow.sample_grid_images >= 1, "mlflow.sample_grid_images must be >= 1")
    check_model_name(cfg.mlflow.register_as, "mlflow.register_as")
    require(bool(cfg.mlflow.experiment.strip()), "mlflow.experiment is empty: give an experiment name (--experiment)")
    require(cfg.mlflow.sample_grid_steps >= 1, "mlflow.sample_grid_steps must be >= 1")
    sel = cfg.selection
    require(sel.every >= 0, f"selection.every = {sel.every}: give rounds >= 1, or 0 to register the last round unmeasured")
    check_quality_loss(sel.max_quality_loss, f"selection.max_quality_loss = {sel.max_quality_loss}")
    require(sel.register in REGISTERED_ROUNDS,
            f"selection.register = {shown(sel.register)}: choose one of {', '.join(REGISTERED_ROUNDS)}")
    require(sel.num_images >= 2, f"selection.num_images = {sel.num_images}: need at least 2 (Fréchet needs two)")
    require(sel.batch_size >= 1, f"selection.batch_size = {sel.batch_size}: need at least 1")
    require(1 <= sel.sampling_steps <= m.num_train_timesteps,
            f"selection.sampling_steps = {sel.sampling_steps}: choose 1 to {m.num_train_timesteps} (the training timesteps)")
    check_guard(cfg.guard)
    every = cfg.mlflow.checkpoint_every
    require(every == "auto" or (every.isascii() and every.isdigit() and len(every) < 19 and int(every) >= 1),
            f"mlflow.checkpoint_every = {shown(every)}: use auto or a whole number of rounds >= 1")


def check_quality_loss(value: float, named: str) -> float:
    """A quality budget (Fréchet at most the reference's x (1 + value)) in [0, MAX_QUALITY_LOSS_LIMIT], the one
    bound of `selection.max_quality_loss` and train's and tune's `--max-quality-loss`; refuses nan and inf.
    `named` says where the value came from, as the error's first words."""
    if not 0 <= value <= MAX_QUALITY_LOSS_LIMIT:
        raise MemshardError(f"{named}: give a fraction from 0 to {MAX_QUALITY_LOSS_LIMIT:g}, e.g. 0.1 or 10%")
    return value


def check_guard(guard: GuardConfig) -> None:
    """The guard section's values, one line each (also for a model's guard file and predict's request)."""
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise MemshardError(message)

    require(guard.mode in GUARD_MODES, f"guard.mode = {shown(guard.mode)}: choose one of {', '.join(GUARD_MODES)}")
    require(NEAR_COPY_QUANTILE <= guard.quantile < 1.0,
            f"guard.quantile = {guard.quantile}: give {NEAR_COPY_QUANTILE} (the near-copy calibration) up to below 1; "
            "a smaller quantile would let through near copies the calibration counts")
    require(math.isfinite(guard.scale) and 0.0 < guard.scale <= 100.0,
            f"guard.scale = {guard.scale}: give a number in (0, 100], e.g. 1 (x0-hat moved to the threshold)")
    require(0 <= guard.max_redraws <= 1000, f"guard.max_redraws = {guard.max_redraws}: give 0 to 1000")
    require(guard.carry in GUARD_CARRIES, f"guard.carry = {shown(guard.carry)}: choose one of {', '.join(GUARD_CARRIES)}")


def _feature_map_sizes(resolution: int, levels: int) -> list[int]:
    return [resolution // 2**k for k in range(levels)]


def _is_nonnegative_number(text: str) -> bool:
    try:
        return math.isfinite(float(text)) and float(text) >= 0
    except (ValueError, OverflowError):
        return False


def _is_positive_number(text: str) -> bool:
    return _is_nonnegative_number(text) and float(text) > 0


def to_dict(cfg: Config) -> dict[str, Any]:
    """The configuration as it may be written anywhere (config.json, checkpoints, params, Ray task
    arguments): credentials in `mlflow.tracking_uri` are replaced by `***` — the one place that does
    it, so no writer can leak them. The URI is a where-setting: a resume or retrain is given it again."""
    tree = dataclasses.asdict(cfg)
    if tree["mlflow"]["tracking_uri"] is not None:
        tree["mlflow"]["tracking_uri"] = redact_uri(tree["mlflow"]["tracking_uri"])
    return tree


def check_model_name(name: str, what: str) -> None:
    """A registered model name MLflow's registry takes (its rule: not empty, no '/' or ':', not '.' and
    not starting with '..', which it reads as a path), checked where the name comes in: the registry
    would refuse it only after training, once per retried attempt."""
    if not name.strip():
        raise MemshardError(f"{what} is empty: give a model name")
    if any(c in name for c in "/:") or name == "." or name.startswith(".."):
        raise MemshardError(f"{what} = {shown(name)}: MLflow refuses a model name that holds '/' or ':', is '.' "
                            "or starts with '..': choose another name")


REDACTED = "***"


def redact_uri(uri: str) -> str:
    """Drop credentials (user:password@) from a URI before it is logged, saved or printed."""
    try:
        parts = urlsplit(uri)
        has_credentials = parts.username is not None or parts.password is not None
        host, port = parts.hostname or "", parts.port
    except ValueError:  # a malformed port or netloc: keep nothing of the netloc that could be a secret
        return f"{uri.split('://', 1)[0]}://{REDACTED}" if "://" in uri and "@" in uri else uri
    if not has_credentials:
        return uri
    if port:
        host += f":{port}"
    return urlunsplit((parts.scheme, f"{REDACTED}@{host}", parts.path, parts.query, parts.fragment))


def is_redacted(uri: str | None) -> bool:
    """True for a URI whose credentials `redact_uri` removed (it cannot be used as is)."""
    return uri is not None and (f"://{REDACTED}@" in uri or uri.endswith(f"://{REDACTED}"))


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `to_dict` (checkpoints, MLflow lineage); validated like any other."""
    if not isinstance(tree, dict):
        raise MemshardError(f"the saved config is a {type(tree).__name__}, not sections of settings: it is damaged")
    cfg = Config()
    apply_tree(cfg, _without_retired(tree), origin="saved config")
    validate(cfg)
    return cfg


# Settings older runs saved that no longer exist; `from_dict` drops them so those runs still resume and
# unlearn: training.ema_decay (nothing used the EMA), faults (test-only, see shard_worker/faults.py).
RETIRED_SETTINGS = ("training.ema_decay", "faults")


def _without_retired(tree: dict[str, Any]) -> dict[str, Any]:
    return {
        section: {k: v for k, v in values.items() if f"{section}.{k}" not in RETIRED_SETTINGS}
        if isinstance(values, dict) else values
        for section, values in tree.items() if section not in RETIRED_SETTINGS
    }


def flatten(cfg: Config) -> dict[str, str]:
    """`section.key -> value` strings for MLflow params."""
    return {
        f"{section}.{key}": json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
        for section, values in to_dict(cfg).items()
        for key, value in values.items()
    }
