"""Data unlearning for diffusion models.

`methods` (SISS and the baselines) and `forget_set` are pure algorithms over a UNet, a scheduler and
uint8 images; `audit` measures models before and after, without MLflow or Ray; `runner` brings in the
model's lineage, runs a method as a Ray task or retrains, and finds a retrain to compare with. The
MLflow runs and registered versions are `memshard.commands.unlearn`'s.
SISS follows "Data Unlearning in Diffusion Models" (Alberti et al., ICLR 2025); see method.md §6.
"""

from memshard.unlearning.forget_set import parse_forget_spec
from memshard.unlearning.methods import METHODS, UnlearnSettings, unlearn

__all__ = ["METHODS", "UnlearnSettings", "parse_forget_spec", "unlearn"]
