"""What a model is trained on: the label hierarchy, bags of features, splits, cohorts.

:mod:`~hmil.data.hierarchy` maps fine to coarse labels; :mod:`~hmil.data.bags` reads a
slide's features file into a bag and batches bags; :mod:`~hmil.data.feature_record` records
how a cohort's features were made, so a model is never applied to other features;
:mod:`~hmil.data.synthetic` generates hierarchical feature cohorts for tests and benchmarks.
"""
