"""Features made by another tool as the workflow's own (`python -m preprocessing.import_features`).

Many cohorts arrive already encoded: by CLAM (``extract_features_fp.py``), by TRIDENT, or in
the HMIL authors' layout. This module finds each slide of a sheet in such a folder, checks
the features, and writes the workflow's ``<out-dir>/<slide_id>.h5`` as a *thin* file: HDF5
external links to the source's ``features`` and ``coords`` plus the attributes the pipeline
reads (``encoder``, ``weights``, ``feature_dim``, ``status``, the patch geometry). A ``.pt``
source is named by the attribute ``features_pt``, which `hmil.data.bags` follows. A cohort's
features are never copied a second time; the source folder must stay where it is.

Layouts, detected per slide in this order (h5 first: only h5 files carry coordinates):

- ``h5_files/<id>.h5`` (CLAM): ``features`` N×D, ``coords`` N×2. CLAM writes no attributes
  there; the patch geometry is on the coords of CLAM's patches file, looked for in
  ``--patches-dir`` or ``<source>/patches/<id>.h5`` (``patch_size``, ``patch_level``,
  ``downsample``);
- ``features_<encoder>/<id>.h5`` (TRIDENT): coords attributes ``patch_size``,
  ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
  ``level0_width``, ``level0_height``; features attribute ``encoder``;
- ``<id>.h5``: either of the above given as the folder itself (e.g. TRIDENT's
  ``features_uni_v1``), told apart by those attributes;
- ``pt_files/<id>.pt`` (CLAM), ``features_<encoder>/<id>.pt`` (TRIDENT ``--saveas pt``) and
  ``<id>.pt`` (the HMIL reference layout): an N×D tensor, no coordinates, so no heatmaps.

Every slide is checked (N×D, finite values, coords N×2 when present) and all of them must
share one D. A slide missing from the folder or with unusable features gets a flagged file
(``status`` ``failed`` and ``status_reason``), as extraction does for a bad slide, so that
training leaves it out and names it; ``--strict`` makes it fatal. A folder holding none of
the sheet's slides is one error line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from plumbing.atomic import atomic_outputs, buffered
from plumbing.cli import run_cli, setup_logging
from plumbing.errors import PipelineError
from plumbing.provenance import code_version
from preprocessing.slides.sheet import read_slide_sheet

log = logging.getLogger("hmil.import_features")

STATUS_OK, STATUS_EMPTY, STATUS_FAILED = "ok", "empty", "failed"
#: Rows read at a time when checking values: bounded memory on slides of 100k+ patches.
BLOCK_ROWS = 65536
#: Geometry attributes copied from the source's coords (TRIDENT names; CLAM's are a subset).
GEOMETRY_KEYS = (
    "patch_size",
    "patch_level",
    "patch_size_level0",
    "level0_width",
    "level0_height",
    "level0_magnification",
    "target_magnification",
    "overlap",
)
SUMMARY_NAME = "imported.csv"


class FeatureImportError(PipelineError):
    """The source folder as a whole cannot be imported (the CLI prints one line)."""


@dataclass(frozen=True)
class SourceFile:
    """One slide's features in the source folder; layout names where it was found."""

    slide_id: str
    path: Path
    layout: str

    @property
    def is_h5(self) -> bool:
        return self.path.suffix == ".h5"


def candidate_paths(source_dir: Path, encoder: str, slide_id: str) -> list[tuple[Path, str]]:
    """Where a slide's features may be, in the order they are preferred, with the layout."""
    trident = source_dir / f"features_{encoder}"
    return [
        (source_dir / "h5_files" / f"{slide_id}.h5", "clam"),
        (trident / f"{slide_id}.h5", "trident"),
        (source_dir / f"{slide_id}.h5", "h5"),
        (source_dir / "pt_files" / f"{slide_id}.pt", "clam_pt"),
        (trident / f"{slide_id}.pt", "trident_pt"),
        (source_dir / f"{slide_id}.pt", "pt"),
    ]


def looked_for(source_dir: Path, encoder: str, slide_id: str) -> str:
    """The candidate paths of a slide, relative to the folder, for error messages."""
    paths = candidate_paths(source_dir, encoder, slide_id)
    return ", ".join(str(path.relative_to(source_dir)) for path, _ in paths)


def locate_source(source_dir: str | Path, encoder: str, slide_id: str) -> SourceFile | None:
    """The preferred features file of a slide in `source_dir`, or None when there is none."""
    for path, layout in candidate_paths(Path(source_dir), encoder, slide_id):
        if path.is_file():
            return SourceFile(slide_id, path, layout)
    return None


