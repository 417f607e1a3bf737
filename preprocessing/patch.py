"""Segment a slide's tissue and write its patch grid (`python -m preprocessing.patch`).

Outputs: the patches h5 (CLAM-compatible `coords` plus provenance attributes), and
optionally the QC PNG and the tissue GeoJSON. A slide without tissue gives an empty,
flagged patches file. With `--on-error record` an unreadable slide also gives a flagged
file (status `failed`) instead of a non-zero exit, so one bad slide never stops a cohort.
The work is :mod:`preprocessing.slides.patching`'s; this module is its command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from plumbing.cli import add_options, argparse_type, option_values, run_cli, setup_logging
from plumbing.errors import PipelineError
from preprocessing.slides.params import POSITIVE, PatchParams, TissueParams
from preprocessing.slides.patching import PatchJob, patch_job


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m preprocessing.patch",
        description="Segment tissue and write the patch grid of one slide.",
    )
    parser.add_argument("slide", type=Path, help="slide file (any format OpenSlide reads)")
    parser.add_argument("--out", type=Path, required=True, help="patches h5 to write")
    parser.add_argument("--qc", type=Path, help="QC PNG: thumbnail, tissue outlines, patch grid")
    parser.add_argument("--geojson", type=Path, help="tissue polygons, level-0 px (QuPath)")
    parser.add_argument("--slide-id", help="id recorded in the outputs (default: file stem)")
    parser.add_argument(
        "--mpp", type=argparse_type(POSITIVE), help="level-0 µm/px; overrides the metadata"
    )
    add_options(parser, PatchParams)  # the grid
    add_options(parser, TissueParams)  # the segmentation
    parser.add_argument(
        "--on-error",
        choices=("fail", "record"),
        default="fail",
        help="fail: exit 1 on a bad slide (default); record: write flagged outputs and exit 0",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def patch_params(args: argparse.Namespace) -> PatchParams:
    """The grid and tissue parameters, checked where argparse cannot."""
    if args.patch_size < 1:
        raise PipelineError(f"--patch-size must be positive, got {args.patch_size}")
    if args.overlap >= 1:
        raise PipelineError("--overlap must be below 1")
    tissue = TissueParams(**option_values(TissueParams, args))
    return PatchParams(**option_values(PatchParams, args), tissue=tissue)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    params = patch_params(args)
    job = PatchJob(
        slide=args.slide,
        slide_id=args.slide_id or args.slide.stem,
        out=args.out,
        qc=args.qc,
        geojson=args.geojson,
        mpp=args.mpp,
        record_failure=args.on_error == "record",
    )
    print(patch_job(job, params).words())
    return 0


if __name__ == "__main__":
    run_cli(main)
