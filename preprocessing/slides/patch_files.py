"""The patches h5 of one slide: the contract between patching and feature extraction.

`coords` (N×2 int64, level-0 top-left, row-major) with the attributes on both the dataset,
where CLAM reads them, and the file's root, where this pipeline reads them. A slide that
gave no patches still gets a file, flagged by its `status`, so that every later step can
say why the slide is missing instead of failing on an absent file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from plumbing.atomic import buffered
from plumbing.errors import PipelineError

#: Status of a patches or features file: usable, no patches, or a slide that failed.
STATUS_OK, STATUS_EMPTY, STATUS_FAILED = "ok", "empty", "failed"


def write_patches_h5(path: Path, coords: np.ndarray, fractions: np.ndarray, attrs: dict) -> None:
    with buffered(path) as buffer, h5py.File(buffer, "w") as h5:
        dataset = h5.create_dataset("coords", data=coords.astype(np.int64).reshape(-1, 2))
        h5.create_dataset("tissue_fraction", data=fractions.astype(np.float32))
        # CLAM reads the attributes from `coords`; our tools read the file's root.
        for target in (dataset.attrs, h5.attrs):
            for key, value in attrs.items():
                target[key] = value


@dataclass(frozen=True)
class Patches:
    """The patches h5 of one slide: coords (N×2 int64, level-0 top-left) and root attributes."""

    path: Path
    coords: np.ndarray
    attrs: dict

    @property
    def status(self) -> str:
        status = str(self.attrs.get("status", STATUS_OK))
        return STATUS_EMPTY if status == STATUS_OK and len(self.coords) == 0 else status

    @property
    def slide_id(self) -> str:
        return str(self.attrs.get("slide_id", self.path.stem))

    def patch_size_level0(self) -> float:
        for key in ("patch_size_level0_exact", "patch_size_level0"):
            if key in self.attrs:
                return float(self.attrs[key])
        raise PipelineError(f"{self.path}: patches file has no patch_size_level0 attribute")

    def slide_mpp(self) -> float:
        if "slide_mpp" not in self.attrs:
            raise PipelineError(f"{self.path}: patches file has no slide_mpp attribute")
        return float(self.attrs["slide_mpp"])


def read_patches(path: str | Path) -> Patches:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: patches file not found")
    try:
        with h5py.File(path, "r") as h5:
            if "coords" not in h5:
                raise PipelineError(f"{path}: patches file has no `coords` dataset")
            coords = np.asarray(h5["coords"][:], dtype=np.int64).reshape(-1, 2)
            attrs = {key: plain(value) for key, value in h5.attrs.items()}
    except OSError as err:
        raise PipelineError(f"{path}: not a readable patches h5 file ({err})") from None
    return Patches(path, coords, attrs)


def plain(value):
    """An h5py attribute as Python reads it back: h5py may return strings as bytes."""
    return value.decode() if isinstance(value, bytes) else value