def locate_cohort(
    source_dir: str | Path, encoder: str, slide_ids: list[str]
) -> dict[str, SourceFile | None]:
    """Each slide's source file (None where missing); FeatureImportError when the folder is
    missing or holds none of the slides, the one mistake that would fail every slide."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise FeatureImportError(f"{source_dir}: features folder not found")
    found = {slide_id: locate_source(source_dir, encoder, slide_id) for slide_id in slide_ids}
    if slide_ids and not any(found.values()):
        looked = looked_for(source_dir, encoder, "<slide_id>")
        raise FeatureImportError(
            f"{source_dir}: none of the sheet's {len(slide_ids)} slides found (looked for "
            f"{looked}); wrong folder, encoder name or slide ids?"
        )
    return found


# --- reading one source ----------------------------------------------------------------------


@dataclass
class SlideImport:
    """What was found for one slide: the thin file's contents and the summary row."""

    slide_id: str
    source: SourceFile | None
    status: str = STATUS_OK
    reason: str = ""
    num_patches: int = 0
    feature_dim: int | None = None
    has_coords: bool = False
    source_encoder: str | None = None
    geometry: dict = field(default_factory=dict)

    def fail(self, reason: str) -> SlideImport:
        self.status, self.reason = STATUS_FAILED, reason
        return self


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _attributes(obj: h5py.HLObject) -> dict:
    """An HDF5 object's attributes as plain values; TRIDENT's ``save_h5`` writes a missing
    value as the string 'None', which counts as absent."""
    attrs = {key: _plain(value) for key, value in obj.attrs.items()}
    return {k: v for k, v in attrs.items() if not (isinstance(v, str) and v == "None")}


def inspect_source(source: SourceFile, patches_dir: Path | None = None) -> SlideImport:
    """Read and check one slide's features; a problem marks the slide failed, never raises."""
    found = SlideImport(source.slide_id, source)
    try:
        if source.is_h5:
            _inspect_h5(found, source.path, patches_dir)
        else:
            _inspect_pt(found, source.path)
    except OSError as error:  # truncated, not HDF5, a chunk failing its checksum
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return found.fail(f"{source.path}: cannot read features ({first})")
    if found.status == STATUS_OK and found.num_patches == 0:
        found.status, found.reason = STATUS_EMPTY, f"{source.path}: 0 patches"
    return found


def _inspect_h5(found: SlideImport, path: Path, patches_dir: Path | None) -> None:
    with h5py.File(path, "r") as h5:
        if "features" not in h5:
            found.fail(f"{path}: no `features` dataset")
            return
        features = h5["features"]
        if features.ndim != 2:
            if features.size == 0:  # TRIDENT writes an empty slide's features as shape (0,)
                found.num_patches = 0
                return
            found.fail(f"{path}: `features` has shape {features.shape}, expected N×D")
            return
        found.num_patches, found.feature_dim = int(features.shape[0]), int(features.shape[1])
        found.source_encoder = _attributes(features).get("encoder") or None
        bad_rows = _count_not_finite(features)
        if bad_rows:
            found.fail(f"{path}: {bad_rows} of {found.num_patches} feature rows hold NaN or Inf")
            return
        if "coords" in h5:
            coords = h5["coords"]
            if coords.shape != (found.num_patches, 2):
                found.fail(f"{path}: coords {coords.shape} do not match features {features.shape}")
                return
            found.has_coords = True
            found.geometry = patch_geometry(
                _attributes(coords),
                _clam_patches_attrs(path, found.slide_id, patches_dir),
                coords[()],
            )
    if found.geometry.get("target_magnification") is not None and found.source.layout == "h5":
        found.source = SourceFile(found.slide_id, path, "trident")


def _inspect_pt(found: SlideImport, path: Path) -> None:
    import torch  # only .pt sources need it; h5-only imports stay light

    tensor = None
    for mmap in (True, False):  # legacy (non-zip) files cannot be memory-mapped
        try:
            tensor = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as error:  # truncated zip, pickle errors: all mean "unreadable"
            problem = type(error).__name__
    if tensor is None:
        found.fail(f"{path}: cannot read feature tensor ({problem})")
        return
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        found.fail(f"{path}: expected one N×D tensor, found {shape}")
        return
    found.num_patches, found.feature_dim = int(tensor.shape[0]), int(tensor.shape[1])
    bad_rows = int((~torch.isfinite(tensor).all(dim=1)).sum()) if tensor.numel() else 0
    if bad_rows:
        found.fail(f"{path}: {bad_rows} of {found.num_patches} feature rows hold NaN or Inf")


