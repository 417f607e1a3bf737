"""Using trained runs again: loading a run's fold models and applying them to new slides.

Deployment (``python -m hmil.predict``) lives here: :mod:`~hmil.evaluation.fold_models`
reads the k fold models of one encoder × model, :mod:`~hmil.evaluation.ensemble` averages
their probabilities and attention per slide (pure torch), and
:mod:`~hmil.evaluation.deploy` applies them to a slide sheet and writes predictions,
attention and, for a labelled sheet, the same metrics as cross-validation
(:mod:`hmil.evaluate`, which is to move into this package).
"""
