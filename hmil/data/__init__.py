"""What a model is trained on: the label hierarchy, bags of features, splits, cohorts.

:mod:`~hmil.data.hierarchy` maps fine to coarse labels; :mod:`~hmil.data.splits` groups a
sheet's slides by patient and deals them into stratified folds, and
:mod:`~hmil.data.split_files` writes them as DATA_SPLIT.csv with its sidecar and CLAM's
layout (``python -m hmil.splits``), which :mod:`~hmil.data.fold_tables` reads back as one
fold's train, val and test slides; :mod:`~hmil.data.bags` reads a slide's features file into
a bag and batches bags; :mod:`~hmil.data.feature_record` records how a cohort's features were
made, so a model is never applied to other features; :mod:`~hmil.data.synthetic` generates
hierarchical feature cohorts for tests and benchmarks (``python -m hmil.synthetic_features``).
"""
