"""What a heatmap is drawn from: a run's attention.h5, the patches file, predictions.csv."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from plumbing.errors import PipelineError

log = logging.getLogger("hmil.heatmaps")


class HeatmapError(PipelineError):
    """The attention file or the run's inputs are unusable as a whole."""


class SlideSkipped(Exception):
    """One slide cannot be drawn; the message says why (it gets a card instead)."""


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
