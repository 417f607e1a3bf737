"""What a slide's features made elsewhere hold, checked before the workflow trusts them.

Every source is checked (N×D, finite values, coords N×2 when present) without ever
raising: a problem marks that slide failed, so one bad file costs one slide. The patch
geometry that heatmaps need is taken from whatever the source recorded, or, failing that,
from the grid step of its coordinates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from preprocessing.features.import_sources import SourceFile
from preprocessing.slides.patch_files import STATUS_EMPTY, STATUS_FAILED, STATUS_OK

log = logging.getLogger("hmil.import_features")

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
