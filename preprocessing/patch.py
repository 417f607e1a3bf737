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

from plumbing.cli import run_cli, setup_logging
from plumbing.errors import PipelineError
from preprocessing.slides.patching import PatchJob, PatchParams, patch_job
from preprocessing.slides.tissue import TissueParams


def _threshold(value: str) -> int | None:
    if value == "otsu":
        return None
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'otsu' or an integer 0-255, got {value!r}"
        ) from None
    if not 0 <= number <= 255:
        raise argparse.ArgumentTypeError(f"threshold must be in 0-255, got {number}")
    return number


def _fraction(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {value}")
    return number


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return number


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
    parser.add_argument("--mpp", type=_positive, help="level-0 µm/px; overrides the metadata")
    _add_grid_options(parser)
    _add_tissue_options(parser)
    parser.add_argument(
        "--on-error",
        choices=("fail", "record"),
        default="fail",
        help="fail: exit 1 on a bad slide (default); record: write flagged outputs and exit 0",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _add_grid_options(parser: argparse.ArgumentParser) -> None:
    defaults = PatchParams()
    parser.add_argument(
        "--target-mpp", type=_positive, default=defaults.target_mpp,
        help="µm/px of the patches given to the encoder (0.5 ≈ 20×)",
    )  # fmt: skip
    parser.add_argument(
        "--patch-size", type=int, default=defaults.patch_size, help="px at target mpp"
    )
    parser.add_argument(
        "--min-tissue", type=_fraction, default=defaults.min_tissue,
        help="keep a patch when at least this fraction of it is tissue",
    )  # fmt: skip
    parser.add_argument(
        "--overlap", type=_fraction, default=defaults.overlap,
        help="fraction of a patch shared with its neighbour (0 ≤ overlap < 1)",
    )  # fmt: skip


def _add_tissue_options(parser: argparse.ArgumentParser) -> None:
    tissue = TissueParams()
    parser.add_argument(
        "--seg-mpp", type=_positive, default=tissue.seg_mpp,
        help="µm/px at which tissue is segmented",
    )  # fmt: skip
    parser.add_argument(
        "--threshold", type=_threshold, default=None, help="'otsu' (default) or saturation 0-255"
    )
    parser.add_argument(
        "--min-tissue-area", type=float, default=tissue.min_tissue_area_um2, help="µm²"
    )
    parser.add_argument("--min-hole-area", type=float, default=tissue.min_hole_area_um2, help="µm²")


def patch_params(args: argparse.Namespace) -> PatchParams:
    """The grid and tissue parameters, checked where argparse cannot."""
    if args.patch_size < 1:
        raise PipelineError(f"--patch-size must be positive, got {args.patch_size}")
    if args.overlap >= 1:
        raise PipelineError("--overlap must be below 1")
    return PatchParams(
        target_mpp=args.target_mpp,
        patch_size=args.patch_size,
        min_tissue=args.min_tissue,
        overlap=args.overlap,
        tissue=TissueParams(
            seg_mpp=args.seg_mpp,
            threshold=args.threshold,
            min_tissue_area_um2=args.min_tissue_area,
            min_hole_area_um2=args.min_hole_area,
        ),
    )


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
