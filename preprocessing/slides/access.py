"""Open a whole-slide image with OpenSlide, resolve its physical resolution, read it by mpp.

Every failure is a `SlideError` naming the file and the problem, so a cohort run can
report it and go on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide

from plumbing.errors import SlideError

log = logging.getLogger(__name__)

#: Plausible microns per pixel: from very high magnification to a macro photograph.
MPP_RANGE = (0.05, 20.0)

#: Vendor properties that carry a pixel size in µm, tried when `openslide.mpp-x` is absent.
VENDOR_MPP_KEYS = (
    "aperio.MPP",
    "philips.DICOM_PIXEL_SPACING",  # "0.000250 0.000250" in mm
    "hamamatsu.XResolution",  # handled by OpenSlide, kept for older builds
    "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X",
    "ventana.ScanRes",
)

#: TIFF ResolutionUnit → microns per unit.
_TIFF_UNIT_UM = {"centimeter": 1e4, "inch": 25400.0, "millimeter": 1e3, "micrometer": 1.0}


@dataclass(frozen=True)
class Mpp:
    """Pixel size of level 0 in µm, and where the value came from (recorded in every output)."""

    value: float
    source: str


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open `path` with OpenSlide (any format it reads), or raise a `SlideError` saying why."""
    path = Path(path)
    if not path.exists():
        raise SlideError(path, "file not found")
    if path.is_dir():
        raise SlideError(path, "is a folder, not a slide file")
    if path.stat().st_size == 0:
        raise SlideError(path, "file is empty (0 bytes)")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(path, "not a slide format OpenSlide can read") from None
    except openslide.OpenSlideError as err:
        raise SlideError(path, f"OpenSlide cannot open it ({err})") from None
    except OSError as err:
        raise SlideError(path, f"cannot open ({err.strerror or err})") from None


def _parse_um(key: str, raw: str) -> float | None:
    try:
        if key == "philips.DICOM_PIXEL_SPACING":
            return float(raw.replace('"', "").split()[0]) * 1e3  # mm → µm
        return float(raw)
    except (ValueError, IndexError):
        return None


def _plausible(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and MPP_RANGE[0] <= value <= MPP_RANGE[1]


def mpp_candidates(properties: Mapping[str, str]) -> list[Mpp]:
    """Every pixel size the metadata claims, in order of trust (plausible or not)."""
    found: list[Mpp] = []
    if "openslide.mpp-x" in properties:
        value = _parse_um("openslide.mpp-x", properties["openslide.mpp-x"])
        if value is not None:
            found.append(Mpp(value, "openslide.mpp-x"))
    for key in VENDOR_MPP_KEYS:
        if key in properties:
            value = _parse_um(key, properties[key])
            if value is not None:
                found.append(Mpp(value, key))
    unit = properties.get("tiff.ResolutionUnit", "").lower()
    if unit in _TIFF_UNIT_UM and "tiff.XResolution" in properties:
        try:
            per_unit = float(properties["tiff.XResolution"])
        except ValueError:
            per_unit = 0.0
        if per_unit > 0:
            found.append(Mpp(_TIFF_UNIT_UM[unit] / per_unit, "tiff.XResolution"))
    return found


def resolve_mpp(
    properties: Mapping[str, str], path: str | Path, override: float | None = None
) -> Mpp:
    """Level-0 µm/px: an explicit override wins, else the first plausible metadata value.

    Chain: `openslide.mpp-x` → vendor keys → TIFF resolution tags. Values outside
    `MPP_RANGE` are treated as missing (a generic TIFF at 72 dpi claims 352 µm/px).
    With nothing usable and no override this is an error, never a guess.
    """
    candidates = mpp_candidates(properties)
    plausible = [c for c in candidates if _plausible(c.value)]
    if override is not None:
        if not _plausible(override):
            raise SlideError(
                path, f"mpp override {override} is outside the plausible range {MPP_RANGE} µm/px"
            )
        if plausible and abs(plausible[0].value - override) / override > 0.1:
            log.warning(
                "%s: mpp override %.4g differs from the file's %s = %.4g; using the override",
                path,
                override,
                plausible[0].source,
                plausible[0].value,
            )
        return Mpp(float(override), "override")
    if plausible:
        return plausible[0]
    if candidates:
        claimed = ", ".join(f"{c.source}={c.value:.4g}" for c in candidates)
        problem = f"implausible mpp in metadata ({claimed} µm/px, outside {MPP_RANGE})"
    else:
        problem = "no mpp (pixel size) in the metadata"
    raise SlideError(path, f"{problem}; give it with --mpp or the sheet's `mpp` column")


def level_mpps(slide: openslide.OpenSlide, mpp: float) -> np.ndarray:
    """µm/px of every pyramid level."""
    return mpp * np.asarray(slide.level_downsamples, dtype=float)


def best_level_for_mpp(slide: openslide.OpenSlide, mpp: float, target_mpp: float) -> int:
    """Coarsest level that is at least as fine as `target_mpp` (so reading never upsamples).

    A 1% tolerance absorbs rounding in stored downsamples (e.g. 4.016 for 4).
    """
    finer = np.flatnonzero(level_mpps(slide, mpp) <= target_mpp * 1.01)
    return int(finer[-1]) if finer.size else 0


def read_rgb(
    slide: openslide.OpenSlide, location: tuple[int, int], level: int, size: tuple[int, int]
):
    """RGB uint8 array of a region; transparent pixels (outside scanned area) become white."""
    rgba = np.asarray(slide.read_region(location, level, size))
    rgb = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    transparent = rgba[..., 3] == 0
    if transparent.any():
        rgb[transparent] = 255
    return rgb


def read_at_mpp(
    slide: openslide.OpenSlide,
    mpp: float,
    target_mpp: float,
    path: str | Path,
    strip_pixels: int = 16_000_000,
) -> tuple[np.ndarray, int]:
    """The whole slide as RGB at (about) `target_mpp`, read from the best level in strips.

    Reading in strips bounds memory when the chosen level is large (few pyramid levels).
    Returns the image and the level it was read from. The output size is the level-0 size
    scaled by mpp / target_mpp, so its exact µm/px per axis is level0_size / output_size.
    """
    level = best_level_for_mpp(slide, mpp, target_mpp)
    width0, height0 = slide.dimensions
    out_w = max(1, round(width0 * mpp / target_mpp))
    out_h = max(1, round(height0 * mpp / target_mpp))
    level_w, level_h = slide.level_dimensions[level]
    downsample = slide.level_downsamples[level]
    rows_per_out = level_h / out_h
    out = np.empty((out_h, out_w, 3), np.uint8)
    out_step = max(1, int(strip_pixels / level_w / max(rows_per_out, 1.0)))
    try:
        for o0 in range(0, out_h, out_step):
            o1 = min(out_h, o0 + out_step)
            s0 = math.floor(o0 * rows_per_out)
            s1 = min(level_h, max(s0 + 1, math.ceil(o1 * rows_per_out)))
            strip = read_rgb(slide, (0, round(s0 * downsample)), level, (level_w, s1 - s0))
            interp = cv2.INTER_AREA if rows_per_out >= 1 else cv2.INTER_LINEAR
            out[o0:o1] = cv2.resize(strip, (out_w, o1 - o0), interpolation=interp)
    except openslide.OpenSlideError as err:
        raise SlideError(path, f"tile data cannot be read at level {level} ({err})") from None
    return out, level
