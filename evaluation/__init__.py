"""Measuring generated images: nearest-neighbour scan, memorization metrics, FID, figures, and the
evaluation of a loaded model built from them (`evaluate`) and the side-by-side table (`compare`).

Torch and numpy only: nothing here talks to MLflow or Ray (`memshard.commands.evaluate` does).
"""
