"""Tissue segmentation on small hand-made images with known geometry."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from preprocessing.slides.tissue import (
    TissueParams,
    polygons_to_geojson,
    scale_polygons,
    segment_tissue,
)

PINK = (220, 150, 190)
GLASS = (243, 242, 240)


def _image(height=200, width=300):
    rng = np.random.default_rng(0)
    image = np.empty((height, width, 3), np.float32)
    image[:] = GLASS
    return image, rng


def _finish(image, rng):
    return np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)


def test_rectangle_with_hole_gives_outer_ring_and_hole():
    image, rng = _image()
    image[40:160, 50:250] = PINK
    image[80:120, 120:180] = GLASS  # 40 × 60 px hole = 2400 px² = 153,600 µm² at 8 µm/px
    seg = segment_tissue(_finish(image, rng), mpp=8.0, params=TissueParams())
    expected = np.zeros((200, 300), np.uint8)
    expected[40:160, 50:250] = 1
    expected[80:120, 120:180] = 0
    assert (seg.mask != expected).mean() < 0.01
    assert len(seg.polygons) == 1
    assert len(seg.polygons[0]) == 2  # outer ring + one hole
    outer = seg.polygons[0][0]
    assert outer[:, 0].min() == pytest.approx(50, abs=1.5)
    assert outer[:, 0].max() == pytest.approx(250, abs=1.5)


def test_area_filters_are_physical():
    """A 6×6 px speck is 2,304 µm² at 8 µm/px (dropped) but 0.81 mm² at 150 µm/px (kept)."""
    image, rng = _image()
    image[40:160, 50:150] = PINK
    image[20:26, 250:256] = PINK
    rgb = _finish(image, rng)
    params = TissueParams(min_tissue_area_um2=20_000, median_um=1, close_um=1)
    fine = segment_tissue(rgb, mpp=8.0, params=params)
    coarse = segment_tissue(rgb, mpp=150.0, params=params)
    assert fine.mask[20:26, 250:256].sum() == 0
    assert coarse.mask[20:26, 250:256].sum() == 36
    assert len(fine.polygons) == 1 and len(coarse.polygons) == 2


def test_small_holes_are_filled_large_holes_kept():
    image, rng = _image()
    image[20:180, 20:280] = PINK
    image[50:53, 50:53] = GLASS  # 9 px = 576 µm²: filled
    image[100:150, 150:250] = GLASS  # 5000 px = 0.32 mm²: kept
    seg = segment_tissue(_finish(image, rng), 8.0, TissueParams(median_um=1, close_um=1))
    assert seg.mask[51, 51] == 1
    assert seg.mask[125, 200] == 0


def test_blank_glass_has_no_tissue():
    image, rng = _image()
    seg = segment_tissue(_finish(image, rng), 8.0, TissueParams())
    assert seg.mask.sum() == 0
    assert seg.polygons == []


def test_otsu_keeps_pale_tissue_beside_dark_tissue():
    """Pale eosin stroma must not be cut away because the nuclei-rich tissue is darker."""
    image, rng = _image()
    image[30:170, 30:140] = (100, 60, 150)  # dark purple, saturation ~153
    image[30:170, 160:270] = (235, 200, 218)  # pale pink, saturation ~38
    seg = segment_tissue(_finish(image, rng), 8.0, TissueParams())
    assert seg.mask[100, 80] == 1 and seg.mask[100, 215] == 1
    assert seg.mask[10, 10] == 0


def test_fixed_threshold_option():
    image, rng = _image()
    image[30:170, 160:270] = (235, 200, 218)
    rgb = _finish(image, rng)
    assert segment_tissue(rgb, 8.0, TissueParams(threshold=20)).mask[100, 215] == 1
    assert segment_tissue(rgb, 8.0, TissueParams(threshold=60)).mask[100, 215] == 0


def test_geojson_is_closed_polygons_in_level0_pixels():
    mask = np.zeros((100, 100), np.uint8)
    cv2.rectangle(mask, (10, 20), (59, 79), 1, -1)
    seg_polygons = segment_tissue(
        np.where(mask[..., None] == 1, np.uint8(PINK), np.uint8(GLASS)).astype(np.uint8),
        8.0,
        TissueParams(median_um=1, close_um=1),
    ).polygons
    collection = polygons_to_geojson(scale_polygons(seg_polygons, (16.0, 16.0)))
    (feature,) = collection["features"]
    ring = np.asarray(feature["geometry"]["coordinates"][0])
    assert (ring[0] == ring[-1]).all()
    assert ring[:, 0].min() == pytest.approx(10.5 * 16)
    assert ring[:, 1].max() == pytest.approx(79.5 * 16)
    assert feature["properties"]["classification"]["name"] == "Tissue"
