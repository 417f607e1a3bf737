"""Attention heatmaps over slide thumbnails, and montages of the most attended patches.

    python -m hmil.heatmaps ATTENTION.h5 --slides SHEET.csv --patches DIR --out DIR
        [--slides-only ID ...] [--thumbnail-size 1024] [--top-k 16]
        [--predictions predictions.csv] [--geojson]

For every slide group of attention.h5 (the test slides of a fold, see
:func:`hmil.training.write_attention`) it writes ``<out>/<slide_id>.png`` (one panel per
branch: coarse, then fine; a single panel for single-branch models) and
``<out>/<slide_id>_top.jpg`` (the ``top-k`` patches of the fine panel's attention row, read
from the slide at full patch resolution, with their raw attention). The montage is a
JPEG because it is tissue photographs: a quarter of the PNG's size, which is what keeps
the report of a large cohort small.

``--geojson`` also writes ``<out>/<slide_id>.geojson`` for QuPath (see :mod:`hmil.qupath`):
one tile per patch, its level-0 square, with every attention row (``attention fine:
<class>``, ``attention coarse: <class>``) and the within-slide rank of each shown row
(``attention rank: fine``/``coarse``) as measurements, for *Measure › Show measurement
maps*. It needs the patch coordinates in attention.h5 (they come from the features file
the model read); features imported without coordinates give no GeoJSON, with a note in
the log, because the patches file's grid is not known to be the bag's order. A slide that
gets a card gets no GeoJSON.

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
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import matplotlib
import numpy as np
import openslide
import pandas as pd
from matplotlib import colors as mcolors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.image import imsave
from scipy.stats import rankdata
from tqdm import tqdm

from hmil.qupath import attention_measurements, tiles_feature_collection
from preprocessing.atomic import atomic_outputs
from preprocessing.cli import run_cli, setup_logging
from preprocessing.errors import PipelineError, SlideError
from preprocessing.provenance import code_version
from preprocessing.qc import render_failure
from preprocessing.sheet import read_slide_sheet
from preprocessing.slide import open_slide, read_at_mpp, read_rgb

log = logging.getLogger("hmil.heatmaps")

COLORMAP = "jet"
OVERLAY_ALPHA = 0.45  #: opacity of the colour over the tissue
DPI = 100
HEATMAP_SUFFIX, MONTAGE_SUFFIX, GEOJSON_SUFFIX = ".png", "_top.jpg", ".geojson"
JPEG_QUALITY = 90
#: Heatmap figure layout in pixels: every panel shows the thumbnail one-to-one.
PAD, TITLE_BAND, PANEL_TITLE_BAND, COLORBAR_BAND = 16, 56, 28, 76
MIN_FIGURE_WIDTH = 640
#: Montage layout in pixels.
MAX_TILE, TILE_PAD, TILE_LABEL_BAND, MONTAGE_TITLE_BAND = 256, 8, 22, 52
MIN_MONTAGE_WIDTH = 420


class HeatmapError(PipelineError):
    """The attention file or the run's inputs are unusable as a whole."""


class SlideSkipped(Exception):
    """One slide cannot be drawn; the message says why (it gets a card instead)."""


# ---- core: pure numpy ------------------------------------------------------------------------


def attention_to_heatmap(
    coords: np.ndarray,
    values: np.ndarray,
    patch_size_level0: float,
    level0_size: tuple[int, int],
    thumb_size: tuple[int, int],
) -> np.ndarray:
    """float32 [thumb_h, thumb_w]: each patch's value over its square, NaN where no patch.

    coords: [N, 2] (x, y) level-0 pixels of the patches' top-left corners; values: [N];
    level0_size and thumb_size: (width, height). A thumbnail pixel belongs to a patch when
    its centre falls inside the patch (so a regular grid tiles without double counting);
    every patch covers at least one pixel. Overlapping patches are averaged. Rectangles are
    painted with a 2-D difference array (four scatter-adds and two cumulative sums), so the
    cost is O(N + thumbnail pixels), with no loop over patches.
    """
    width, height = int(thumb_size[0]), int(thumb_size[1])
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(coords) != len(values):
        raise ValueError(f"{len(coords)} coordinates but {len(values)} attention values")
    scale = np.array([width / level0_size[0], height / level0_size[1]])
    start = np.ceil(coords * scale - 0.5).astype(np.int64)
    stop = np.ceil((coords + patch_size_level0) * scale - 0.5).astype(np.int64)
    stop = np.maximum(stop, start + 1)
    limits = np.array([width, height])
    start, stop = np.clip(start, 0, limits), np.clip(stop, 0, limits)
    inside = np.all(stop > start, axis=1)
    (x0, y0), (x1, y1) = start[inside].T, stop[inside].T
    weight = values[inside]

    def painted(amount: np.ndarray) -> np.ndarray:
        diff = np.zeros((height + 1, width + 1))
        np.add.at(diff, (y0, x0), amount)
        np.add.at(diff, (y0, x1), -amount)
        np.add.at(diff, (y1, x0), -amount)
        np.add.at(diff, (y1, x1), amount)
        return diff.cumsum(axis=0).cumsum(axis=1)[:height, :width]

    total, count = painted(weight), painted(np.ones_like(weight))
    heatmap = np.full((height, width), np.nan, dtype=np.float32)
    covered = count > 0.5  # counts are integers up to float rounding
    heatmap[covered] = total[covered] / np.round(count[covered])
    return heatmap


