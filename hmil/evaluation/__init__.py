"""Evaluation and deployment: what is read back from trained runs and reported about them.

Cross-validation (``python -m hmil.evaluate``): :mod:`~hmil.evaluation.runs` reads each
fold's test predictions, :mod:`~hmil.evaluation.summary` computes per-fold, pooled and
bootstrapped metrics, :mod:`~hmil.evaluation.report` writes them as Markdown and JSON and
:mod:`~hmil.evaluation.outputs` puts every table and plot in place together.
Deployment (``python -m hmil.predict``): :mod:`~hmil.evaluation.fold_models` loads a run's
fold models, :mod:`~hmil.evaluation.ensemble` averages their probabilities and attention
per slide, :mod:`~hmil.evaluation.deploy_inputs` checks the cohort and its features
against the training record, and :mod:`~hmil.evaluation.deploy` predicts and writes,
reusing the cross-validation metrics for a labelled cohort.
Heatmaps (``python -m hmil.heatmaps``): :mod:`~hmil.evaluation.heatmap_inputs` reads the
attention and patch grid, :mod:`~hmil.evaluation.attention_maps` paints attention over a
thumbnail (pure numpy), :mod:`~hmil.evaluation.heatmap_figures` draws the figures and
:mod:`~hmil.evaluation.qupath` writes the patches as QuPath tiles.
"""
