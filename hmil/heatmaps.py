"""Attention heatmaps over slide thumbnails, and montages of the most attended patches.

    python -m hmil.heatmaps ATTENTION.h5 --slides SHEET.csv --patches DIR --out DIR
        [--slides-only ID ...] [--thumbnail-size 1024] [--top-k 16]
        [--predictions predictions.csv] [--geojson]

For every slide group of attention.h5 (the test slides of a fold, written by ``hmil.train``,
or a deployed cohort's, by ``hmil.deploy``) it writes ``<out>/<slide_id>.png`` (one panel
per branch: coarse, then fine; a single panel for single-branch models) and
``<out>/<slide_id>_top.jpg`` (the ``top-k`` patches of the fine panel's attention row, read
from the slide at full patch resolution, with their raw attention). The montage is a
JPEG because it is tissue photographs: a quarter of the PNG's size, which is what keeps
the report of a large cohort small.

``--geojson`` also writes ``<out>/<slide_id>.geojson`` for QuPath
(:mod:`hmil.evaluation.qupath`): one tile per patch, its level-0 square, with every
attention row (``attention fine: <class>``, ``attention coarse: <class>``) and the within-
slide rank of each shown row (``attention rank: fine``/``coarse``) as measurements, for
*Measure › Show measurement maps*. It needs the patch coordinates in attention.h5 (they come
from the features file the model read); features imported without coordinates give no
GeoJSON, with a note in the log, because the patches file's grid is not known to be the
bag's order. A slide that gets a card gets no GeoJSON.

Class-wise attention has one row per class: the panel shows the predicted class's row
(``--predictions``), else the row with the largest maximum, and says which.

Normalisation: attention rows are softmax weights, heavy-tailed (most near 1/N, a few
large), so min-max scaling paints nearly every patch the coldest colour. Each shown row is
therefore rank-normalised within the slide (CLAM's percentile scores): the hottest patch is
1, the coldest 0, ties share their mean rank. Colours compare patches within one slide,
never across slides; the raw values are printed on the montage.

A slide missing from the sheet, an unreadable slide or patches file, or attention that does
not match its coordinates gives a warning and a card in place of both images; the other
slides go on. A missing or unreadable attention.h5 is one error line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hmil.evaluation.heatmap_drawing import HeatmapConfig, HeatmapParams, draw_heatmaps
from hmil.evaluation.settings import HeatmapSettings
from plumbing.cli import add_options, run_cli, setup_logging

# ---- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hmil.heatmaps",
        description="Attention heatmaps over slide thumbnails and top-patch montages.",
    )
    parser.add_argument("attention", type=Path, help="attention.h5 written by hmil.train")
    parser.add_argument("--slides", type=Path, required=True, help="slide sheet CSV")
    parser.add_argument("--patches", type=Path, required=True, help="folder of <slide_id>.h5")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    parser.add_argument("--slides-only", nargs="+", metavar="ID", help="draw only these slides")
    add_options(parser, HeatmapSettings)  # --top-k, --thumbnail-size
    parser.add_argument("--predictions", type=Path, help="predictions.csv of the same run")
    parser.add_argument(
        "--geojson",
        action="store_true",
        help="also write <slide_id>.geojson: patch tiles with attention measurements (QuPath)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    config = HeatmapConfig(
        attention=args.attention,
        sheet=args.slides,
        patches_dir=args.patches,
        out=args.out,
        params=HeatmapParams(
            thumbnail_size=args.heatmap_size, top_k=args.heatmap_top_k, geojson=args.geojson
        ),
        slides_only=tuple(args.slides_only) if args.slides_only else None,
        predictions=args.predictions,
    )
    summary = draw_heatmaps(config)
    line = f"{config.out}: heatmaps of {summary.drawn} slide(s)"
    if config.params.geojson:
        line += f", QuPath GeoJSON of {summary.drawn - len(summary.without_geojson)}"
    if summary.carded:
        carded = summary.carded
        line += f"; {len(carded)} could not be drawn (cards): {', '.join(carded[:5])}"
    print(line)
    return 0


if __name__ == "__main__":
    run_cli(main)
