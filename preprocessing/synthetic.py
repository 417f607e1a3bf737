"""Synthetic whole-slide images with known tissue geometry (`python -m preprocessing.synthetic`).

`slide` writes one slide of the benchmark geometry, `cohort` the labelled demo cohort; the
slides are :mod:`preprocessing.slides.synthetic`'s, the cohort
:mod:`preprocessing.slides.demo_cohort`'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from plumbing.cli import run_cli, setup_logging
from preprocessing.slides.demo_cohort import DemoCohort, write_demo
from preprocessing.slides.synthetic import two_region_spec, write_slide

DESCRIPTION = (
    "Synthetic whole-slide images with known tissue geometry (`python -m preprocessing.synthetic`)."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m preprocessing.synthetic", description=DESCRIPTION
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_slide_command(sub)
    _add_cohort_command(sub)
    return parser


def _add_slide_command(sub: argparse._SubParsersAction) -> None:
    slide = sub.add_parser("slide", help="write one slide with two tissue regions")
    slide.add_argument("out", type=Path, help="the slide file to write (.tiff)")
    slide.add_argument("--width", type=int, default=20000, help="level-0 width, px")
    slide.add_argument("--height", type=int, default=16000, help="level-0 height, px")
    slide.add_argument("--mpp", type=float, default=0.25, help="level-0 pixel size, µm/px")
    slide.add_argument(
        "--levels", type=int, help="pyramid levels (default: halve until ≤ 2048 px, at least 4)"
    )
    slide.add_argument("--tile", type=int, default=512, help="TIFF tile side, px")
    slide.add_argument("--aperio", action="store_true", help="Aperio-style description")
    slide.add_argument("--seed", type=int, default=0, help="seed of the tissue layout")


def _add_cohort_command(sub: argparse._SubParsersAction) -> None:
    cohort = sub.add_parser("cohort", help="write a labelled demo cohort and its slides.csv")
    cohort.add_argument("outdir", type=Path, help="folder for slides/, slides.csv, hierarchy.yaml")
    cohort.add_argument("--slides", type=int, default=36, help="number of slides")
    cohort.add_argument("--width", type=int, default=6000, help="level-0 width of each slide, px")
    cohort.add_argument("--height", type=int, default=4000, help="level-0 height, px")
    cohort.add_argument("--mpp", type=float, default=0.5, help="level-0 pixel size, µm/px")
    cohort.add_argument("--seed", type=int, default=0, help="seed of the tissue layout and stains")
    cohort.add_argument(
        "--external", type=int, default=6,
        help="slides of a second, independently drawn cohort in <outdir>/external/ (the "
        "demo's deployment cohort; 0: none)",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.command == "slide":
        spec = two_region_spec(
            args.width,
            args.height,
            args.mpp,
            levels=args.levels,
            tile=args.tile,
            aperio=args.aperio,
            seed=args.seed,
        )
        write_slide(args.out, spec, progress=True)
        print(f"wrote {args.out} ({args.width} x {args.height} px, {spec.level_count()} levels)")
        return 0
    demo = DemoCohort(
        args.outdir, args.slides, args.width, args.height, args.mpp, args.seed, args.external
    )
    for line in write_demo(demo):
        print(line)
    return 0


if __name__ == "__main__":
    run_cli(main)
