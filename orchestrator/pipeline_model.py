"""The final model in MLflow: a saved DDPMPipeline logged as a pyfunc, registered by name.

`predict({"num_images": n, "seed": s})` returns n images as an N x H x W x C uint8 array; an optional
`"guard": "off" | "reject" | "guidance"` samples through the copy guard (memshard.guard), by default
the mode of the guard reference the model carries (its MLflow artifact "guard": guard.json, written
from the training config's `guard` section; a model logged before the guard has none, and samples
unguarded). What the guard did to the last request is `last_guard_log`.

The model is logged as code (MLflow's models-from-code: `pyfunc_entry.py` is copied into the model),
not as a pickle, so a registered model depends on the stable name `memshard.orchestrator.pipeline_model`
and nothing else of memshard's layout.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from memshard.config import GUARD_MODES
from memshard.errors import MemshardError
from memshard.guard import Guard, GuardLog, load_guard, read_guard_settings
from memshard.pipeline import DEFAULT_BATCH_SIZE, SamplingPlan, generate_plan, load_pipeline

# The request columns; MLflow turns a dict input into a one-row DataFrame with these columns.
PREDICT_SIGNATURE = ModelSignature(
    inputs=Schema([
        ColSpec("long", "num_images"),
        ColSpec("long", "seed"),
        ColSpec("long", "num_inference_steps", required=False),
        ColSpec("string", "guard", required=False),
    ])
)

PYFUNC_ENTRY = Path(__file__).with_name("pyfunc_entry.py")

# Listed explicitly so MLflow does not import and probe the environment to infer them.
_REQUIREMENTS = ("memshard", "mlflow", "torch", "diffusers", "numpy", "pandas", "pillow", "safetensors")


def _request_field(model_input: Any, key: str) -> Any:
    """One field of a predict request as given (None: absent): a dict, or the one-row DataFrame MLflow
    makes of it."""
    if isinstance(model_input, pd.DataFrame):
        if len(model_input) != 1:
            raise MemshardError(f"predict takes one request (one row), got {len(model_input)} rows")
        value = model_input[key].iloc[0] if key in model_input.columns else None
    elif isinstance(model_input, Mapping):
        value = model_input.get(key)
    else:
        raise MemshardError(f"predict takes {{'num_images': n, 'seed': s}}, got {type(model_input).__name__}")
    if isinstance(value, (list, tuple, np.ndarray)):  # a serving request may wrap scalars
        value = np.asarray(value).reshape(-1)
        value = value[0] if len(value) == 1 else value
    return None if value is None or (np.isscalar(value) and pd.isna(value)) else value


def _request_value(model_input: Any, key: str, default: int | None) -> int:
    """One integer field of a predict request."""
    value = _request_field(model_input, key)
    if value is None:
        if default is None:
            raise MemshardError(f"predict request has no {key!r}: pass {{'num_images': n, 'seed': s}}")
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, (bool, np.bool_)) or not number.is_integer():  # 3.0 is fine, 3.5 is not
        raise MemshardError(f"predict request {key}={value!r} must be one integer")
    return int(number)


class DDPMPipelineModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a saved pipeline: predict({"num_images", "seed"[, "num_inference_steps", "guard"]})."""

    def __init__(self) -> None:
        super().__init__()
        self._use_guard(None)

    def load_context(self, context) -> None:
        self.pipeline = load_pipeline(context.artifacts["pipeline"])
        guard = context.artifacts.get("guard")  # absent from models logged before the guard
        self._use_guard(None if guard is None else Path(guard))  # also for a pickled model, whose __init__ never ran

    def _use_guard(self, guard_dir: Path | None) -> None:
        self.guard_dir = guard_dir  # the folder of the model's guard.json; None: it carries none
        settings = None if guard_dir is None else read_guard_settings(guard_dir)
        self.default_guard = "off" if settings is None else settings.mode  # what a request without "guard" gets
        self._guards: dict[str, Guard] = {}  # loaded on a request's first use of a mode, then kept
        self.last_guard_log: GuardLog | None = None  # what the guard did to the last request (None: unguarded)

    # Annotated as a DataFrame because, with PREDICT_SIGNATURE, MLflow hands predict the request
    # dict as a one-row DataFrame; a plain dict (calling this class directly) works too. The
    # annotation also keeps MLflow from building its own type-hint validation around predict.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        # Default to the training timesteps: the published DDPM sampling protocol.
        default_steps = int(self.pipeline.scheduler.config.num_train_timesteps)
        plan = SamplingPlan(
            num_images=_request_value(model_input, "num_images", None),
            sampler="ddpm",
            steps=_request_value(model_input, "num_inference_steps", default_steps),
            batch_size=DEFAULT_BATCH_SIZE,
            seed=_request_value(model_input, "seed", None),
        )
        self.last_guard_log = None
        guard = self.guard(_request_mode(model_input, self.default_guard))
        if guard is None:
            return generate_plan(self.pipeline, plan).transpose(0, 2, 3, 1)  # (N, H, W, C), as documented
        images, self.last_guard_log = guard.plan(self.pipeline, plan)  # the same batches and seeds
        return images.transpose(0, 2, 3, 1)

    def guard(self, mode: str) -> Guard | None:
        """The model's guard in `mode` (None: off), loaded and checked against its training set once."""
        if mode == "off":
            return None
        if self.guard_dir is None:
            raise MemshardError(f"predict guard={mode!r}: this model carries no guard reference (it was registered "
                                "before the copy guard existed): predict with guard off, or register it again with "
                                "memshard train")
        if mode not in self._guards:
            self._guards[mode] = load_guard(self.guard_dir, mode, str(self.pipeline.device))
        return self._guards[mode]


