"""Attention as an image: patch values painted over a slide thumbnail (pure numpy).

Attention rows are softmax weights, heavy-tailed, so each shown row is rank-normalised
within its slide before it is coloured (see :mod:`hmil.heatmaps`).
"""

from __future__ import annotations

import logging

import matplotlib
import numpy as np
from scipy.stats import rankdata

log = logging.getLogger("hmil.heatmaps")
COLORMAP = "jet"
OVERLAY_ALPHA = 0.45  #: opacity of the colour over the tissue


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
