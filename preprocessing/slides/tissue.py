"""Tissue segmentation of a low-resolution RGB image, with sizes in physical units.

Kernel sizes are given in µm and area filters in µm², converted with the image's mpp,
so the same settings work for a 20× and a 40× scan (CLAM's area filter, in units of
level-0 pixels, finds nothing on small 20× crops).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from preprocessing.slides.params import TissueParams


@dataclass
class TissueSegmentation:
    """A binary tissue mask and its polygons, both in the segmented image's pixels."""

    mask: np.ndarray  #: (H, W) uint8 in {0, 1}
    polygons: list[list[np.ndarray]] = field(default_factory=list)  #: [outer, hole, ...] (K, 2) x,y
    threshold: float = 0.0  #: saturation threshold actually applied


_LOG_LUT = np.round(np.log1p(np.arange(256)) / np.log(256) * 255).astype(np.uint8)


def log_otsu_threshold(saturation: np.ndarray) -> float:
    """Otsu's threshold computed on log-saturation, returned on the saturation scale.

    Plain Otsu splits pale eosin-rich tissue from dark nuclei-rich tissue rather than
    tissue from glass (45 on the CMU crop, losing the pale stroma); glass is a narrow peak
    near 0, and the log scale makes it the dominant class boundary (13 on the same crop).
    """
    log_threshold, _ = cv2.threshold(
        _LOG_LUT[saturation], 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU
    )
    return float(np.expm1(log_threshold / 255 * np.log(256)))


def _odd_kernel(size_um: float, mpp: float) -> int:
    pixels = max(1, round(size_um / mpp))
    return pixels if pixels % 2 else pixels + 1


def _drop_small_components(binary: np.ndarray, min_pixels: float, keep_border: bool) -> np.ndarray:
    """Keep 8-connected components of `binary` with at least `min_pixels` pixels.

    With `keep_border`, components touching the image border are kept whatever their size
    (used for background: only enclosed background is a hole).
    """
    _count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    if keep_border:
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        keep[border] = True
    keep[0] = False  # label 0 is the complement of `binary`
    return keep[labels].astype(np.uint8)


def segment_tissue(rgb: np.ndarray, mpp: float, params: TissueParams) -> TissueSegmentation:
    """Tissue mask of an RGB image at `mpp` µm/px: saturation, blur, threshold, close, filter.

    H&E tissue is coloured while glass background is grey-white, so the HSV saturation
    separates them far better than brightness does.
    """
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    saturation = cv2.medianBlur(saturation, min(_odd_kernel(params.median_um, mpp), 255))
    if params.threshold is None:
        threshold = max(log_otsu_threshold(saturation), float(params.min_saturation))
    else:
        threshold = float(params.threshold)
    mask = (saturation > threshold).astype(np.uint8)
    close = _odd_kernel(params.close_um, mpp)
    if close > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close, close))
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)

    pixel_area = mpp * mpp
    mask = _drop_small_components(mask, params.min_tissue_area_um2 / pixel_area, keep_border=False)
    background = _drop_small_components(
        1 - mask, params.min_hole_area_um2 / pixel_area, keep_border=True
    )
    mask = 1 - background
    return TissueSegmentation(mask=mask, polygons=tissue_polygons(mask), threshold=threshold)


def tissue_polygons(mask: np.ndarray) -> list[list[np.ndarray]]:
    """Polygons of a binary mask: each is [outer ring, hole rings...] as (K, 2) float x, y.

    Coordinates are pixel-corner based (a pixel at column 3 spans x ∈ [3, 4)), so scaling
    by the level-0 size of a mask pixel gives level-0 coordinates.
    """
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    hierarchy = hierarchy[0]  # (n, 4): next, previous, first child, parent
    polygons: list[list[np.ndarray]] = []
    index_of_outer: dict[int, int] = {}
    # Loop over contours (a few per slide), never over patches.
    for i, contour in enumerate(contours):
        if hierarchy[i, 3] < 0:
            index_of_outer[i] = len(polygons)
            polygons.append([_ring(contour)])
    for i, contour in enumerate(contours):
        parent = hierarchy[i, 3]
        if parent >= 0 and parent in index_of_outer:
            polygons[index_of_outer[parent]].append(_ring(contour))
    return polygons


def _ring(contour: np.ndarray) -> np.ndarray:
    # Contour points are pixel centres; +0.5 puts them on the pixel's centre in corner-based
    # coordinates, which keeps drawn outlines centred on the tissue boundary pixels.
    return contour[:, 0, :].astype(np.float64) + 0.5


def scale_polygons(polygons: list[list[np.ndarray]], scale_xy) -> list[list[np.ndarray]]:
    """Polygons multiplied per axis, e.g. by the level-0 size of one mask pixel."""
    factor = np.asarray(scale_xy, dtype=np.float64)
    return [[ring * factor for ring in rings] for rings in polygons]


def polygons_to_geojson(
    polygons_level0: list[list[np.ndarray]], properties: dict | None = None
) -> dict:
    """GeoJSON FeatureCollection of tissue polygons in level-0 pixels (QuPath's convention)."""
    features = []
    for rings in polygons_level0:
        coords = [np.vstack([ring, ring[:1]]).round(1).tolist() for ring in rings if len(ring) >= 3]
        if not coords:
            continue
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": coords},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tissue", "color": [0, 160, 0]},
                    **(properties or {}),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}
