"""Cohort summary of patching (the core of `python -m preprocessing.summary`).

Reads the attributes of every patches h5 and writes one table of per-slide statistics
and one of the slides that failed or gave no patches, so a cohort run says plainly
which slides were left out and why.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import pandas as pd

from plumbing.errors import PipelineError

COLUMNS = [
    "slide_id", "status", "status_reason", "n_patches", "tissue_area_mm2", "slide_mpp",
    "mpp_source", "level0_width", "level0_height", "slide_path", "code_version",
]  # fmt: skip


def read_patch_stats(paths: list[Path]) -> pd.DataFrame:
    rows = []
    for path in paths:
        try:
            with h5py.File(path, "r") as h5:
                attrs = {key: h5.attrs[key] for key in COLUMNS if key in h5.attrs}
        except OSError as err:
            raise PipelineError(f"{path}: not a readable patches file ({err})") from None
        rows.append(
            {
                key: (value.item() if hasattr(value, "item") else value)
                for key, value in attrs.items()
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)
