"""Compare evaluated runs (encoder × model): one table and one class-wise AUC figure.

    python -m hmil.compare eval/uni/hmil eval/uni/abmil ... --out eval/comparison.csv \
        [--md eval/comparison.md] [--plot eval/class_auc.png]

Each EVAL_DIR is an output directory of ``python -m hmil.evaluate``; a failed or missing
one becomes a ``failed`` row and the others are compared (see
:mod:`hmil.evaluation.comparison`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hmil.evaluation.comparison import ComparisonConfig, write_comparison
from plumbing.cli import run_cli, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hmil.compare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "eval_dirs", nargs="+", type=Path, metavar="EVAL_DIR", help="outputs of hmil.evaluate"
    )
    parser.add_argument("--out", type=Path, required=True, help="comparison CSV")
    parser.add_argument("--md", type=Path, help="Markdown table")
    parser.add_argument(
        "--external", nargs="+", type=Path, default=[], metavar="DEPLOY_DIR",
        help="outputs of hmil.deploy on labelled cohorts: a second table in --md",
    )  # fmt: skip
    parser.add_argument("--plot", type=Path, help="PNG: fine class AUC per run (grouped bars)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    config = ComparisonConfig(
        eval_dirs=tuple(args.eval_dirs),
        out=args.out,
        markdown=args.md,
        external=tuple(args.external),
        plot=args.plot,
    )
    table = write_comparison(config)
    failed = table.loc[table["status"] != "ok", "name"].tolist()
    print(
        f"compared {len(table)} runs ({len(failed)} failed"
        + (f": {', '.join(failed)}" if failed else "")
        + f") → {config.out}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
