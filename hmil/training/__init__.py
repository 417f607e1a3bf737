"""Fitting one fold: losses, the training loop, model selection, checkpoints, failure records.

:mod:`~hmil.training.losses` holds HMIL's loss terms and curriculum;
:mod:`~hmil.training.presets` builds the frozen loss and MHIM settings from YAML presets;
:mod:`~hmil.training.loop` runs epochs and predicts; :mod:`~hmil.training.selection_metrics`
scores a validation split for model selection. ``python -m hmil.train`` is the edge.
"""
