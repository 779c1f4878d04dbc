"""Test-only fault injection: a real process exit, a real stall, a real NaN, the driver exiting.

Not a setting: nothing here is in a user's configuration or in a run's MLflow params. A plan is
installed only through the environment variable MEMSHARD_TEST_FAULTS (JSON with the fields of
`FaultPlan`), which the reliability tests set; `memshard train` (and generation on Ray,
`orchestrator.generation`) reads it once, at its start, and hands the plan to the driver and, as an
explicit argument, to every shard actor (generation worker) — wherever in the cluster those run.
Without the variable nothing is injected and nothing is checked.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from memshard.files import in_workspace

FAULTS_ENV = "MEMSHARD_TEST_FAULTS"


@dataclass(frozen=True)
class FaultPlan:
    shard: int = -1  # the shard whose actor the faults below hit
    exit_at_steps: tuple[int, ...] = ()  # its process exits (os._exit) at these global steps, once each
    stall_at_steps: tuple[int, ...] = ()  # it sleeps for an hour at these global steps, once each
    nan_at_step: int = -1  # its loss becomes NaN at this global step
    driver_exit_after_round: int = 0  # the driver process exits right after checkpointing this round
    driver_exit_before_manifest: int = 0  # it exits once this round's proxy files are written, before checkpoint.pt
    stall_at_batches: tuple[int, ...] = ()  # a generation worker sleeps for an hour on these batches, once each
    marker_dir: str = ".memshard/faults"  # remembers which faults fired, so a replacement actor goes on

    @classmethod
    def from_environment(cls) -> FaultPlan | None:
        """The plan in MEMSHARD_TEST_FAULTS, its marker_dir resolved here, in the driver, under the workspace
        root: the actors get the absolute path, wherever they run."""
        text = os.environ.get(FAULTS_ENV)
        if not text:
            return None
        given = json.loads(text)
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{FAULTS_ENV} names unknown faults {sorted(unknown)}")
        plan = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
        return replace(plan, marker_dir=str(in_workspace(plan.marker_dir)))

    def before_step(self, shard: int, step: int) -> None:
        """Exit this process (a real crash, not an exception) or stall, at a step, once each."""
        if shard != self.shard:
            return
        if step in self.exit_at_steps and self._first_time(f"exit-shard{shard}-step{step}"):
            os._exit(17)
        if step in self.stall_at_steps and self._first_time(f"stall-shard{shard}-step{step}"):
            time.sleep(3600)

    def before_batch(self, batch: int) -> None:
        """A generation worker stalls on a chosen batch (its index in the plan), once each."""
        if batch in self.stall_at_batches and self._first_time(f"stall-batch{batch}"):
            time.sleep(3600)

    def _first_time(self, fault: str) -> bool:
        """Whether this fault fires now: not yet fired (by this actor or the one it replaced)."""
        marker = Path(self.marker_dir) / fault
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return True

    def losses(self, losses: torch.Tensor, shard: int, step: int) -> torch.Tensor:
        """The step's per-sample losses, made NaN at the chosen step (a real NaN through the real step)."""
        if shard == self.shard and step == self.nan_at_step:
            return losses * float("nan")
        return losses

    def before_manifest(self, round_index: int) -> None:
        """The driver process dies between the proxies' writing their files and its checkpoint naming them."""
        if round_index == self.driver_exit_before_manifest:
            os._exit(3)

    def after_checkpoint(self, round_index: int) -> None:
        """The driver process dies right after checkpointing the chosen round."""
        if round_index == self.driver_exit_after_round:
            os._exit(3)
