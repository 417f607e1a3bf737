"""What made a cohort's features: encoder, weights, patch grid; recorded with every model.

A model is only valid on features made the same way as its training features. Training
writes this record into ``model.pt`` and ``metrics.json``; deployment reads it back and
compares it with the attributes of every features file it is given, so a model trained
on UNI features at 0.5 µm/px is never silently applied to ResNet features at 1 µm/px.
The values come from the features files' own attributes (written by
``preprocessing.extract``), never from a configuration typed again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

#: Attributes of a features file that decide what its features mean.
RECORD_KEYS = ("encoder", "weights", "feature_dim", "patch_size", "target_mpp")
#: How a mismatch of each key reads in an error message.
KEY_TITLES = {
    "encoder": "encoder",
    "weights": "encoder weights",
    "feature_dim": "feature dimension",
    "patch_size": "patch size (px)",
    "target_mpp": "patch mpp (µm/px)",
}


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a JSON-able Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_feature_record(path: str | Path) -> dict[str, Any]:
    """The record attributes of one features file (absent keys left out; ``.pt`` files and
    unreadable files give only what is known, i.e. nothing)."""
    path = Path(path)
    if path.suffix != ".h5":
        return {}
    try:
        with h5py.File(path, "r") as file:
            attrs = file.attrs
            record = {key: _plain(attrs[key]) for key in RECORD_KEYS if key in attrs}
            if "feature_dim" not in record and "features" in file:
                record["feature_dim"] = int(file["features"].shape[-1])
    except OSError:
        return {}
    return record


def cohort_feature_record(paths: Iterable[str | Path]) -> dict[str, Any]:
    """One record for a cohort: each key's value, or the sorted list of values when the
    files disagree (e.g. slides patched at two patch sizes, which deployment then allows)."""
    values: dict[str, set] = {}
    for path in paths:
        for key, value in read_feature_record(path).items():
            values.setdefault(key, set()).add(value)
    return {
        key: next(iter(found)) if len(found) == 1 else sorted(found, key=str)
        for key, found in values.items()
    }


def record_mismatch(trained: Mapping[str, Any], given: Mapping[str, Any]) -> str | None:
    """Why features with attributes ``given`` do not fit a model trained on ``trained``, or
    None. Keys unknown on either side are not compared (features made elsewhere may lack
    them); floats compare to 1e-6 relative."""
    for key in RECORD_KEYS:
        if key not in trained or key not in given:
            continue
        allowed = trained[key] if isinstance(trained[key], list) else [trained[key]]
        if not any(_same(value, given[key]) for value in allowed):
            shown = " or ".join(map(str, allowed))
            return f"{KEY_TITLES[key]} {given[key]} but the model was trained with {shown}"
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return bool(np.isclose(float(a), float(b), rtol=1e-6, atol=0.0))
    return str(a) == str(b)
