"""Attention heatmaps over slide thumbnails, and montages of the most attended patches.

    python -m hmil.heatmaps ATTENTION.h5 --slides SHEET.csv --patches DIR --out DIR
        [--slides-only ID ...] [--thumbnail-size 1024] [--top-k 16]
        [--predictions predictions.csv] [--geojson]

For every slide group of attention.h5 (the test slides of a fold, see
:func:`hmil.training.loop.write_attention`) it writes ``<out>/<slide_id>.png`` (one panel per
branch: coarse, then fine; a single panel for single-branch models) and
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
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from hmil.evaluation.attention_maps import (
    COLORMAP,
    attention_to_heatmap,
    choose_row,
    rank_normalise,
)
from hmil.evaluation.heatmap_figures import (
    MAX_TILE,
    geojson_path,
    output_paths,
    read_patches,
    read_thumbnail,
    render_heatmap,
    render_montage,
    slide_title,
    write_card,
)
from hmil.evaluation.heatmap_inputs import (
    PatchGeometry,
    SlideAttention,
    SlideLabels,
    SlideSkipped,
    open_attention,
    read_patch_geometry,
    read_predictions,
    read_slide_attention,
)
from hmil.evaluation.qupath import attention_measurements, tiles_feature_collection
from plumbing.atomic import atomic_outputs
from plumbing.cli import run_cli, setup_logging
from plumbing.errors import SlideError
from plumbing.provenance import code_version
from preprocessing.slides.access import open_slide
from preprocessing.slides.sheet import read_slide_sheet

log = logging.getLogger("hmil.heatmaps")

# ---- one slide -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeatmapParams:
    thumbnail_size: int = 1024
    top_k: int = 16
    geojson: bool = False  #: also write <slide_id>.geojson for QuPath


class NoCoordinates(Exception):
    """The slide's attention has no patch coordinates: no GeoJSON (the message says why)."""


def slide_geojson(
    attention: SlideAttention,
    geometry: PatchGeometry,
    classes: dict[str, list[str]],
    ranked: dict[str, np.ndarray],
) -> dict:
    """QuPath FeatureCollection of the slide's patches with their attention as measurements.

    ranked: branch ("fine", "coarse") → within-slide rank of the row the heatmap shows.
    NoCoordinates when attention.h5 holds no coords for the slide; SlideSkipped when the
    attention cannot be written (non-finite values).
    """
    if attention.coords is None:
        raise NoCoordinates(
            "attention.h5 has no patch coordinates for it (features without coords, e.g. "
            "bare .pt files): no GeoJSON"
        )
    branches = [("fine", attention.fine, classes["fine"])]
    if attention.coarse is not None:
        branches.insert(0, ("coarse", attention.coarse, classes["coarse"]))
    try:
        return tiles_feature_collection(
            attention.coords, geometry.patch_size_level0, attention_measurements(branches, ranked)
        )
    except ValueError as error:
        raise SlideSkipped(f"cannot write its GeoJSON: {error}") from None


def draw_slide(
    attention: SlideAttention,
    slide_path: str,
    geometry: PatchGeometry,
    labels: SlideLabels,
    classes: dict[str, list[str]],
    params: HeatmapParams,
    out: Path,
    metadata: dict[str, str],
) -> str | None:
    """Write ``<slide_id>.png``, ``<slide_id>_top.jpg`` and, with ``params.geojson``,
    ``<slide_id>.geojson``, all in one atomic write; SlideSkipped/SlideError if the inputs
    of this slide do not fit together. Returns why no GeoJSON was written, if it was asked
    for and could not be (no coordinates), else None."""
    coords = attention.coords if attention.coords is not None else geometry.coords
    n = len(coords)
    if n == 0:
        raise SlideSkipped("no patches")
    for name, rows in (("fine", attention.fine), ("coarse", attention.coarse)):
        if rows is not None and rows.shape[1] != n:
            raise SlideSkipped(f"{name} attention has {rows.shape[1]} values for {n} patches")

    rows_to_show: list[tuple[str, np.ndarray, str]] = []  # (branch, row values, how chosen)
    if attention.coarse is not None:
        row, how = choose_row(attention.coarse, classes["coarse"], labels.pred_coarse)
        rows_to_show.append(("coarse branch", attention.coarse[row], how))
    row, how = choose_row(attention.fine, classes["fine"], labels.pred_fine)
    fine_values = attention.fine[row]
    branch = "fine branch" if attention.coarse is not None else "attention"
    rows_to_show.append((branch, fine_values, how))
    ranks = [rank_normalise(values) for _, values, _ in rows_to_show]

    geojson, no_geojson = None, None
    if params.geojson:
        ranked = {"fine": ranks[-1]}
        if attention.coarse is not None:
            ranked = {"coarse": ranks[0], **ranked}
        try:
            geojson = slide_geojson(attention, geometry, classes, ranked)
        except NoCoordinates as reason:
            no_geojson = str(reason)
            geojson_path(out, attention.slide_id).unlink(missing_ok=True)

    slide = open_slide(slide_path)
    try:
        level0_size = slide.dimensions
        if geometry.level0_size is not None and tuple(geometry.level0_size) != level0_size:
            raise SlideSkipped(
                f"slide is {level0_size[0]} x {level0_size[1]} px but its patches file says "
                f"{geometry.level0_size[0]} x {geometry.level0_size[1]} (another file?)"
            )
        thumbnail = read_thumbnail(slide, slide_path, params.thumbnail_size)
        thumb = (thumbnail.shape[1], thumbnail.shape[0])
        panels = [
            (
                f"{branch}: {how}",
                attention_to_heatmap(coords, rank, geometry.patch_size_level0, level0_size, thumb),
            )
            for (branch, _, how), rank in zip(rows_to_show, ranks, strict=True)
        ]
        count = min(params.top_k, n)
        top = np.argsort(-fine_values, kind="stable")[:count]
        tile = min(MAX_TILE, max(32, geometry.patch_size))
        tiles = read_patches(slide, coords[top], geometry, tile)
    finally:
        slide.close()

    captions = [f"#{i + 1}  a = {fine_values[j]:.3g}" for i, j in enumerate(top)]
    title = slide_title(attention.slide_id, labels)
    outputs = [*output_paths(out, attention.slide_id), None]
    if geojson is not None:
        outputs[2] = geojson_path(out, attention.slide_id)
    with atomic_outputs(*outputs) as (heatmap_tmp, top_tmp, geojson_tmp):
        if geojson_tmp is not None:
            # Compact: a cohort slide has tens of thousands of tiles.
            geojson_tmp.write_text(json.dumps(geojson, separators=(",", ":")) + "\n")
        render_heatmap(heatmap_tmp, thumbnail, panels, title, metadata)
        render_montage(
            top_tmp,
            tiles,
            captions,
            f"{attention.slide_id}: top {count} patches\n{rows_to_show[-1][2]}",
            tile,
            metadata,
        )
    return no_geojson