def rank_normalise(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (hottest 1, coldest 0, ties share the mean rank); one patch → 1."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) <= 1:
        return np.ones_like(values)
    return (rankdata(values, method="average") - 1) / (len(values) - 1)


def choose_row(attention: np.ndarray, classes: list[str], predicted: str | None) -> tuple[int, str]:
    """Row of [R, N] attention to show and how it was chosen (for the panel title).

    One row: that row. Class-wise rows: the predicted class when known, else the row with
    the largest maximum.
    """
    if attention.shape[0] == 1:
        return 0, "single row (not class-wise)"
    if predicted is not None and predicted in classes and len(classes) == attention.shape[0]:
        return classes.index(predicted), f"row of predicted class {predicted!r}"
    row = int(np.argmax(attention.max(axis=1)))
    name = classes[row] if len(classes) == attention.shape[0] else str(row)
    return row, f"row {name!r} (largest attention; no prediction given)"


def overlay(thumbnail: np.ndarray, heatmap: np.ndarray, cmap_name: str = COLORMAP) -> np.ndarray:
    """RGB uint8: the colormap of ``heatmap`` (in [0, 1]) blended over ``thumbnail``;
    pixels where ``heatmap`` is NaN keep the thumbnail."""
    colours = matplotlib.colormaps[cmap_name](np.nan_to_num(heatmap, nan=0.0))[..., :3] * 255
    alpha = np.where(np.isnan(heatmap), 0.0, OVERLAY_ALPHA)[..., None]
    blended = thumbnail.astype(np.float32) * (1 - alpha) + colours * alpha
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def heatmap_figure_size(thumb_size: tuple[int, int], panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a heatmap PNG with ``panels`` thumbnail-sized panels."""
    width = max(MIN_FIGURE_WIDTH, panels * thumb_size[0] + (panels + 1) * PAD)
    return width, TITLE_BAND + PANEL_TITLE_BAND + thumb_size[1] + COLORBAR_BAND


def montage_figure_size(count: int, tile: int) -> tuple[int, int]:
    """(width, height) in pixels of a montage of ``count`` tiles of ``tile`` px."""
    columns = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    cell_w, cell_h = tile + 2 * TILE_PAD, tile + TILE_LABEL_BAND + TILE_PAD
    return max(MIN_MONTAGE_WIDTH, columns * cell_w), MONTAGE_TITLE_BAND + rows * cell_h


# ---- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideAttention:
    """One slide's group of attention.h5."""

    slide_id: str
    coords: np.ndarray | None  #: [N, 2] level-0 px, or None when the group has none
    fine: np.ndarray  #: [C_f or 1, N]
    coarse: np.ndarray | None  #: [C_c, N] or None


@dataclass(frozen=True)
class PatchGeometry:
    """What the patches file says about the patch squares of one slide."""

    coords: np.ndarray
    patch_size_level0: float
    patch_size: int
    patch_level: int
    level0_size: tuple[int, int] | None


@dataclass(frozen=True)
class SlideLabels:
    true_fine: str | None = None
    true_coarse: str | None = None
    pred_fine: str | None = None
    pred_coarse: str | None = None


def open_attention(path: Path) -> h5py.File:
    if not path.is_file():
        raise HeatmapError(f"{path}: attention file not found")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise HeatmapError(f"{path}: not a readable HDF5 attention file ({error})") from None


def read_slide_attention(file: h5py.File, slide_id: str) -> SlideAttention:
    group = file[slide_id]
    if not isinstance(group, h5py.Group) or "fine_attention" not in group:
        raise SlideSkipped("its attention group has no fine_attention")
    fine = np.atleast_2d(np.asarray(group["fine_attention"][()], dtype=np.float64))
    coarse = None
    if "coarse_attention" in group:
        coarse = np.atleast_2d(np.asarray(group["coarse_attention"][()], dtype=np.float64))
    coords = np.asarray(group["coords"][()]).reshape(-1, 2) if "coords" in group else None
    return SlideAttention(slide_id, coords, fine, coarse)


def read_patch_geometry(path: Path) -> PatchGeometry:
    if not path.is_file():
        raise SlideSkipped(f"patches file {path} not found")
    try:
        with h5py.File(path, "r") as file:
            attrs = dict(file.attrs)
            coords = np.asarray(file["coords"][()]).reshape(-1, 2) if "coords" in file else None
    except OSError as error:
        raise SlideSkipped(f"patches file {path} is unreadable ({error})") from None
    if attrs.get("status") == "failed":
        raise SlideSkipped(f"{path}: preprocessing failed ({attrs.get('status_reason', '?')})")
    size = attrs.get("patch_size_level0_exact", attrs.get("patch_size_level0"))
    if size is None or coords is None:
        raise SlideSkipped(f"{path}: no patch_size_level0 attribute or coords dataset")
    level0 = None
    if "level0_width" in attrs and "level0_height" in attrs:
        level0 = (int(attrs["level0_width"]), int(attrs["level0_height"]))
    return PatchGeometry(
        coords=coords,
        patch_size_level0=float(size),
        patch_size=int(attrs.get("patch_size", round(float(size)))),
        patch_level=int(attrs.get("patch_level", 0)),
        level0_size=level0,
    )


def read_predictions(path: Path) -> dict[str, SlideLabels]:
    """Labels per slide from a predictions.csv (test rows win over val rows)."""
    if not path.is_file():
        raise HeatmapError(f"{path}: predictions file not found")
    try:
        table = pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise HeatmapError(f"{path}: cannot read predictions ({error})") from None
    if "slide_id" not in table.columns:
        raise HeatmapError(f"{path}: no slide_id column")
    if "split" in table.columns:
        table = table.sort_values("split", key=lambda s: s != "test", kind="stable")
    table = table.drop_duplicates("slide_id").set_index("slide_id")

    def get(slide_id: str, column: str) -> str | None:
        value = table.at[slide_id, column] if column in table.columns else None
        return None if value is None or pd.isna(value) else str(value)

    return {
        slide_id: SlideLabels(
            get(slide_id, "fine_label"),
            get(slide_id, "coarse_label"),
            get(slide_id, "pred_fine"),
            get(slide_id, "pred_coarse"),
        )
        for slide_id in table.index
    }


# ---- rendering -------------------------------------------------------------------------------


def read_thumbnail(slide: openslide.OpenSlide, path: str, thumbnail_size: int) -> np.ndarray:
    """RGB thumbnail whose longest side is about ``thumbnail_size`` (never upsampled),
    read in strips from the best pyramid level."""
    downsample = max(1.0, max(slide.dimensions) / thumbnail_size)
    # read_at_mpp only uses the ratio of its two pixel sizes: 1 → downsample.
    thumbnail, _ = read_at_mpp(slide, 1.0, downsample, path)
    return thumbnail


def read_patches(
    slide: openslide.OpenSlide, coords: np.ndarray, geometry: PatchGeometry, tile: int
) -> list[np.ndarray | None]:
    """RGB tiles of ``tile`` px for the given patches (None for an unreadable one).

    Each is read at the patches file's level at full patch resolution, then resized for
    display; one read per shown patch (top-k, not the whole bag).
    """
    level = min(max(geometry.patch_level, 0), slide.level_count - 1)
    size = max(1, round(geometry.patch_size_level0 / slide.level_downsamples[level]))
    tiles: list[np.ndarray | None] = []
    for x, y in coords.astype(np.int64):
        try:
            patch = read_rgb(slide, (int(x), int(y)), level, (size, size))
        except openslide.OpenSlideError as error:
            log.warning("patch at (%d, %d) unreadable: %s", x, y, error)
            tiles.append(None)
            continue
        tiles.append(cv2.resize(patch, (tile, tile), interpolation=cv2.INTER_AREA))
    return tiles


def _figure(size: tuple[int, int]) -> Figure:
    """A figure of exactly ``size`` pixels on the Agg canvas (no pyplot, no global state)."""
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _axes(fig: Figure, left: float, top: float, width: float, height: float):
    """Axes at a pixel rectangle measured from the figure's top-left corner."""
    fig_w, fig_h = fig.get_size_inches() * DPI
    ax = fig.add_axes((left / fig_w, 1 - (top + height) / fig_h, width / fig_w, height / fig_h))
    ax.set_axis_off()
    return ax


def _title(slide_id: str, labels: SlideLabels) -> str:
    def pair(fine: str | None, coarse: str | None) -> str:
        return f"{fine} ({coarse})" if coarse else str(fine)

    parts = [slide_id]
    if labels.true_fine:
        parts.append(f"true: {pair(labels.true_fine, labels.true_coarse)}")
    if labels.pred_fine:
        parts.append(f"predicted: {pair(labels.pred_fine, labels.pred_coarse)}")
    return "   ".join(parts)


def render_heatmap(
    path: Path,
    thumbnail: np.ndarray,
    panels: list[tuple[str, np.ndarray]],
    title: str,
    metadata: dict[str, str],
) -> None:
    """PNG: a title, one thumbnail-sized panel per (title, heatmap in [0, 1]), a colorbar."""
    thumb_h, thumb_w = thumbnail.shape[:2]
    size = heatmap_figure_size((thumb_w, thumb_h), len(panels))
    fig = _figure(size)
    fig.text(0.5, 1 - 20 / size[1], title, ha="center", va="center", fontsize=12)
    left = (size[0] - len(panels) * thumb_w - (len(panels) - 1) * PAD) / 2
    for index, (panel_title, heatmap) in enumerate(panels):
        x = left + index * (thumb_w + PAD)
        ax = _axes(fig, x, TITLE_BAND + PANEL_TITLE_BAND, thumb_w, thumb_h)
        ax.imshow(overlay(thumbnail, heatmap), interpolation="nearest")
        fig.text(
            (x + thumb_w / 2) / size[0],
            1 - (TITLE_BAND + PANEL_TITLE_BAND / 2) / size[1],
            panel_title,
            ha="center",
            va="center",
            fontsize=9,
        )
    bar_w = min(400, size[0] - 2 * PAD)
    bar_ax = fig.add_axes(
        (
            (size[0] - bar_w) / 2 / size[0],
            (COLORBAR_BAND - 32) / size[1],
            bar_w / size[0],
            14 / size[1],
        )
    )
    mappable = ScalarMappable(norm=mcolors.Normalize(0, 1), cmap=COLORMAP)
    bar = fig.colorbar(mappable, cax=bar_ax, orientation="horizontal")
    bar.set_label("attention rank within the slide (0 = lowest, 1 = highest)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=DPI, format="png", metadata=metadata)


def render_montage(
    path: Path,
    tiles: list[np.ndarray | None],
    captions: list[str],
    title: str,
    tile: int,
    metadata: dict[str, str],
) -> None:
    """JPEG: the tiles in a near-square grid, each with its caption underneath."""
    size = montage_figure_size(len(tiles), tile)
    columns = max(1, math.ceil(math.sqrt(len(tiles))))
    cell_w, cell_h = tile + 2 * TILE_PAD, tile + TILE_LABEL_BAND + TILE_PAD
    fig = _figure(size)
    fig.text(0.5, 1 - 26 / size[1], title, ha="center", va="center", fontsize=10)
    left = (size[0] - columns * cell_w) / 2
    for index, (image, caption) in enumerate(zip(tiles, captions, strict=True)):
        row, column = divmod(index, columns)
        x = left + column * cell_w + TILE_PAD
        y = MONTAGE_TITLE_BAND + row * cell_h
        ax = _axes(fig, x, y, tile, tile)
        if image is None:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=9)
        else:
            ax.imshow(image, interpolation="nearest")
        fig.text(
            (x + tile / 2) / size[0],
            1 - (y + tile + TILE_LABEL_BAND / 2) / size[1],
            caption,
            ha="center",
            va="center",
            fontsize=8,
        )
    fig.savefig(path, dpi=DPI, format="jpeg", pil_kwargs=jpeg_options(metadata))


def jpeg_options(metadata: dict[str, str]) -> dict:
    """Pillow's JPEG options; the provenance goes in the comment (JPEG has no text chunks)."""
    return {"quality": JPEG_QUALITY, "comment": json.dumps(metadata)}


def output_paths(out: Path, slide_id: str) -> tuple[Path, Path]:
    """(heatmap, montage) of one slide."""
    return out / f"{slide_id}{HEATMAP_SUFFIX}", out / f"{slide_id}{MONTAGE_SUFFIX}"


def geojson_path(out: Path, slide_id: str) -> Path:
    """The QuPath objects of one slide (``--geojson``)."""
    return out / f"{slide_id}{GEOJSON_SUFFIX}"


def write_card(out: Path, slide_id: str, reason: str, metadata: dict[str, str]) -> None:
    """A card in place of both images of a slide that cannot be drawn (outputs stay complete).
    A GeoJSON of an earlier run in the same folder goes: it would outlive what it showed."""
    geojson_path(out, slide_id).unlink(missing_ok=True)
    card = render_failure(slide_id, reason)
    with atomic_outputs(*output_paths(out, slide_id)) as (heatmap_tmp, montage_tmp):
        imsave(heatmap_tmp, card, format="png", metadata=metadata)
        imsave(montage_tmp, card, format="jpeg", pil_kwargs=jpeg_options(metadata))


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
    title = _title(attention.slide_id, labels)
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
