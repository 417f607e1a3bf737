"""Evaluation and deployment: what is read back from trained runs and reported about them.

Cross-validation (``python -m hmil.evaluate``): :mod:`~hmil.evaluation.cross_validation`
runs it, :mod:`~hmil.evaluation.runs` reads each fold's test predictions,
:mod:`~hmil.evaluation.metrics` and :mod:`~hmil.evaluation.summary` compute per-fold, pooled
and bootstrapped metrics, :mod:`~hmil.evaluation.report` writes them as Markdown and JSON,
:mod:`~hmil.evaluation.plots` draws ROC, confusion and training curves and
:mod:`~hmil.evaluation.outputs` puts every table and plot in place together.
Comparison (``python -m hmil.compare``): :mod:`~hmil.evaluation.comparison` ranks the
evaluated runs, naming failed ones (it owns their ``FAILED`` marker).
Deployment (``python -m hmil.deploy``): :mod:`~hmil.evaluation.fold_models` loads a run's
fold models, :mod:`~hmil.evaluation.ensemble` averages their probabilities and attention
per slide, :mod:`~hmil.evaluation.deploy_inputs` checks the cohort and its features
against the training record, and :mod:`~hmil.evaluation.deploy` predicts and writes,
reusing the cross-validation metrics for a labelled cohort.
Heatmaps (``python -m hmil.heatmaps``): :mod:`~hmil.evaluation.heatmap_drawing` draws each
slide of a run, :mod:`~hmil.evaluation.heatmap_inputs` reads the attention and patch grid,
:mod:`~hmil.evaluation.attention_maps` paints attention over a thumbnail (pure numpy),
:mod:`~hmil.evaluation.heatmap_figures` draws the figures and :mod:`~hmil.evaluation.qupath`
writes the patches as QuPath tiles.
:mod:`~hmil.evaluation.settings` declares the settings of evaluation, deployment and heatmaps
(the bootstrap evaluate and deploy share).
"""
