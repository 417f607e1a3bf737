"""Drawing a run's heatmaps: per slide, the attention rows shown, the images, the GeoJSON.

Each slide is drawn on its own and written in one atomic write; a slide whose inputs do not
fit together (missing from the sheet, unreadable slide or patches file, attention that does
not match its coordinates) gets a card in place of both images and the others go on, so one
bad slide never costs a cohort's figures.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
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
from hmil.evaluation.settings import HeatmapSettings
from plumbing.atomic import atomic_outputs
from plumbing.errors import SlideError
from plumbing.provenance import code_version
from preprocessing.slides.access import open_slide
from preprocessing.slides.sheet import read_slide_sheet

log = logging.getLogger("hmil.heatmaps")


@dataclass(frozen=True)
class HeatmapParams:
    """How each slide is drawn."""

    thumbnail_size: int = HeatmapSettings.heatmap_size  #: longest side, px
    top_k: int = HeatmapSettings.heatmap_top_k  #: patches in each top-attention montage
    geojson: bool = False  #: also write <slide_id>.geojson for QuPath


@dataclass(frozen=True)
class HeatmapConfig:
    """A run's heatmaps: what they are drawn from and where they go; built once."""

    attention: Path  #: attention.h5 of a fold or of a deployment
    sheet: Path
    patches_dir: Path  #: folder of <slide_id>.h5 patches files
    out: Path
    params: HeatmapParams
    slides_only: tuple[str, ...] | None = None
    predictions: Path | None = None  #: predictions.csv of the same run


@dataclass(frozen=True)
class HeatmapSummary:
    drawn: int
    carded: list[str]  #: slides that got a card instead
    without_geojson: list[str]  #: drawn, but no GeoJSON (no patch coordinates)


class NoCoordinates(Exception):
    """The slide's attention has no patch coordinates: no GeoJSON (the message says why)."""


@dataclass(frozen=True)
class ShownRow:
    """One attention row that a heatmap panel shows."""

    branch: str  #: "coarse branch", "fine branch", or "attention" for single-branch models
    values: np.ndarray  #: raw attention per patch
    how: str  #: which row of class-wise attention, and why
    rank: np.ndarray  #: the values rank-normalised within the slide (what is coloured)


@dataclass(frozen=True)
class SlideImages:
    """What is read from the slide itself: the thumbnail and the top patches."""

    thumbnail: np.ndarray
    panels: list[tuple[str, np.ndarray]]  #: (panel title, heatmap in [0, 1])
    top: np.ndarray  #: indices of the top-k patches of the fine row
    tiles: list[np.ndarray | None]
    tile: int  #: montage tile size in px


# ---- a run -----------------------------------------------------------------------------------


def draw_heatmaps(config: HeatmapConfig) -> HeatmapSummary:
    """Every slide of the attention file (or ``slides_only``) drawn or carded; a missing or
    unreadable attention file or predictions file is a HeatmapError."""
    with open_attention(config.attention) as file:
        sheet = read_slide_sheet(config.sheet, require_labels=False)
        predictions = read_predictions(config.predictions) if config.predictions else {}
        classes = {
            level: [str(c) for c in file.attrs.get(f"{level}_classes", [])]
            for level in ("fine", "coarse")
        }
        slide_ids = _slides_to_draw(file, config)
        metadata = _metadata(file, config)
        config.out.mkdir(parents=True, exist_ok=True)
        drawn, carded, without_geojson = 0, [], []
        for slide_id in tqdm(slide_ids, desc="heatmaps", unit="slide", disable=None):
            try:
                if slide_id not in sheet.index:
                    raise SlideSkipped(f"not in the slide sheet {config.sheet}")
                row = sheet.loc[slide_id]
                sheet_label = row.get("label")
                labels = predictions.get(slide_id) or SlideLabels(
                    true_fine=None if pd.isna(sheet_label) else str(sheet_label)
                )
                no_geojson = draw_slide(
                    read_slide_attention(file, slide_id),
                    row["path"],
                    read_patch_geometry(config.patches_dir / f"{slide_id}.h5"),
                    labels,
                    classes,
                    config.params,
                    config.out,
                    metadata,
                )
                drawn += 1
                if no_geojson:
                    log.info("%s: %s", slide_id, no_geojson)
                    without_geojson.append(slide_id)
            except (SlideSkipped, SlideError) as reason:
                log.warning("%s: %s; writing a card instead", slide_id, reason)
                write_card(config.out, slide_id, str(reason), metadata)
                carded.append(slide_id)
    if without_geojson:
        reason = "no patch coordinates in the attention file (features imported without coords)"
        log.warning(
            "no GeoJSON for %d slide(s), %s: %s",
            len(without_geojson),
            reason,
            ", ".join(without_geojson[:5]),
        )
    return HeatmapSummary(drawn, carded, without_geojson)


