"""Hierarchical multiple-instance learning for whole-slide images, from features to reports.

The top-level modules are the commands (``python -m hmil.splits``, ``train``, ``evaluate``,
``heatmaps``, ``compare``, ``deploy``, ``synthetic_features``); each builds its typed
configuration and calls one of the stage packages: :mod:`hmil.data` (hierarchy, bags,
splits), :mod:`hmil.models` (the MIL models behind one interface), :mod:`hmil.training`
(fitting one fold) and :mod:`hmil.evaluation` (metrics, reports, heatmaps, deployment).
"""
