"""Synthetic whole-slide images with known tissue geometry, for tests, benchmarks and the demo.

Writes pyramidal tiled TIFFs that OpenSlide opens: JPEG tiles (photometric RGB), every
level a separate page (`subfiletype=1` for reduced levels; OpenSlide ignores SubIFDs), a
resolution tag giving the mpp, optionally an Aperio-style description. Every tile of
every level is rendered analytically from the geometry and written as it is made, so a
100,000 × 100,000 px slide never sits in memory. Background tiles are encoded once.

Tissue is a set of ellipses (holes are ellipses flagged `hole`) in µm, so tests can count
the patches a perfect segmentation would keep (`expected_patch_count`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from tqdm import tqdm

from plumbing.atomic import atomic_outputs
from preprocessing.slides.grid import grid_axis

BACKGROUND_RGB = (243, 242, 240)


@dataclass(frozen=True)
class Ellipse:
    """An ellipse in slide coordinates (µm from the top-left corner)."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle_deg: float = 0.0
    hole: bool = False

    def contains(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        theta = math.radians(self.angle_deg)
        dx, dy = x_um - self.cx, y_um - self.cy
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        return (u / self.rx) ** 2 + (v / self.ry) ** 2 <= 1.0


def tissue_at(regions: Sequence[Ellipse], x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """True where (x, y) lies inside a tissue ellipse and outside every hole."""
    inside = np.zeros(np.broadcast(x_um, y_um).shape, bool)
    for region in regions:  # a handful of shapes per slide
        if not region.hole:
            inside |= region.contains(x_um, y_um)
    for region in regions:
        if region.hole:
            inside &= ~region.contains(x_um, y_um)
    return inside


@dataclass(frozen=True)
class Stain:
    """Look of the tissue: stroma and nucleus colours, nucleus density and size."""

    stroma: tuple[int, int, int] = (222, 150, 190)
    nucleus: tuple[int, int, int] = (95, 60, 150)
    nuclei_per_cell: float = 0.45  #: probability that a 12 µm lattice cell holds a nucleus
    nucleus_radius_um: float = 3.5


@dataclass(frozen=True)
class SlideSpec:
    width: int  #: level-0 px
    height: int
    mpp: float | None = 0.5  #: None writes no resolution (tests of missing mpp)
    regions: tuple[Ellipse, ...] = ()
    stain: Stain = field(default_factory=Stain)
    tile: int = 512
    levels: int | None = None  #: default: halve until the longest side ≤ 2048 px, at least 4
    jpeg_quality: int = 85
    aperio: bool = False  #: Aperio-style ImageDescription (OpenSlide vendor `aperio`)
    seed: int = 0

    def level_count(self) -> int:
        if self.levels is not None:
            return self.levels
        needed = math.ceil(math.log2(max(self.width, self.height) / 2048)) + 1
        return max(4, needed)


def _hash_uniform(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic uniform [0, 1) per integer lattice cell (same value at every level)."""
    h = (ix.astype(np.uint64) * np.uint64(0x9E3779B1)) ^ (
        iy.astype(np.uint64) * np.uint64(0x85EBCA77)
    )
    h ^= np.uint64(seed * 0xC2B2AE3D + 0x27D4EB2F)
    h ^= h >> np.uint64(15)
    h *= np.uint64(0x2C1B3C6D)
    h ^= h >> np.uint64(12)
    h *= np.uint64(0x297A2D39)
    h ^= h >> np.uint64(15)
    return (h & np.uint64(0xFFFFFF)).astype(np.float64) / float(0x1000000)


def _separable_sin(fx: float, x: np.ndarray, fy: float, y: np.ndarray, phase: float = 0.0):
    """sin(fx·x + fy·y + phase) on the (y, x) grid, built from 1-D sines and two outer products."""
    ax, ay = fx * x + phase, fy * y
    return np.outer(np.cos(ay), np.sin(ax)) + np.outer(np.sin(ay), np.cos(ax))


def render_tile(
    spec: SlideSpec, level_mpp: float, x0: int, y0: int, noise: np.ndarray
) -> np.ndarray:
    """RGB tile of `spec.tile` px whose top-left is level pixel (x0, y0) at `level_mpp` µm/px.

    Everything is a function of the position in µm, so all pyramid levels show the same
    tissue. Per-pixel work is kept to a few float32 array operations (the generator must
    write 10⁴–10⁵ tiles).
    """
    size = spec.tile
    centres = ((np.arange(size) + 0.5) * level_mpp).astype(np.float32)
    x_um = np.float32(x0 * level_mpp) + centres
    y_um = np.float32(y0 * level_mpp) + centres
    inside = tissue_at(spec.regions, x_um[None, :], y_um[:, None])
    background = np.asarray(BACKGROUND_RGB, np.float32)
    if not inside.any():
        return np.full((size, size, 3), BACKGROUND_RGB, np.uint8)
    stain = spec.stain
    # Fibre-like modulation of the stroma.
    waves = _separable_sin(0.050, x_um, 0.021, y_um) + _separable_sin(
        0.013, x_um, -0.047, y_um, 1.7
    )
    stroma = np.asarray(stain.stroma, np.float32) * (1 + 0.05 * waves[..., None])
    # Nuclei: at most one per 12 µm lattice cell, at a position hashed from the cell,
    # evaluated once per cell and broadcast to its pixels.
    cell = 12.0
    ix, iy = np.floor(x_um / cell).astype(np.int64), np.floor(y_um / cell).astype(np.int64)
    cells_x, run_x = np.unique(ix, return_counts=True)  # cells are contiguous runs
    cells_y, run_y = np.unique(iy, return_counts=True)
    gx, gy = np.meshgrid(cells_x, cells_y)

    def per_pixel(per_cell: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(per_cell, run_y, axis=0), run_x, axis=1)

    present = _hash_uniform(gx, gy, spec.seed) < stain.nuclei_per_cell
    centre_x = ((gx + 0.2 + 0.6 * _hash_uniform(gx + 7919, gy, spec.seed)) * cell).astype(
        np.float32
    )
    centre_y = ((gy + 0.2 + 0.6 * _hash_uniform(gx, gy + 104729, spec.seed)) * cell).astype(
        np.float32
    )
    if level_mpp > 2 * stain.nucleus_radius_um:
        # Nuclei smaller than a pixel: show their expected share instead of aliasing.
        share = np.float32(stain.nuclei_per_cell * math.pi * stain.nucleus_radius_um**2 / cell**2)
    else:
        dx = x_um[None, :] - per_pixel(centre_x)
        dy = y_um[:, None] - per_pixel(centre_y)
        distance = np.sqrt(dx * dx + dy * dy)
        soft = np.float32(max(level_mpp, 1.0))
        share = np.clip((stain.nucleus_radius_um + soft / 2 - distance) / soft, 0, 1)
        share *= per_pixel(present)
        share = share[..., None]
    nucleus = np.asarray(stain.nucleus, np.float32)
    colour = stroma + (nucleus - stroma) * share
    # Glass stays flat (a noisy flat tile JPEG-encodes 5× larger than a clean one).
    tile = np.where(inside[..., None], colour + noise, background)
    return np.clip(tile, 0, 255).astype(np.uint8)


def _encode(tile: np.ndarray, quality: int) -> bytes:
    return imagecodecs.jpeg8_encode(tile, level=quality, colorspace="RGB", outcolorspace="RGB")


def _tiles_of_level(spec: SlideSpec, level: int, progress: tqdm | None) -> Iterator[bytes]:
    downsample = 2**level
    level_mpp = (spec.mpp or 1.0) * downsample
    width, height = math.ceil(spec.width / downsample), math.ceil(spec.height / downsample)
    # One noise tile per level, reused: drawing fresh Gaussian noise per tile costs more
    # than rendering and encoding it.
    noise = np.random.default_rng([spec.seed, level]).normal(0, 3.0, (spec.tile, spec.tile, 3))
    noise = noise.astype(np.float32)
    blank = _encode(np.full((spec.tile, spec.tile, 3), BACKGROUND_RGB, np.uint8), spec.jpeg_quality)
    for y0 in range(0, height, spec.tile):
        for x0 in range(0, width, spec.tile):
            if _may_touch_tissue(spec, level_mpp, x0, y0):
                yield _encode(render_tile(spec, level_mpp, x0, y0, noise), spec.jpeg_quality)
            else:
                yield blank
            if progress is not None:
                progress.update(1)


def _may_touch_tissue(spec: SlideSpec, level_mpp: float, x0: int, y0: int) -> bool:
    left, top = x0 * level_mpp, y0 * level_mpp
    right, bottom = left + spec.tile * level_mpp, top + spec.tile * level_mpp
    for region in spec.regions:
        if region.hole:
            continue
        reach = max(region.rx, region.ry)
        if (
            region.cx + reach >= left
            and region.cx - reach <= right
            and region.cy + reach >= top
            and region.cy - reach <= bottom
        ):
            return True
    return False


def _aperio_description(spec: SlideSpec) -> str:
    magnification = round(10.0 / spec.mpp) if spec.mpp else 20
    text = (
        f"Aperio Image Library v12.0.15 synthetic\r\n{spec.width}x{spec.height} "
        f"[0,0 {spec.width}x{spec.height}] ({spec.tile}x{spec.tile}) JPEG/RGB Q={spec.jpeg_quality}"
        f"|AppMag = {magnification}"
    )
    return text + (f"|MPP = {spec.mpp}" if spec.mpp else "")


def write_slide(path: str | Path, spec: SlideSpec, progress: bool = False) -> Path:
    """Write `spec` as a pyramidal tiled TIFF at `path` (atomically). Returns the path."""
    if spec.tile % 16:
        raise ValueError("tile size must be a multiple of 16 (TIFF and JPEG requirement)")
    levels = spec.level_count()
    total = sum(
        math.ceil(math.ceil(spec.width / 2**lv) / spec.tile)
        * math.ceil(math.ceil(spec.height / 2**lv) / spec.tile)
        for lv in range(levels)
    )
    bar = tqdm(total=total, desc=f"writing {Path(path).name}", unit="tile", disable=not progress)
    with atomic_outputs(path) as (temporary,), tifffile.TiffWriter(temporary, bigtiff=True) as tiff:
        for level in range(levels):
            downsample = 2**level
            shape = (math.ceil(spec.height / downsample), math.ceil(spec.width / downsample), 3)
            options = {}
            if spec.mpp:
                pixels_per_cm = 1e4 / (spec.mpp * downsample)
                options = {
                    "resolution": (pixels_per_cm, pixels_per_cm),
                    "resolutionunit": "CENTIMETER",
                }
            if level == 0 and spec.aperio:
                options["description"] = _aperio_description(spec)
            tiff.write(
                _tiles_of_level(spec, level, bar),
                shape=shape,
                dtype=np.uint8,
                tile=(spec.tile, spec.tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": spec.jpeg_quality, "outcolorspace": "RGB"},
                subfiletype=1 if level else 0,
                metadata=None,
                **options,
            )
    bar.close()
    return Path(path)


def expected_patch_count(
    spec: SlideSpec,
    target_mpp: float = 0.5,
    patch_size: int = 256,
    min_tissue: float = 0.25,
    samples: int = 16,
) -> int:
    """Patches whose true tissue fraction (sampled on a fine lattice) is >= `min_tissue`.

    The reference for tests: it reads the geometry, not the image, so it checks the
    whole chain (rendering, pyramid, segmentation, grid) against ground truth.
    """
    patch0 = patch_size * target_mpp / spec.mpp
    offsets = (np.arange(samples) + 0.5) / samples * patch0
    xs = (grid_axis(spec.width, patch0, patch0)[:, None] + offsets[None, :]) * spec.mpp
    ys = (grid_axis(spec.height, patch0, patch0)[:, None] + offsets[None, :]) * spec.mpp
    count_y = len(ys)
    # (count_y, samples, count_x, samples) membership, in row blocks to bound memory.
    kept = 0
    for start in range(0, count_y, 64):
        block = ys[start : start + 64]
        inside = tissue_at(spec.regions, xs[None, None, :, :], block[:, :, None, None])
        kept += int((inside.mean(axis=(1, 3)) >= min_tissue).sum())
    return kept


def two_region_spec(width: int, height: int, mpp: float, **kwargs) -> SlideSpec:
    """Two tissue pieces (one with a hole) scaled to the slide: the benchmark geometry."""
    w_um, h_um = width * mpp, height * mpp
    regions = (
        Ellipse(0.30 * w_um, 0.45 * h_um, 0.17 * w_um, 0.28 * h_um, angle_deg=20),
        Ellipse(0.30 * w_um, 0.45 * h_um, 0.05 * w_um, 0.07 * h_um, hole=True),
        Ellipse(0.72 * w_um, 0.60 * h_um, 0.12 * w_um, 0.20 * h_um, angle_deg=-35),
    )
    return SlideSpec(width=width, height=height, mpp=mpp, regions=regions, **kwargs)