def _request_mode(model_input: Any, default: str) -> str:
    """The request's "guard" field, one of GUARD_MODES (absent: the model's default)."""
    value = _request_field(model_input, "guard")
    if value is None:
        return default
    if not isinstance(value, str) or value not in GUARD_MODES:
        raise MemshardError(f"predict request guard={value!r} must be one of {', '.join(GUARD_MODES)}")
    return value


def _pip_requirements() -> list[str]:
    """The installed versions, pinned; a local label such as +cpu is dropped (it names a build)."""
    pins = []
    for name in _REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_pipeline_model(
    pipeline_dir: str | Path,
    registered_model_name: str | None,
    guard_dir: str | Path | None,
    artifact_name: str = "model",
) -> mlflow.models.model.ModelInfo:
    """Log the saved pipeline into the active run as a pyfunc; register it when a name is given.
    `guard_dir`: the folder `memshard.guard.write_guard_reference` wrote, logged as the model's "guard"
    artifact (None: the model carries no guard; predict then samples unguarded only)."""
    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise MemshardError(f"{pipeline_dir} is not a saved pipeline (no model_index.json): call save_pipeline first")
    if guard_dir is not None and read_guard_settings(guard_dir) is None:
        raise MemshardError(f"{guard_dir} holds no guard.json: write it with memshard.guard.write_guard_reference")
    if mlflow.active_run() is None:
        raise RuntimeError("log_pipeline_model logs into the active run: call it inside mlflow.start_run()")
    artifacts = {"pipeline": str(pipeline_dir)}  # copied into the model under artifacts/
    if guard_dir is not None:
        artifacts["guard"] = str(guard_dir)
    with warnings.catch_warnings():
        # No input_example on purpose (MLflow would load the model and sample to validate it);
        # the explicit signature already documents the request, so its nag is noise.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        return mlflow.pyfunc.log_model(
            name=artifact_name,
            python_model=str(PYFUNC_ENTRY),  # models-from-code: no pickle in the model
            artifacts=artifacts,
            registered_model_name=registered_model_name,
            signature=PREDICT_SIGNATURE,
            pip_requirements=_pip_requirements(),
        )
