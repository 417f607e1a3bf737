"""Plumbing shared by ``preprocessing`` and ``hmil``, and nothing of either stage.

Atomic writes (:mod:`~plumbing.atomic`: every output appears complete or not at all),
content digests of inputs (:mod:`~plumbing.digests`), the code version that every output
records (:mod:`~plumbing.provenance`), the one exception type a command turns into one
line (:mod:`~plumbing.errors`), the command-line edge that does it (:mod:`~plumbing.cli`) and
frozen settings read from YAML presets (:mod:`~plumbing.presets`).
"""
