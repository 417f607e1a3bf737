"""Import a cohort's features made by another tool as thin features files.

Many cohorts arrive already encoded: by CLAM (``extract_features_fp.py``), by TRIDENT, or in
the HMIL authors' layout. Each slide of a sheet is found in such a folder
(:mod:`~preprocessing.features.import_sources`) and checked
(:mod:`~preprocessing.features.import_checks`); the workflow's ``<out-dir>/<slide_id>.h5``
is then a *thin* file: HDF5 external links to the source's ``features`` and ``coords`` plus
the attributes the pipeline reads (``encoder``, ``weights``, ``feature_dim``, ``status``,
the patch geometry). A ``.pt`` source is named by the attribute ``features_pt``, which
`hmil.data.bags` follows. A cohort's features are never copied a second time; the source
folder must stay where it is.

All slides must share one D. A slide missing from the folder or with unusable features
gets a flagged file (``status`` ``failed`` and ``status_reason``), as extraction does for
a bad slide, so that training leaves it out and names it; ``strict`` makes it fatal.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from plumbing.atomic import atomic_outputs, buffered
from plumbing.errors import PipelineError
from plumbing.provenance import code_version
from preprocessing.features.import_checks import SlideImport, inspect_source
from preprocessing.features.import_sources import FeatureImportError, locate_cohort, looked_for
from preprocessing.slides.patch_files import STATUS_FAILED, STATUS_OK
from preprocessing.slides.sheet import read_slide_sheet

SUMMARY_NAME = "imported.csv"


def check_dimensions(slides: list[SlideImport], expected: int | None, encoder: str) -> int | None:
    """The one D of the cohort; FeatureImportError naming the first file that differs.

    `expected` is the D of the project's encoder of that name, when it has one: features
    named `uni` must be UNI-sized."""
    dims = [s.feature_dim for s in slides if s.status == STATUS_OK and s.feature_dim]
    if not dims:
        return expected
    common = Counter(dims).most_common(1)[0][0]
    for slide in slides:
        if slide.status == STATUS_OK and slide.feature_dim not in (None, common):
            raise FeatureImportError(
                f"{slide.source.path}: features are {slide.feature_dim}-d, those of "
                f"{dims.count(common)} other slides {common}-d; features of two encoders "
                "in one folder?"
            )
    if expected is not None and common != expected:
        first = next(s for s in slides if s.status == STATUS_OK and s.feature_dim == common)
        raise FeatureImportError(
            f"{first.source.path}: features are {common}-d "
            f"but the project's encoder {encoder} gives {expected}-d; name the encoder for "
            "what made these features (e.g. uni_v2, conch_v15)"
        )
    return common


def registered_dimension(encoder: str) -> int | None:
    """D of the project's own encoder of that name, or None for a name it does not know."""
    try:
        from preprocessing.features.encoders import get_encoder_spec

        return get_encoder_spec(encoder).feature_dim
    except PipelineError:
        return None


def thin_attributes(slide: SlideImport, encoder: str, source_dir: Path, dim: int | None) -> dict:
    """The attributes the pipeline reads from a features file (see `write_features`)."""
    source = slide.source
    layout = source.layout if source else "missing"
    maker = slide.source_encoder
    attrs = {
        "encoder": encoder,
        "weights": f"imported:{layout}" + (f":{maker}" if maker else ""),
        "feature_dim": int(slide.feature_dim or dim or 0),
        "status": slide.status,
        "status_reason": slide.reason,
        "n_patches": slide.num_patches if slide.status == STATUS_OK else 0,
        "source": str(source.path) if source else "",
        "source_dir": str(source_dir),
        "layout": layout,
        "code_version": code_version(),
    }
    if source is not None and not source.is_h5 and slide.status == STATUS_OK:
        attrs["features_pt"] = str(source.path)
    if maker:
        attrs["source_encoder"] = maker
    attrs.update({k: v for k, v in slide.geometry.items() if v is not None})
    return attrs


