"""Evaluate the folds of one encoder × model: metrics per fold and pooled, CIs, tables, plots.

    python -m hmil.evaluate models/uni/hmil/fold0 ... models/uni/hmil/fold4 \
        --out eval/uni/hmil [--bootstrap 1000] [--seed 0] [--strict] [--name uni/hmil]

Reads the test rows of each fold's predictions.csv (and log.csv, metrics.json) and writes,
atomically, into --out: metrics_per_fold.csv, summary.csv/.md/.json, per_class.csv/.md,
confusion_<level>.csv/.png, roc_<level>.png, training_curves.png and oof_predictions.csv.
Levels: ``fine``, ``coarse`` (the coarse head; skipped for flat models, whose p_coarse
columns are empty) and ``coarse_from_fine`` (fine probabilities summed per coarse class).

A fold without predictions.csv, or whose training failed (its metrics.json says
``"status": "failed"``), is left out with a warning and named in summary.md/.json
(``--strict``: an error). When no fold is left, ``--on-error record`` (what the workflow
uses outside strict mode) writes the same files as a failed evaluation: a ``FAILED`` marker
(:func:`hmil.evaluation.comparison.mark_failed`), summary.json with the reason, and cards
in place of the figures, so that the comparison still builds and names the failed run.

Metric conventions are those of :mod:`hmil.evaluation.metrics`:
AUC is the macro one-vs-rest AUC over the classes present; ± is the sample std over folds
(ddof = 1); the 95% CI is a percentile bootstrap of the pooled out-of-fold value that
resamples patients with replacement.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from hmil.evaluation.cross_validation import EvaluationConfig, evaluate_run
from hmil.evaluation.report import headline_text
from hmil.evaluation.settings import BootstrapSettings
from plumbing.cli import add_options, config_from_args, run_cli, setup_logging

# ---- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hmil.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="fold directories of one run"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    add_options(parser, BootstrapSettings)
    parser.add_argument(
        "--strict", action="store_true", help="a fold without predictions.csv is an error"
    )
    parser.add_argument(
        "--on-error",
        choices=("fail", "record"),
        default="fail",
        help="no fold to evaluate: fail (exit 1), or record a failed evaluation (exit 0)",
    )
    parser.add_argument(
        "--name", help="ENCODER/MODEL (default: from the paths models/{encoder}/{model}/fold{k})"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.name is not None and not re.fullmatch(r"[^/\s]+/[^/\s]+", args.name):
        parser.error(f"--name must be ENCODER/MODEL, got {args.name!r}")
    setup_logging(args.verbose)
    config = config_from_args(
        EvaluationConfig,
        args,
        run_dirs=tuple(args.run_dirs),
        record_failure=args.on_error == "record",
    )
    run = evaluate_run(config)
    if run.evaluation is None:
        print(f"error: {run.name}: {run.failure}; recorded as a failed evaluation in {config.out}")
    else:
        print(f"{headline_text(run.evaluation, run.rows)} → {config.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
