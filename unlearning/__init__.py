"""Data unlearning for diffusion models.

`methods` (SISS and the baselines) and `forget_set` are pure algorithms over a UNet, a scheduler and
uint8 images; `forget_check` holds the checks and stop rule that run during unlearning; `audit`
measures models before and after, without MLflow or Ray; `runner` brings in the model's lineage, runs a
method as a Ray task or retrains. Nothing here reads or writes MLflow: the runs, registered versions
and the runs a forget set or an audit reads (an evaluation, an earlier retrain) are
`memshard.commands.unlearn`'s.
SISS follows "Data Unlearning in Diffusion Models" (Alberti et al., ICLR 2025); see method.md §6.
"""
