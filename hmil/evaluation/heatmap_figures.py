"""Heatmap and top-patch montage figures, drawn on the Agg canvas at exact pixel sizes."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import openslide
from matplotlib import colors as mcolors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.image import imsave

from hmil.evaluation.attention_maps import COLORMAP, overlay
from hmil.evaluation.heatmap_inputs import PatchGeometry, SlideLabels
from plumbing.atomic import atomic_outputs
from preprocessing.slides.access import read_at_mpp, read_rgb
from preprocessing.slides.qc import render_failure

log = logging.getLogger("hmil.heatmaps")
DPI = 100
HEATMAP_SUFFIX, MONTAGE_SUFFIX, GEOJSON_SUFFIX = ".png", "_top.jpg", ".geojson"
JPEG_QUALITY = 90
#: Heatmap figure layout in pixels: every panel shows the thumbnail one-to-one.
PAD, TITLE_BAND, PANEL_TITLE_BAND, COLORBAR_BAND = 16, 56, 28, 76
MIN_FIGURE_WIDTH = 640
#: Montage layout in pixels.
MAX_TILE, TILE_PAD, TILE_LABEL_BAND, MONTAGE_TITLE_BAND = 256, 8, 22, 52
MIN_MONTAGE_WIDTH = 420


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


def slide_title(slide_id: str, labels: SlideLabels) -> str:
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
