"""Features of other tools, written by the tests from the project's own features files.

Each writer copies `<own>/<slide_id>.h5` (``features`` N×D, ``coords`` N×2) into the
layout another tool leaves on disk, as its writer does it:

- CLAM: ``extract_features_fp.py`` writes ``h5_files/<id>.h5`` with ``features`` (float32)
  and ``coords`` (int32) and no attributes (``save_hdf5(..., attr_dict=None)``), and
  ``pt_files/<id>.pt`` (the features as a tensor); ``create_patches_fp.py`` writes
  ``patches/<id>.h5`` whose ``coords`` carry ``patch_size``, ``patch_level``,
  ``downsample``, ``level_dim`` (``WholeSlideImage.process_contour``);
- TRIDENT: ``features_<encoder>/<id>.h5`` with ``features`` (attributes ``name``,
  ``savetodir``, ``encoder``) and ``coords`` (attributes from ``coords_to_h5``:
  ``patch_size``, ``patch_size_level0``, ``level0_magnification``,
  ``target_magnification``, ``overlap``, ``name``, ``savetodir``, ``level0_width``,
  ``level0_height``);
- the HMIL reference layout: ``<id>.pt``, an N×D tensor.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

PATCH_SIZE = 256  #: the synthetic cohort's coords are 256 level-0 px apart


def read_own(own: Path, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(own / f"{slide_id}.h5", "r") as h5:
        return h5["features"][()], h5["coords"][()]


def write_clam(own: Path, dest: Path, slide_ids: list[str], pt_only: tuple[str, ...] = ()) -> Path:
    """CLAM's feat_dir (h5_files + pt_files) and its patches folder; the slides in `pt_only`
    get no h5 file, only the tensor."""
    for folder in ("h5_files", "pt_files", "patches"):
        (dest / folder).mkdir(parents=True, exist_ok=True)
    for slide_id in slide_ids:
        features, coords = read_own(own, slide_id)
        torch.save(torch.from_numpy(features), dest / "pt_files" / f"{slide_id}.pt")
        if slide_id in pt_only:
            continue
        with h5py.File(dest / "h5_files" / f"{slide_id}.h5", "w") as h5:
            h5.create_dataset("features", data=features.astype(np.float32), chunks=True)
            h5.create_dataset("coords", data=coords.astype(np.int32), chunks=True)
        with h5py.File(dest / "patches" / f"{slide_id}.h5", "w") as h5:
            dataset = h5.create_dataset("coords", data=coords.astype(np.int64))
            dataset.attrs.update(
                patch_size=PATCH_SIZE,
                patch_level=0,
                downsample=(1.0, 1.0),
                downsampled_level_dim=(4096, 4096),
                level_dim=(4096, 4096),
                name=slide_id,
                save_path=str(dest / "patches"),
            )
    return dest


def write_trident(own: Path, dest: Path, slide_ids: list[str], encoder: str) -> Path:
    """TRIDENT's `<job_dir>/20x_256px_0px_overlap` folder with `features_<encoder>/`."""
    folder = dest / f"features_{encoder}"
    folder.mkdir(parents=True, exist_ok=True)
    for slide_id in slide_ids:
        features, coords = read_own(own, slide_id)
        with h5py.File(folder / f"{slide_id}.h5", "w") as h5:
            dataset = h5.create_dataset("features", data=features, chunks=(1, features.shape[1]))
            dataset.attrs.update(name=slide_id, savetodir=str(folder), encoder=encoder)
            dataset = h5.create_dataset("coords", data=coords.astype(np.int64), chunks=(1, 2))
            dataset.attrs.update(
                patch_size=PATCH_SIZE // 2,
                patch_size_level0=PATCH_SIZE,
                level0_magnification=40,
                target_magnification=20,
                overlap=0,
                name=slide_id,
                savetodir=str(dest / "patches"),
                level0_width=8192,
                level0_height=6144,
            )
    return dest


def write_pt(own: Path, dest: Path, slide_ids: list[str]) -> Path:
    """The HMIL reference layout: `<dest>/<slide_id>.pt`."""
    dest.mkdir(parents=True, exist_ok=True)
    for slide_id in slide_ids:
        features, _ = read_own(own, slide_id)
        torch.save(torch.from_numpy(features), dest / f"{slide_id}.pt")
    return dest


def write_sheet(path: Path, table, folder: str = "slides") -> Path:
    """A slide sheet for `table` (slide_id, patient_id, label) with slide paths that need not
    exist: features made elsewhere are trained on without their slides."""
    sheet = table[["slide_id", "patient_id", "label"]].copy()
    sheet.insert(1, "path", [f"{folder}/{slide_id}.svs" for slide_id in sheet["slide_id"]])
    sheet.to_csv(path, index=False)
    return path
