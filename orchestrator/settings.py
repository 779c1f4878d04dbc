"""The one check of a training configuration, made before any work: `check(cfg)`.

`config.validate` checks every value the config layer can judge on its own. Four settings need things
defined in lower layers that the config layer may not import, so they are checked here, where both
are in reach: `msr.rule` (a rule of `orchestrator.sharding`'s registry), the server optimizer with
its hyperparameters (`aggregation`, which decides which ones each optimizer takes and their ranges),
`training.ambient_alpha_bar` (a level inside the noise schedule, `model.ambient_setting`) and
`selection.sampler` (one of `pipeline.SAMPLERS`).
Every entry point that trains calls `check`: `memshard train` (a new run or a resume), each
`memshard tune` trial, the efficacy bench.
"""

from __future__ import annotations

from memshard.aggregation import AggregationError, server_optimizer_settings
from memshard.config import Config, validate
from memshard.errors import MemshardError
from memshard.model import ambient_setting, build_scheduler
from memshard.orchestrator.sharding import destination_rule
from memshard.pipeline import SAMPLERS


def check(cfg: Config) -> None:
    """Every setting of `cfg`, or a one-line MemshardError naming the first bad one and the fix."""
    validate(cfg)
    destination_rule(cfg.msr.rule)
    server_hyperparameters(cfg)
    ambient_setting(cfg, build_scheduler(cfg))
    if cfg.selection.sampler not in SAMPLERS:
        raise MemshardError(f"selection.sampler = {cfg.selection.sampler!r}: choose one of {', '.join(SAMPLERS)}")


def server_hyperparameters(cfg: Config) -> dict[str, float]:
    """What `aggregation.server_optimizer` runs with: the hyperparameters set in `aggregation`, the
    optimizer's own defaults for the rest (the config keeps None for a default)."""
    chosen = {key: value for key, value in vars(cfg.aggregation).items()
              if key != "server_optimizer" and value is not None}
    try:
        return server_optimizer_settings(cfg.aggregation.server_optimizer, chosen)
    except AggregationError as error:  # its message starts with the setting's name
        raise MemshardError(f"aggregation.{error}") from None
