"""Cohort summary of feature extraction (the core of `python -m preprocessing.feature_summary`).

Lists the slides whose unreadable patches (corrupt tiles) were left out by
`preprocessing.extract --on-bad-patch skip`: a degraded slide is kept with its readable
patches, one with more unreadable than `--max-unreadable-fraction` is recorded as failed and
left out of training. Without this table such a slide is visible only in its job's log.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import pandas as pd

from plumbing.errors import PipelineError

COLUMNS = [
    "slide_id", "encoder", "status", "n_patches", "n_unreadable", "unreadable_fraction",
    "status_reason", "features_path",
]  # fmt: skip


#: The attributes a row is made of (others, e.g. level dimensions, may be arrays).
_ATTRIBUTES = ("slide_id", "encoder", "status", "status_reason", "n_patches", "n_skipped")


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if hasattr(value, "item") else value


def read_unreadable_patches(paths: list[Path]) -> pd.DataFrame:
    """One row per features file that left patches out: counts, fraction and verdict.

    `n_patches` counts every patch of the slide's grid, read or not.
    """
    rows = []
    for path in paths:
        try:
            with h5py.File(path, "r") as h5:
                attrs = {key: _plain(h5.attrs[key]) for key in _ATTRIBUTES if key in h5.attrs}
        except OSError as err:
            raise PipelineError(f"{path}: not a readable features file ({err})") from None
        unreadable = int(attrs.get("n_skipped", 0))
        if not unreadable:
            continue
        total = unreadable + int(attrs.get("n_patches", 0))
        rows.append(
            {
                "slide_id": str(attrs.get("slide_id", path.stem)),
                "encoder": str(attrs.get("encoder", path.parent.name)),
                "status": str(attrs.get("status", "ok")),
                "n_patches": total,
                "n_unreadable": unreadable,
                "unreadable_fraction": round(unreadable / total, 4),
                "status_reason": str(attrs.get("status_reason", "")),
                "features_path": str(path),
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)
