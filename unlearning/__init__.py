"""Data unlearning for diffusion models: pure algorithms over a UNet, a scheduler and uint8 images.

No MLflow, no Ray here: `memshard.commands.unlearn` drives these functions and records what they did.
SISS follows "Data Unlearning in Diffusion Models" (Alberti et al., ICLR 2025); see method.md §6.
"""

from memshard.unlearning.forget_set import parse_forget_spec
from memshard.unlearning.methods import METHODS, UnlearnSettings, unlearn

__all__ = ["METHODS", "UnlearnSettings", "parse_forget_spec", "unlearn"]
