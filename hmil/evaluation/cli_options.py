"""Command-line options of the commands that report metrics with bootstrap CIs.

``hmil.evaluate`` and ``hmil.deploy`` compute the same patient bootstrap
(:mod:`hmil.evaluation.metrics`), so they take it with the same options, defaults and help.
"""

from __future__ import annotations

import argparse

from plumbing.cli import non_negative_int


def add_bootstrap_options(parser: argparse.ArgumentParser) -> None:
    """``--bootstrap N`` (resamples of patients; 0: no CI) and ``--seed`` (of the bootstrap)."""
    parser.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=1000,
        help="bootstrap resamples of patients (0: no CI)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
