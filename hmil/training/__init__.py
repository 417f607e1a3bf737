"""Fitting one fold; ``python -m hmil.train`` is the edge that builds the settings.

:mod:`~hmil.training.settings` declares each training setting once (type, each protocol's
value, bounds, help; torch-free, the workflow reads it), and :mod:`~hmil.training.config`
builds on it (:class:`TrainSettings` asked, :class:`RunOptions` paths and run options,
:class:`TrainConfig` recorded);
:mod:`~hmil.training.fit` runs the steps of a fold (``fit_fold``) and its epochs;
:mod:`~hmil.training.cohort` gives the fold's slides and bags;
:mod:`~hmil.training.model_setup` builds the model, its loss settings and an MHIM teacher;
:mod:`~hmil.training.schedule` makes the optimiser and lr schedule;
:mod:`~hmil.training.loop` runs one epoch (seeding, loaders, instance dropping, precision);
:mod:`~hmil.training.prediction` predicts a split and scores it;
:mod:`~hmil.training.selection` keeps the best epoch, stops early and warns of runs that
did not learn; :mod:`~hmil.training.checkpoints` resumes and skips runs (last.pt);
:mod:`~hmil.training.outputs` writes the final outputs (attention.h5 also for deployment);
:mod:`~hmil.training.failures` records a failed run as its outputs;
:mod:`~hmil.training.losses` holds HMIL's loss terms, curriculum and loss presets, and
:mod:`~hmil.training.selection_metrics` the classification metrics.
"""