def _slides_to_draw(file: h5py.File, config: HeatmapConfig) -> list[str]:
    slide_ids = list(file.keys())
    if config.slides_only:
        unknown = sorted(set(config.slides_only) - set(slide_ids))
        if unknown:
            log.warning("not in %s, skipped: %s", config.attention, ", ".join(unknown))
        slide_ids = [s for s in slide_ids if s in set(config.slides_only)]
    return slide_ids


def _metadata(file: h5py.File, config: HeatmapConfig) -> dict[str, str]:
    """Provenance written into every image."""
    return {
        "Software": f"hmil-pipeline {code_version()}",
        "Description": json.dumps(
            {
                "attention": str(config.attention),
                "model": str(file.attrs.get("model", "")),
                "normalisation": "rank within slide",
                "colormap": COLORMAP,
                "thumbnail_size": config.params.thumbnail_size,
                "top_k": config.params.top_k,
            },
            sort_keys=True,
        ),
    }


# ---- one slide -------------------------------------------------------------------------------


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
    shown = shown_rows(attention, classes, labels)

    geojson, no_geojson = None, None
    if params.geojson:
        ranked = {"fine": shown[-1].rank}
        if attention.coarse is not None:
            ranked = {"coarse": shown[0].rank, **ranked}
        try:
            geojson = slide_geojson(attention, geometry, classes, ranked)
        except NoCoordinates as reason:
            no_geojson = str(reason)
            geojson_path(out, attention.slide_id).unlink(missing_ok=True)

    images = read_slide_images(slide_path, geometry, coords, shown, params)
    write_slide(out, attention.slide_id, labels, shown[-1], images, geojson, metadata)
    return no_geojson


def shown_rows(
    attention: SlideAttention, classes: dict[str, list[str]], labels: SlideLabels
) -> list[ShownRow]:
    """The row each panel shows: coarse (two-branch models), then fine."""
    chosen: list[tuple[str, np.ndarray, str]] = []
    if attention.coarse is not None:
        row, how = choose_row(attention.coarse, classes["coarse"], labels.pred_coarse)
        chosen.append(("coarse branch", attention.coarse[row], how))
    row, how = choose_row(attention.fine, classes["fine"], labels.pred_fine)
    branch = "fine branch" if attention.coarse is not None else "attention"
    chosen.append((branch, attention.fine[row], how))
    return [ShownRow(branch, values, how, rank_normalise(values)) for branch, values, how in chosen]


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


def read_slide_images(
    slide_path: str,
    geometry: PatchGeometry,
    coords: np.ndarray,
    shown: list[ShownRow],
    params: HeatmapParams,
) -> SlideImages:
    """The thumbnail with one heatmap per shown row, and the top patches of the fine row at
    full patch resolution; SlideSkipped if the slide is not the one the patches file says."""
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
                f"{row.branch}: {row.how}",
                attention_to_heatmap(
                    coords, row.rank, geometry.patch_size_level0, level0_size, thumb
                ),
            )
            for row in shown
        ]
        count = min(params.top_k, len(coords))
        top = np.argsort(-shown[-1].values, kind="stable")[:count]
        tile = min(MAX_TILE, max(32, geometry.patch_size))
        tiles = read_patches(slide, coords[top], geometry, tile)
    finally:
        slide.close()
    return SlideImages(thumbnail, panels, top, tiles, tile)


def write_slide(
    out: Path,
    slide_id: str,
    labels: SlideLabels,
    fine: ShownRow,
    images: SlideImages,
    geojson: dict | None,
    metadata: dict[str, str],
) -> None:
    """The heatmap, the montage and (if made) the GeoJSON of one slide, renamed together."""
    captions = [f"#{i + 1}  a = {fine.values[j]:.3g}" for i, j in enumerate(images.top)]
    outputs = [*output_paths(out, slide_id), None]
    if geojson is not None:
        outputs[2] = geojson_path(out, slide_id)
    with atomic_outputs(*outputs) as (heatmap_tmp, top_tmp, geojson_tmp):
        if geojson_tmp is not None:
            # Compact: a cohort slide has tens of thousands of tiles.
            geojson_tmp.write_text(json.dumps(geojson, separators=(",", ":")) + "\n")
        render_heatmap(
            heatmap_tmp, images.thumbnail, images.panels, slide_title(slide_id, labels), metadata
        )
        render_montage(
            top_tmp,
            images.tiles,
            captions,
            f"{slide_id}: top {len(images.top)} patches\n{fine.how}",
            images.tile,
            metadata,
        )