def _count_not_finite(features: h5py.Dataset) -> int:
    bad = 0
    for start in range(0, features.shape[0], BLOCK_ROWS):
        block = features[start : start + BLOCK_ROWS]
        bad += int((~np.isfinite(block).all(axis=1)).sum())
    return bad


def _clam_patches_attrs(path: Path, slide_id: str, patches_dir: Path | None) -> dict:
    """Coords attributes of CLAM's patches file (create_patches_fp), when one is found: CLAM's
    features h5 carries none itself."""
    folders = [patches_dir] if patches_dir is not None else []
    folders.append(path.parent.parent / "patches")
    for folder in folders:
        candidate = folder / f"{slide_id}.h5"
        if candidate.is_file():
            try:
                with h5py.File(candidate, "r") as h5:
                    if "coords" in h5:
                        return _attributes(h5["coords"])
            except OSError:
                log.warning("%s: CLAM patches file unreadable; geometry unknown", candidate)
    return {}


def patch_geometry(coords_attrs: dict, clam_patches_attrs: dict, coords: np.ndarray) -> dict:
    """Patch squares in level-0 pixels from what the source records, for heatmaps.

    TRIDENT records ``patch_size_level0``; CLAM records ``patch_size`` at ``patch_level`` and
    that level's ``downsample`` on its patches file. With neither, the grid step of the
    coordinates is taken (CLAM's default step is the patch size: no overlap), and
    ``geometry_source`` says so.
    """
    attrs = {**clam_patches_attrs, **coords_attrs}
    geometry = {key: attrs[key] for key in GEOMETRY_KEYS if key in attrs}
    for key, value in list(geometry.items()):
        if isinstance(value, np.ndarray):
            geometry[key] = value.tolist()
    if "patch_size_level0" in geometry:
        geometry["geometry_source"] = "source attributes"
        return geometry
    if "patch_size" in attrs and int(attrs.get("patch_level", 0)) == 0:
        geometry.update(patch_size_level0=float(attrs["patch_size"]), patch_level=0)
        geometry["geometry_source"] = "source attributes"
        return geometry
    if "patch_size" in attrs and "downsample" in attrs:
        downsample = float(np.ravel(attrs["downsample"])[0])
        geometry["patch_size_level0"] = float(attrs["patch_size"]) * downsample
        geometry["geometry_source"] = "source attributes"
        return geometry
    step = coordinate_step(coords)
    if step is not None:
        geometry.update(patch_size_level0=step, patch_level=0, patch_size=round(step))
        geometry["geometry_source"] = "coords grid step (patch size not recorded)"
    return geometry


def coordinate_step(coords: np.ndarray) -> float | None:
    """The smallest positive spacing of the x or y coordinates, or None for < 2 distinct."""
    steps = []
    for axis in (0, 1):
        values = np.unique(np.asarray(coords, dtype=np.int64)[:, axis]) if len(coords) else []
        gaps = np.diff(values)
        if len(gaps):
            steps.append(int(gaps.min()))
    return float(min(steps)) if steps else None


# --- the cohort ------------------------------------------------------------------------------


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
    """The attributes the pipeline reads from a features file (see extract.write_features)."""
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


# --- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m preprocessing.import_features",
        description="Import features made by CLAM, TRIDENT or in the HMIL .pt layout as thin "
        "features files (links, no copy).",
    )
    parser.add_argument("source", type=Path, help="folder of the features made elsewhere")
    parser.add_argument("--sheet", type=Path, required=True, help="slide sheet CSV")
    parser.add_argument("--encoder", required=True, help="encoder name the workflow uses")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for <slide_id>.h5")
    parser.add_argument("--patches-dir", type=Path, help="CLAM patches folder (patch geometry)")
    parser.add_argument("--strict", action="store_true", help="a missing or bad slide is fatal")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    sheet = read_slide_sheet(args.sheet, require_labels=False)
    table = import_cohort(
        args.source,
        list(sheet.index),
        args.encoder,
        args.out_dir,
        patches_dir=args.patches_dir,
        strict=args.strict,
        expected_dim=registered_dimension(args.encoder),
    )
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
        f"{args.out_dir}: {int(ok.sum())} of {len(table)} slides imported from {args.source} "
        f"({args.encoder}, {table.loc[ok, 'feature_dim'].max() if ok.any() else '?'}-d); "
        f"summary in {args.out_dir / SUMMARY_NAME}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
