"""Attention as QuPath objects: one GeoJSON tile per patch, the attention as measurements.

QuPath opens the file with *File › Import objects* (or drag and drop onto the slide) and
colours the tiles with *Measure › Show measurement maps*, one map per measurement. The
layout follows what QuPath itself reads and writes (``qupath.lib.io.PathObjectTypeAdapters``,
v0.4 and later):

- a ``FeatureCollection`` of ``Feature`` objects, each with a ``Polygon`` geometry in pixels
  of the full-resolution image, origin at its top-left corner (level-0 pixels here);
- ``properties.objectType``: ``"tile"`` makes a ``PathTileObject``, QuPath's own kind for
  grid squares (a detection, which is what measurement maps colour; ``"detection"`` would
  do too, ``"annotation"`` — the default when the key is missing — would not);
- ``properties.measurements``: a flat JSON object, measurement name → number (QuPath reads
  it as a ``Map<String, Double>``; its older list of ``{"name", "value"}`` is not used).

No ``classification`` is given: in QuPath a classified tile means "this tile is of that
class", which a slide-level MIL prediction does not say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

OBJECT_TYPE = "tile"
#: Corner offsets of a square, in units of its side: a closed ring (last = first), going
#: right along the top edge first, as a y-down image draws it.
_RING = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]], dtype=np.float64)
#: Coordinates are rounded to 1/1000 px: finer is noise, and it keeps the file small.
_DECIMALS = 3


def patch_squares(coords: np.ndarray, patch_size_level0: float) -> np.ndarray:
    """float64 [N, 5, 2]: the closed ring of each patch square, level-0 (x, y) pixels.

    coords: [N, 2] level-0 top-left corners (x, y), as in the patches and features files;
    patch_size_level0: the side of a patch in level-0 pixels (may be fractional).
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(patch_size_level0) or patch_size_level0 <= 0:
        raise ValueError(f"patch size must be a positive number of pixels, got {patch_size_level0}")
    rings = coords[:, None, :] + _RING[None] * float(patch_size_level0)
    return np.round(rings, _DECIMALS)


def row_names(branch: str, rows: int, classes: Sequence[str]) -> list[str]:
    """Measurement names of a branch's attention rows.

    Class-wise rows (one per class): ``"attention <branch>: <class>"``; a single row (flat
    models): ``"attention <branch>"``; rows that match no class list: ``"... row <i>"``.
    """
    if rows == len(classes) and rows > 1:
        return [f"attention {branch}: {name}" for name in classes]
    if rows == 1:
        return [f"attention {branch}"]
    return [f"attention {branch}: row {i}" for i in range(rows)]


def tiles_feature_collection(
    coords: np.ndarray, patch_size_level0: float, measurements: Mapping[str, np.ndarray]
) -> dict:
    """A GeoJSON FeatureCollection (a dict ready for ``json.dump``) of one tile per patch.

    measurements: name → [N] values, one per patch in the order of ``coords``; all finite
    (JSON has no NaN, and QuPath would read a missing value as no measurement). The
    arithmetic is vectorised; the only loop builds the JSON list, one dict per patch.
    """
    rings = patch_squares(coords, patch_size_level0)
    names = list(measurements)
    n = len(rings)
    table = np.zeros((n, len(names)), dtype=np.float64)
    for column, name in enumerate(names):  # a loop over measurements, not patches
        values = np.asarray(measurements[name], dtype=np.float64).reshape(-1)
        if len(values) != n:
            raise ValueError(f"measurement {name!r} has {len(values)} values for {n} patches")
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise ValueError(f"measurement {name!r} has {bad} non-finite value(s)")
        table[:, column] = values
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": OBJECT_TYPE,
                "measurements": dict(zip(names, row, strict=True)),
            },
        }
        for ring, row in zip(rings.tolist(), table.tolist(), strict=True)
    ]
    return {"type": "FeatureCollection", "features": features}


def attention_measurements(
    branches: Sequence[tuple[str, np.ndarray, Sequence[str]]],
    ranked: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """name → [N] values: every attention row of every branch, then the ranked rows.

    branches: (branch name, [R, N] attention rows, class names) per branch, e.g.
    ``("coarse", coarse, coarse_classes), ("fine", fine, fine_classes)``; ranked: branch
    name → [N] within-slide rank of the row the heatmap shows, as ``"attention rank:
    <branch>"`` — the raw softmax weights are heavy-tailed, so a map of them is mostly one
    colour, while ranks spread the colours as the PNG heatmap does.
    """
    measurements: dict[str, np.ndarray] = {}
    for branch, rows, classes in branches:
        rows = np.atleast_2d(rows)
        for name, values in zip(row_names(branch, len(rows), classes), rows, strict=True):
            measurements[name] = values
    for branch, values in ranked.items():
        measurements[f"attention rank: {branch}"] = values
    return measurements
