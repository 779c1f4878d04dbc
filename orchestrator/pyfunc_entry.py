"""The code MLflow runs to load a memshard model (models-from-code; see pipeline_model.py)."""

import mlflow

from memshard.orchestrator.pipeline_model import DDPMPipelineModel

mlflow.models.set_model(DDPMPipelineModel())
