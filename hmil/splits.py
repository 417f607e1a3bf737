"""Patient-grouped, label-stratified cross-validation splits (`python -m hmil.splits`).

    python -m hmil.splits SHEET.csv --folds K --out DATA_SPLIT.csv [--seed S]
        [--hierarchy H.yaml|preset] [--protocol kfold|repeated] [--val-fraction 0.1]
        [--test-fraction 0.1] [--allow-sparse-classes] [--clam-dir DIR]
    python -m hmil.splits SHEET.csv --from-hmil-pkls DIR --out DATA_SPLIT.csv
        [--hierarchy H.yaml|preset] [--clam-dir DIR] [--folds K]

Writes DATA_SPLIT.csv (one row per slide: ``slide_id, patient_id, label, coarse_label,
fold0 … fold{K-1}`` holding ``train``/``val``/``test``) and a sidecar DATA_SPLIT.json
(parameters, seed, code version, class counts per fold and part), both atomically;
``--clam-dir DIR`` also writes the same folds in CLAM's layout. How patients are grouped
and stratified is :mod:`hmil.data.splits`; the files are :mod:`hmil.data.split_files`.

``--from-hmil-pkls DIR`` writes the HMIL authors' published splits instead
(``{train,val,test}_splits_{k}.pkl``, read without running code from them:
:mod:`hmil.data.published_splits`): fold k is published split k, exactly; the sidecar
records the folder and each pickle's SHA-256.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hmil.data.split_files import (
    PublishedSplitConfig,
    SplitConfig,
    write_published_splits,
    write_splits,
)
from hmil.data.split_settings import SplitSettings
from plumbing.cli import add_options, config_from_args, run_cli, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hmil.splits",
        description="Patient-grouped, label-stratified splits of a slide sheet (DATA_SPLIT.csv).",
    )
    parser.add_argument("sheet", type=Path, help="slide sheet CSV (slide_id, patient_id, label)")
    parser.add_argument("--out", type=Path, required=True, help="DATA_SPLIT.csv to write")
    parser.add_argument("--hierarchy", help="hierarchy YAML or preset name (checks labels)")
    parser.add_argument(
        "--from-hmil-pkls",
        type=Path,
        metavar="DIR",
        help="write the HMIL authors' published splits ({train,val,test}_splits_{k}.pkl in "
        "DIR) instead of making new ones; --seed, --protocol and the fractions do not apply",
    )
    add_options(parser, SplitSettings)  # how the patients are dealt into folds
    parser.add_argument(
        "--clam-dir",
        type=Path,
        help="also write the folds in CLAM's layout here (splits_{k}.csv, _bool, _descriptor)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.from_hmil_pkls is not None:
        published = config_from_args(PublishedSplitConfig, args)
        splits = write_published_splits(published)
        print(
            f"{published.out}: {len(splits)} slides, the "
            f"{sum(c.startswith('fold') for c in splits.columns)} published splits of "
            f"{published.from_hmil_pkls}"
            + (f"; CLAM layout in {published.clam_dir}" if published.clam_dir else "")
        )
        return 0
    if args.folds is None:
        parser.error("--folds is required (or --from-hmil-pkls DIR)")
    config = config_from_args(SplitConfig, args)
    splits = write_splits(config)
    print(
        f"{config.out}: {len(splits)} slides of {splits['patient_id'].nunique()} patients, "
        f"{config.folds} {'folds' if config.protocol == 'kfold' else 'repeats'} "
        f"({config.protocol}), seed {config.seed}"
        + (f"; CLAM layout in {config.clam_dir}" if config.clam_dir else "")
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
