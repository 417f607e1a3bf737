"""Features made by another tool as the workflow's own (`python -m preprocessing.import_features`).

Writes thin features files (HDF5 links to the source, no copy) for every slide of a sheet
found in a folder of CLAM, TRIDENT or HMIL-layout features; the layouts are those of
:mod:`preprocessing.features.import_sources`, the import
:mod:`preprocessing.features.importing`'s. A slide missing or unusable is recorded as
failed (``--strict``: fatal); a folder holding none of the sheet's slides is one error line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from plumbing.cli import config_from_args, run_cli, setup_logging
from preprocessing.features.importing import ImportRequest, import_sheet, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m preprocessing.import_features",
        description="Import features made by CLAM, TRIDENT or in the HMIL .pt layout as thin "
        "features files (links, no copy).",
    )
    parser.add_argument("source", type=Path, help="folder of the features made elsewhere")
    parser.add_argument("--sheet", type=Path, required=True, help="slide sheet CSV")
    parser.add_argument("--encoder", required=True, help="encoder name the workflow uses")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for <slide_id>.h5")
    parser.add_argument("--patches-dir", type=Path, help="CLAM patches folder (patch geometry)")
    parser.add_argument("--strict", action="store_true", help="a missing or bad slide is fatal")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    request = config_from_args(ImportRequest, args)
    report(import_sheet(request), request)
    return 0


if __name__ == "__main__":
    run_cli(main)
