"""QuPath GeoJSON core: patch squares as closed rings in level-0 pixels, one measurement
per attention row, and clear errors for values JSON or QuPath cannot hold."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hmil.evaluation.qupath import (
    OBJECT_TYPE,
    attention_measurements,
    patch_squares,
    row_names,
    tiles_feature_collection,
)


def test_patch_squares_are_closed_rings_of_the_patch_side():
    rings = patch_squares(np.array([[0, 0], [256, 512]]), 128.5)
    np.testing.assert_array_equal(
        rings[1], [[256, 512], [384.5, 512], [384.5, 640.5], [256, 640.5], [256, 512]]
    )
    assert rings.shape == (2, 5, 2)
    np.testing.assert_array_equal(rings[:, 0], rings[:, -1])
    with pytest.raises(ValueError, match="positive number of pixels"):
        patch_squares(np.zeros((1, 2)), 0)


def test_feature_collection_has_one_tile_per_patch_with_its_measurements():
    coords = np.array([[10, 20], [138, 20], [10, 148]])
    fine = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    coarse = np.array([[1 / 3, 1 / 3, 1 / 3]])
    measurements = attention_measurements(
        [("coarse", coarse, ["A", "B"]), ("fine", fine, ["a1", "b1"])],
        {"fine": np.array([0.0, 0.5, 1.0])},
    )
    # One coarse row for two coarse classes is not class-wise: named as a single row.
    assert list(measurements) == [
        "attention coarse",
        "attention fine: a1",
        "attention fine: b1",
        "attention rank: fine",
    ]
    collection = tiles_feature_collection(coords, 128, measurements)
    collection = json.loads(json.dumps(collection))  # what a reader gets
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == 3
    third = collection["features"][2]
    assert third["type"] == "Feature"
    assert third["geometry"] == {
        "type": "Polygon",
        "coordinates": [[[10, 148], [138, 148], [138, 276], [10, 276], [10, 148]]],
    }
    assert third["properties"]["objectType"] == OBJECT_TYPE == "tile"
    assert third["properties"]["measurements"] == {
        "attention coarse": pytest.approx(1 / 3),
        "attention fine: a1": 0.5,
        "attention fine: b1": 0.1,
        "attention rank: fine": 1.0,
    }


def test_row_names_per_class_single_or_by_index():
    assert row_names("fine", 2, ["x", "y"]) == ["attention fine: x", "attention fine: y"]
    assert row_names("fine", 1, ["x", "y"]) == ["attention fine"]
    assert row_names("fine", 3, ["x", "y"]) == [f"attention fine: row {i}" for i in range(3)]


def test_non_finite_or_misaligned_measurements_are_refused():
    coords = np.zeros((2, 2))
    with pytest.raises(ValueError, match=r"'a' has 1 non-finite value"):
        tiles_feature_collection(coords, 8, {"a": np.array([0.5, np.nan])})
    with pytest.raises(ValueError, match=r"'a' has 3 values for 2 patches"):
        tiles_feature_collection(coords, 8, {"a": np.ones(3)})
