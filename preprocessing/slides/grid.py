"""The patch grid: a physically sized lattice over the slide, filtered by tissue fraction.

All patches are evaluated at once from a summed-area table of the tissue mask; there is
no loop over patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class PatchGrid:
    """Kept patches, in row-major order (top to bottom, then left to right)."""

    coords: np.ndarray  #: (N, 2) int64 x, y of the top-left corner, level-0 pixels
    tissue_fraction: np.ndarray  #: (N,) float32 in [0, 1]
    patch_size_level0: float  #: side of one patch in level-0 pixels (exact, not rounded)
    step_level0: float  #: grid spacing in level-0 pixels
    candidates: int  #: grid cells inside the slide before the tissue filter


def grid_axis(length0: int, patch0: float, step0: float) -> np.ndarray:
    """Top-left positions (level-0 px) of the patches that fit entirely along one axis."""
    if length0 < patch0:
        return np.zeros(0, np.int64)
    count = int(np.floor((length0 - patch0) / step0 + 1e-9)) + 1
    starts = np.round(np.arange(count) * step0).astype(np.int64)
    return starts[starts + int(np.ceil(patch0)) <= length0]


def _area_integral(mask: np.ndarray) -> np.ndarray:
    """Summed-area table (H+1, W+1): table[y, x] = mask[:y, :x].sum() (cv2: 10× numpy's cumsum)."""
    return cv2.integral(np.ascontiguousarray(mask, dtype=np.uint8), sdepth=cv2.CV_64F)


def _lerp_rows(table: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Rows of `table` at fractional row positions, linearly interpolated."""
    positions = np.clip(positions, 0, table.shape[0] - 1)
    lower = np.minimum(np.floor(positions).astype(np.int64), table.shape[0] - 2)
    weight = (positions - lower)[:, None]
    return table[lower] * (1 - weight) + table[lower + 1] * weight


def box_fractions(mask: np.ndarray, x0: np.ndarray, x1: np.ndarray, y0: np.ndarray, y1: np.ndarray):
    """Fraction of mask pixels inside every box [x0, x1) × [y0, y1) of a separable grid.

    Box edges are fractional mask-pixel positions; the summed-area table is bilinear inside
    each pixel, so interpolating it integrates the pixel-constant mask exactly, even when a
    patch spans only a few mask pixels. Returns (len(y0), len(x0)).
    """
    if mask.shape[0] < 1 or mask.shape[1] < 1:
        return np.zeros((len(y0), len(x0)))
    table = _area_integral(mask)
    rows_top = _lerp_rows(table, y0)  # (ny, W+1)
    rows_bottom = _lerp_rows(table, y1)
    strip = rows_bottom - rows_top  # mask area above each column edge, inside [y0, y1)
    cols = np.ascontiguousarray(strip.T)  # (W+1, ny)
    area = (_lerp_rows(cols, x1) - _lerp_rows(cols, x0)).T  # (ny, nx)
    box = np.outer(y1 - y0, x1 - x0)
    return np.divide(area, box, out=np.zeros_like(area), where=box > 0)


def patch_grid(
    mask: np.ndarray,
    level0_size: tuple[int, int],
    slide_mpp: float,
    target_mpp: float = 0.5,
    patch_size: int = 256,
    overlap: float = 0.0,
    min_tissue: float = 0.25,
) -> PatchGrid:
    """Patches of `patch_size` px at `target_mpp` whose tissue fraction is >= `min_tissue`.

    The level-0 footprint is `patch_size * target_mpp / slide_mpp`, so scans of the same
    tissue at different magnifications give the same physical grid. The grid starts at the
    slide origin; `overlap` is the fraction of a patch shared by neighbours (0 ≤ overlap < 1).
    `mask` covers the whole slide at any resolution (its pixel size follows from its shape).
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    width0, height0 = level0_size
    patch0 = patch_size * target_mpp / slide_mpp
    step0 = patch0 * (1 - overlap)
    xs = grid_axis(width0, patch0, step0)
    ys = grid_axis(height0, patch0, step0)
    scale_x = mask.shape[1] / width0
    scale_y = mask.shape[0] / height0
    fractions = box_fractions(
        mask, xs * scale_x, (xs + patch0) * scale_x, ys * scale_y, (ys + patch0) * scale_y
    )
    rows, cols = np.nonzero(fractions >= min_tissue)  # row-major order
    coords = np.stack([xs[cols], ys[rows]], axis=1).astype(np.int64)
    return PatchGrid(
        coords=coords.reshape(-1, 2),
        tissue_fraction=fractions[rows, cols].astype(np.float32),
        patch_size_level0=patch0,
        step_level0=step0,
        candidates=len(xs) * len(ys),
    )
