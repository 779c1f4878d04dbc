"""Pure metric code for generated images: nearest-neighbour scan, memorization metrics, FID.

Torch and numpy only: nothing here talks to MLflow or Ray (`memshard.commands.evaluate` does).
"""