def write_thin_features(out: Path, slide: SlideImport, attrs: dict) -> None:
    """``out``: links to the source's datasets (or, flagged, empty ones) and `attrs`, atomically.

    Links are absolute paths, so that the results folder can move; the source cannot."""
    dim = int(attrs["feature_dim"])
    with atomic_outputs(out) as (temp,), buffered(temp) as buffer, h5py.File(buffer, "w") as h5:
        usable = slide.status == STATUS_OK and slide.source is not None
        if usable and slide.source.is_h5:
            h5["features"] = h5py.ExternalLink(str(slide.source.path), "/features")
            if slide.has_coords:
                h5["coords"] = h5py.ExternalLink(str(slide.source.path), "/coords")
        elif not usable:  # the same empty datasets as extraction's flagged files
            h5.create_dataset("features", data=np.zeros((0, dim), np.float32))
            h5.create_dataset("coords", data=np.zeros((0, 2), np.int64))
        for key, value in attrs.items():
            h5.attrs[key] = value


def import_cohort(
    source_dir: Path,
    slide_ids: list[str],
    encoder: str,
    out_dir: Path,
    patches_dir: Path | None = None,
    strict: bool = False,
    expected_dim: int | None = None,
) -> pd.DataFrame:
    """Import every slide; returns the summary table (also written as ``imported.csv``)."""
    source_dir = source_dir.resolve()
    sources = locate_cohort(source_dir, encoder, slide_ids)
    slides = []
    for slide_id, source in sources.items():
        if source is None:
            looked = looked_for(source_dir, encoder, slide_id)
            slide = SlideImport(slide_id, None).fail(
                f"not found in {source_dir} (looked for {looked})"
            )
        else:
            slide = inspect_source(source, patches_dir)
        if strict and slide.status == STATUS_FAILED:
            raise FeatureImportError(f"slide {slide_id}: {slide.reason}")
        slides.append(slide)
    dim = check_dimensions(slides, expected_dim, encoder)
    rows = []
    for slide in slides:
        attrs = thin_attributes(slide, encoder, source_dir, dim)
        write_thin_features(out_dir / f"{slide.slide_id}.h5", slide, attrs)
        rows.append(
            {
                "slide_id": slide.slide_id,
                "status": slide.status,
                "layout": attrs["layout"],
                "n_patches": attrs["n_patches"],
                "feature_dim": attrs["feature_dim"],
                "coords": slide.has_coords,
                "source": attrs["source"],
                "reason": slide.reason,
            }
        )
    table = pd.DataFrame(rows)
    with atomic_outputs(out_dir / SUMMARY_NAME) as (temp,):
        table.to_csv(temp, index=False)
    return table


@dataclass(frozen=True)
class ImportRequest:
    """One import: the folder of features made elsewhere and the sheet of slides to take."""

    source: Path
    sheet: Path
    encoder: str  #: the name the workflow uses for these features
    out_dir: Path
    patches_dir: Path | None = None  #: CLAM patches folder, for the patch geometry
    strict: bool = False  #: a missing or bad slide is fatal


def import_sheet(request: ImportRequest) -> pd.DataFrame:
    """Import every slide of the request's sheet; returns the summary table."""
    sheet = read_slide_sheet(request.sheet, require_labels=False)
    return import_cohort(
        request.source,
        list(sheet.index),
        request.encoder,
        request.out_dir,
        patches_dir=request.patches_dir,
        strict=request.strict,
        expected_dim=registered_dimension(request.encoder),
    )


def report(table: pd.DataFrame, request: ImportRequest) -> None:
    """A warning per slide left out, a note on slides without coordinates, the summary line."""
    for row in table[table["status"] != STATUS_OK].itertuples():
        print(f"warning: slide {row.slide_id} recorded {row.status}: {row.reason}", file=sys.stderr)
    ok = table["status"] == STATUS_OK
    no_coords = int((ok & ~table["coords"]).sum())
    if no_coords:
        print(
            f"note: {no_coords} of {int(ok.sum())} slides have no patch coordinates "
            f"(layout {', '.join(sorted(set(table.loc[ok & ~table['coords'], 'layout'])))}): "
            "no heatmaps for them",
            file=sys.stderr,
        )
    print(
        f"{request.out_dir}: {int(ok.sum())} of {len(table)} slides imported from {request.source} "
        f"({request.encoder}, {table.loc[ok, 'feature_dim'].max() if ok.any() else '?'}-d); "
        f"summary in {request.out_dir / SUMMARY_NAME}"
    )