# ---- command line ----------------------------------------------------------------------------


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


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
    parser.add_argument("--thumbnail-size", type=_positive_int, default=1024, help="px")
    parser.add_argument(
        "--top-k", type=_positive_int, default=16, help="patches in each top-attention montage"
    )
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
    params = HeatmapParams(
        thumbnail_size=args.thumbnail_size, top_k=args.top_k, geojson=args.geojson
    )
    file = open_attention(args.attention)
    with file:
        sheet = read_slide_sheet(args.slides, require_labels=False)
        predictions = read_predictions(args.predictions) if args.predictions else {}
        classes = {
            level: [str(c) for c in file.attrs.get(f"{level}_classes", [])]
            for level in ("fine", "coarse")
        }
        slide_ids = list(file.keys())
        if args.slides_only:
            unknown = sorted(set(args.slides_only) - set(slide_ids))
            if unknown:
                log.warning("not in %s, skipped: %s", args.attention, ", ".join(unknown))
            slide_ids = [s for s in slide_ids if s in set(args.slides_only)]
        metadata = {
            "Software": f"hmil-pipeline {code_version()}",
            "Description": json.dumps(
                {
                    "attention": str(args.attention),
                    "model": str(file.attrs.get("model", "")),
                    "normalisation": "rank within slide",
                    "colormap": COLORMAP,
                    "thumbnail_size": params.thumbnail_size,
                    "top_k": params.top_k,
                },
                sort_keys=True,
            ),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        drawn, carded, without_geojson = 0, [], []
        for slide_id in tqdm(slide_ids, desc="heatmaps", unit="slide", disable=None):
            try:
                if slide_id not in sheet.index:
                    raise SlideSkipped(f"not in the slide sheet {args.slides}")
                row = sheet.loc[slide_id]
                sheet_label = row.get("label")
                labels = predictions.get(slide_id) or SlideLabels(
                    true_fine=None if pd.isna(sheet_label) else str(sheet_label)
                )
                no_geojson = draw_slide(
                    read_slide_attention(file, slide_id),
                    row["path"],
                    read_patch_geometry(args.patches / f"{slide_id}.h5"),
                    labels,
                    classes,
                    params,
                    args.out,
                    metadata,
                )
                drawn += 1
                if no_geojson:
                    log.info("%s: %s", slide_id, no_geojson)
                    without_geojson.append(slide_id)
            except (SlideSkipped, SlideError) as reason:
                log.warning("%s: %s; writing a card instead", slide_id, reason)
                write_card(args.out, slide_id, str(reason), metadata)
                carded.append(slide_id)
    line = f"{args.out}: heatmaps of {drawn} slide(s)"
    if args.geojson:
        line += f", QuPath GeoJSON of {drawn - len(without_geojson)}"
    if carded:
        line += f"; {len(carded)} could not be drawn (cards): {', '.join(carded[:5])}"
    if without_geojson:
        reason = "no patch coordinates in the attention file (features imported without coords)"
        log.warning(
            "no GeoJSON for %d slide(s), %s: %s",
            len(without_geojson),
            reason,
            ", ".join(without_geojson[:5]),
        )
    print(line)
    return 0


if __name__ == "__main__":
    run_cli(main)
