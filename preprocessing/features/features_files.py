"""The features files of one slide: the h5 that training reads and its `.pt` twin.

The h5 holds `features` (N×D, float32 by default: exact and what MIL training reads;
float16 halves the disk size) and `coords` (N×2 int64, the patches' order), each chunked
with a checksum, the rows left out as unreadable, the patching attributes and the
provenance. Both files appear together or not at all. `validate_features` is what lets a
re-run keep a valid output and rebuild any other, saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from plumbing.atomic import atomic_outputs, buffered
from plumbing.errors import PipelineError
from preprocessing.features.encoders import get_encoder_spec
from preprocessing.slides.patch_files import STATUS_OK, Patches, plain, read_patches

#: Attributes the features file sets itself; the patches file's values are kept as `patches_<key>`.
_OWN_ATTRIBUTES = ("status", "status_reason", "n_patches", "code_version", "params")


def default_pt_path(out: Path) -> Path:
    return out.with_suffix(".pt")


def write_features(
    out: Path,
    out_pt: Path | None,
    features: np.ndarray,
    coords: np.ndarray,
    skipped: np.ndarray,
    patches: Patches,
    attrs: dict,
    dtype: str,
) -> None:
    """Features h5 (+ `.pt` float32 tensor) written together: both appear or neither does."""
    merged = {}
    for key, value in patches.attrs.items():
        merged[f"patches_{key}" if key in _OWN_ATTRIBUTES else key] = value
    merged.update(attrs)
    merged["n_patches"] = len(features)
    merged["n_skipped"] = len(skipped)
    largest = float(np.abs(features).max(initial=0.0))
    if dtype == "float16" and largest > np.finfo(np.float16).max:
        raise PipelineError(
            f"{out}: features reach {largest:.3g}, beyond float16; use --dtype float32"
        )
    with atomic_outputs(out, out_pt) as (out_tmp, pt_tmp):
        with buffered(out_tmp) as buffer, h5py.File(buffer, "w") as h5:
            _checksummed_dataset(h5, "features", features.astype(dtype, copy=False))
            _checksummed_dataset(h5, "coords", coords.astype(np.int64).reshape(-1, 2))
            h5.create_dataset("skipped_indices", data=skipped.astype(np.int64))
            h5.create_dataset("skipped_coords", data=patches.coords[skipped].reshape(-1, 2))
            for key, value in merged.items():
                h5.attrs[key] = value
        if pt_tmp is not None:
            with buffered(pt_tmp) as buffer:
                torch.save(torch.from_numpy(np.ascontiguousarray(features, np.float32)), buffer)


def _checksummed_dataset(h5: h5py.File, name: str, data: np.ndarray) -> None:
    """A dataset in chunks of about 1 MiB with a Fletcher-32 checksum each, so that bytes
    damaged on disk give a read error instead of silently wrong features."""
    if data.size == 0:
        h5.create_dataset(name, data=data)
        return
    row_bytes = data.itemsize * int(np.prod(data.shape[1:]))
    rows = int(np.clip(2**20 // max(row_bytes, 1), 1, len(data)))
    h5.create_dataset(name, data=data, chunks=(rows, *data.shape[1:]), fletcher32=True)


def validate_features(
    path: str | Path,
    patches_path: str | Path | None = None,
    encoder: str | None = None,
    weights: str | None = None,
    dtype: str | None = None,
    pt_path: str | Path | None = None,
) -> str | None:
    """Why the features file at `path` is not a complete, consistent output, or None if it is.

    Checks: readable h5, `features` N×D with D == `feature_dim`, `coords` N×2, every value
    finite; optionally the patches file (same coords in the same order, skipped rows
    accounted for), the encoder name, weights record, dtype and the `.pt` twin.
    """
    path = Path(path)
    if not path.is_file():
        return "file not found"
    found = _read_features_file(path)
    if isinstance(found, str):
        return found
    problem = _check_contents(found, encoder, weights, dtype)
    if problem is None and patches_path is not None:
        problem = _check_against_patches(found, patches_path)
    if problem is None and pt_path is not None:
        problem = _validate_pt(Path(pt_path), found.shape)
    return problem


@dataclass(frozen=True)
class _FeaturesFile:
    """What validation needs of a features h5, read once."""

    shape: tuple[int, ...]
    coords: np.ndarray
    attrs: dict
    dtype: str
    skipped: np.ndarray


def _read_features_file(path: Path) -> _FeaturesFile | str:
    """The file's datasets and attributes, or why they cannot be read or are not N×D finite."""
    try:
        with h5py.File(path, "r") as h5:
            for name in ("features", "coords"):
                if name not in h5:
                    return f"no `{name}` dataset"
            shape, coords = h5["features"].shape, h5["coords"][:]
            attrs = {key: plain(value) for key, value in h5.attrs.items()}
            file_dtype = str(h5["features"].dtype)
            skipped = h5["skipped_indices"][:] if "skipped_indices" in h5 else np.zeros(0, int)
            if len(shape) != 2:
                return f"features has shape {shape}, expected N×D"
            for start in range(0, shape[0], 65536):  # bounded memory on huge slides
                if not np.isfinite(h5["features"][start : start + 65536]).all():
                    return "features hold NaN or Inf values"
    except OSError as err:  # truncated, or a chunk fails its checksum
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"not a readable HDF5 file, damaged or incomplete ({first_line})"
    return _FeaturesFile(shape, coords, attrs, file_dtype, skipped)


