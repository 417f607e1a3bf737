"""The vectorised patch grid: exact tissue fractions, physical size, overlap, order."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.slides.grid import box_fractions, grid_axis, patch_grid


def test_box_fractions_integrate_partial_pixels_exactly():
    mask = np.zeros((4, 4), np.uint8)
    mask[1, 1] = 1
    # box [0.5, 1.5) × [0.5, 2.5): covers half of pixel (1, 1) in x, all of it in y → 0.5 px
    fractions = box_fractions(
        mask, np.array([0.5]), np.array([1.5]), np.array([0.5]), np.array([2.5])
    )
    assert fractions[0, 0] == pytest.approx(0.5 / 2.0)


def test_grid_axis_keeps_only_patches_inside_the_slide():
    starts = grid_axis(1000, 256, 256)
    assert starts.tolist() == [0, 256, 512]
    assert grid_axis(100, 256, 256).size == 0
    assert grid_axis(1000, 256, 128).tolist() == [0, 128, 256, 384, 512, 640]


def test_patch_grid_respects_tissue_fraction():
    # 10 × 10 mask pixels of 32 level-0 px each; left 3.5 columns are tissue.
    mask = np.zeros((10, 10), np.uint8)
    mask[:, :3] = 1
    level0 = (320, 320)
    grid = patch_grid(mask, level0, slide_mpp=0.5, target_mpp=0.5, patch_size=64, min_tissue=0.5)
    # patches are 64 px = 2 mask px wide: columns 0-1 full, 2-3 half tissue, 4+ none
    assert sorted(set(grid.coords[:, 0].tolist())) == [0, 64]
    assert np.allclose(grid.tissue_fraction[grid.coords[:, 0] == 64], 0.5)
    assert len(grid.coords) == 2 * 5


def test_patch_grid_is_row_major_and_inside_slide():
    mask = np.ones((50, 70), np.uint8)
    grid = patch_grid(mask, (7000, 5000), slide_mpp=0.25, target_mpp=0.5, patch_size=256)
    order = np.lexsort((grid.coords[:, 0], grid.coords[:, 1]))
    assert (order == np.arange(len(order))).all()
    assert (grid.coords[:, 0] + 512 <= 7000).all() and (grid.coords[:, 1] + 512 <= 5000).all()
    assert len(grid.coords) == (7000 // 512) * (5000 // 512)


def test_same_physical_grid_at_two_scan_resolutions():
    rng = np.random.default_rng(1)
    mask = (rng.random((60, 80)) > 0.5).astype(np.uint8)
    scan40 = patch_grid(mask, (16000, 12000), slide_mpp=0.25, target_mpp=0.5, patch_size=256)
    scan20 = patch_grid(mask, (8000, 6000), slide_mpp=0.5, target_mpp=0.5, patch_size=256)
    assert scan40.patch_size_level0 == 512 and scan20.patch_size_level0 == 256
    np.testing.assert_array_equal(scan40.coords, 2 * scan20.coords)


def test_overlap_shrinks_the_step():
    mask = np.ones((10, 10), np.uint8)
    plain = patch_grid(mask, (1024, 1024), 0.5, 0.5, 256)
    half = patch_grid(mask, (1024, 1024), 0.5, 0.5, 256, overlap=0.5)
    assert len(plain.coords) == 16
    assert len(half.coords) == 7 * 7
    assert half.step_level0 == 128