def _check_contents(
    found: _FeaturesFile, encoder: str | None, weights: str | None, dtype: str | None
) -> str | None:
    """The attributes against the datasets, and against the encoder, weights and dtype asked."""
    shape, attrs = found.shape, found.attrs
    for key in ("encoder", "weights", "feature_dim"):
        if key not in attrs:
            return f"no `{key}` attribute"
    if shape[1] != int(attrs["feature_dim"]):
        return f"features are {shape[1]}-d but feature_dim says {attrs['feature_dim']}"
    if found.coords.shape != (shape[0], 2):
        return f"coords {found.coords.shape} do not match features {shape}"
    if encoder is not None and attrs["encoder"] != encoder:
        return f"made by encoder {attrs['encoder']}, not {encoder}"
    if weights is not None and attrs["weights"] != weights:
        return f"made with weights {attrs['weights']}, not {weights}"
    if dtype is not None and found.dtype != dtype:
        return f"features are {found.dtype}, not {dtype}"
    if encoder is not None:
        try:
            spec = get_encoder_spec(encoder)
        except PipelineError as err:
            return str(err)
        if shape[1] != spec.feature_dim:
            return f"features are {shape[1]}-d, encoder {encoder} gives {spec.feature_dim}"
    return None


def _check_against_patches(found: _FeaturesFile, patches_path: str | Path) -> str | None:
    """The rows against the patches file: every patch encoded or skipped, in its order."""
    try:
        patches = read_patches(patches_path)
    except PipelineError as err:
        return str(err)
    coords, skipped = found.coords, found.skipped
    if patches.status != STATUS_OK:
        if found.shape[0]:
            return f"patches file is flagged {patches.status} but features hold rows"
        return None
    if len(coords) + len(skipped) != len(patches.coords):
        return (
            f"{len(coords)} feature rows + {len(skipped)} skipped != "
            f"{len(patches.coords)} patches in {patches.path}"
        )
    if not np.array_equal(np.delete(patches.coords, skipped, axis=0), coords):
        return f"coords differ from those of {patches.path}"
    return None


def _validate_pt(path: Path, shape: tuple[int, ...]) -> str | None:
    if not path.is_file():
        return f"{path.name} not found"
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle errors: all mean "rebuild"
        return f"{path.name} is not readable ({type(err).__name__})"
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(shape):
        return f"{path.name} does not hold a {shape[0]}×{shape[1]} tensor"
    return None
