"""Attention heatmaps: the rasteriser puts values where the patches are; the CLI writes the
PNGs, cards for slides it cannot draw, and one error line for a missing attention file."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hmil.evaluation.attention_maps import (
    attention_to_heatmap,
    choose_row,
    overlay,
    rank_normalise,
)
from hmil.evaluation.heatmap_figures import (
    MAX_TILE,
    MONTAGE_TITLE_BAND,
    TILE_PAD,
    heatmap_figure_size,
    montage_figure_size,
    read_thumbnail,
)
from hmil.evaluation.heatmap_inputs import read_patch_geometry, read_slide_attention
from hmil.heatmaps import main
from plumbing.cli import run_cli
from preprocessing import patch
from preprocessing.slides.access import open_slide
from preprocessing.slides.synthetic import Ellipse, SlideSpec, write_slide

FINE, COARSE = ["a1", "a2", "b1", "b2"], ["A", "B"]
HOT_FINE_ROW = 2  # b1


def write_attention_file(
    path: Path, slides: dict[str, np.ndarray], hot: int, with_coords: bool = True
) -> None:
    """attention.h5 in the layout of hmil.training.outputs.write_attention: class-wise fine and
    coarse rows (each summing to 1); patch ``hot`` dominates fine row b1 only. Without
    coords, as training writes it for features that have none (bare .pt)."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as file:
        file.attrs["fine_classes"] = FINE
        file.attrs["coarse_classes"] = COARSE
        file.attrs["model"] = "hmil"
        file.attrs["fine_attention_rows"] = "class"
        for slide_id, coords in slides.items():
            n = len(coords)
            fine = rng.random((len(FINE), n))
            fine[HOT_FINE_ROW, hot] = 10.0 * n
            coarse = rng.random((len(COARSE), n))
            group = file.create_group(slide_id)
            if with_coords:
                group.create_dataset("coords", data=coords)
            group.create_dataset("fine_attention", data=fine / fine.sum(1, keepdims=True))
            group.create_dataset("coarse_attention", data=coarse / coarse.sum(1, keepdims=True))


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    """A 4000 x 3000 px synthetic slide at 0.5 µm/px, its patches (64 px at 1 µm/px, so
    128 px at level 0), an attention file with one hot patch, and the slide sheet."""
    folder = tmp_path_factory.mktemp("heatmaps")
    spec = SlideSpec(width=4000, height=3000, mpp=0.5, regions=(Ellipse(1000, 750, 700, 500),))
    slide = write_slide(folder / "slide_a.tiff", spec)
    patches = folder / "patches"
    patch.main(
        [
            str(slide),
            "--out",
            str(patches / "slide_a.h5"),
            "--target-mpp",
            "1",
            "--patch-size",
            "64",
        ]
    )
    with h5py.File(patches / "slide_a.h5", "r") as file:
        coords = file["coords"][()]
    hot = len(coords) // 3
    write_attention_file(folder / "attention.h5", {"slide_a": coords}, hot)
    sheet = folder / "slides.csv"
    pd.DataFrame(
        [{"slide_id": "slide_a", "path": str(slide), "patient_id": "p1", "label": "b1"}]
    ).to_csv(sheet, index=False)
    return {"folder": folder, "slide": slide, "patches": patches, "coords": coords, "hot": hot}


def test_hottest_patch_lands_at_its_coordinates_in_the_heatmap(run_inputs):
    with h5py.File(run_inputs["folder"] / "attention.h5", "r") as file:
        attention = read_slide_attention(file, "slide_a")
    geometry = read_patch_geometry(run_inputs["patches"] / "slide_a.h5")
    assert geometry.patch_size_level0 == pytest.approx(128)
    slide = open_slide(run_inputs["slide"])
    try:
        thumbnail = read_thumbnail(slide, str(run_inputs["slide"]), 500)
        level0 = slide.dimensions
    finally:
        slide.close()
    assert max(thumbnail.shape[:2]) == 500
    height, width = thumbnail.shape[:2]
    row, how = choose_row(attention.fine, FINE, predicted=None)
    assert row == HOT_FINE_ROW and "'b1'" in how

    heatmap = attention_to_heatmap(
        attention.coords,
        rank_normalise(attention.fine[row]),
        geometry.patch_size_level0,
        level0,
        (width, height),
    )
    assert heatmap.shape == (height, width)
    x, y = run_inputs["coords"][run_inputs["hot"]]
    scale = width / level0[0]
    square = np.s_[
        int(np.ceil(y * scale - 0.5)) : int(np.ceil((y + 128) * scale - 0.5)),
        int(np.ceil(x * scale - 0.5)) : int(np.ceil((x + 128) * scale - 0.5)),
    ]
    assert heatmap[square].size >= 9  # 128 px at 1/8 scale: a 4 x 4 square (edges rounded)
    np.testing.assert_array_equal(heatmap[square], 1.0)
    hottest = np.argwhere(heatmap == np.nanmax(heatmap))
    assert (hottest[:, 0] >= square[0].start).all() and (hottest[:, 0] < square[0].stop).all()
    assert (hottest[:, 1] >= square[1].start).all() and (hottest[:, 1] < square[1].stop).all()
    # Outside the tissue grid nothing is painted (corner of the slide).
    assert np.isnan(heatmap[0, 0]) and np.isnan(heatmap[-1, -1])
    covered = ~np.isnan(heatmap)
    expected_area = len(attention.coords) * (128 * scale) ** 2
    assert covered.sum() == pytest.approx(expected_area, rel=0.05)


def test_heatmap_paints_squares_averages_overlaps_and_leaves_the_rest_empty():
    coords = np.array([[0, 0], [40, 0], [20, 60]])
    values = np.array([1.0, 3.0, 5.0])
    # level 0 100 x 100 → thumbnail 10 x 10: a 40 px patch is 4 x 4 thumbnail pixels.
    heatmap = attention_to_heatmap(coords, values, 40, (100, 100), (10, 10))
    expected = np.full((10, 10), np.nan, np.float32)
    expected[0:4, 0:4] = 1.0
    expected[0:4, 4:8] = 3.0
    expected[6:10, 2:6] = 5.0
    np.testing.assert_array_equal(heatmap, expected)

    overlapping = attention_to_heatmap(
        np.array([[0, 0], [20, 0]]), np.array([2.0, 4.0]), 40, (100, 100), (10, 10)
    )
    np.testing.assert_allclose(overlapping[0, :6], [2, 2, 3, 3, 4, 4])
    # A patch smaller than a thumbnail pixel still shows up as one pixel.
    tiny = attention_to_heatmap(np.array([[55, 55]]), np.array([7.0]), 2, (100, 100), (10, 10))
    assert np.nansum(tiny) == 7.0 and (~np.isnan(tiny)).sum() == 1


def test_rank_normalise_and_overlay_keep_uncovered_pixels():
    np.testing.assert_allclose(rank_normalise([0.1, 0.7, 0.1, 0.2]), [1 / 6, 1, 1 / 6, 2 / 3])
    np.testing.assert_array_equal(rank_normalise([0.3]), [1.0])
    thumbnail = np.full((2, 2, 3), 200, np.uint8)
    heatmap = np.array([[np.nan, 1.0], [0.0, np.nan]], np.float32)
    blended = overlay(thumbnail, heatmap)
    np.testing.assert_array_equal(blended[0, 0], [200, 200, 200])
    assert not np.array_equal(blended[0, 1], blended[1, 0])  # hot and cold differ


def test_choose_row_prefers_the_predicted_class():
    attention = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    assert choose_row(attention, ["x", "y", "z"], "y")[0] == 1
    assert choose_row(attention, ["x", "y", "z"], None)[0] == 0
    assert choose_row(attention, ["x", "y", "z"], "unknown")[0] == 0
    assert choose_row(attention[:1], ["x", "y", "z"], "y") == (0, "single row (not class-wise)")


def test_cli_writes_heatmap_and_montage_and_cards_for_bad_slides(
    run_inputs, tmp_path, fixture_slides
):
    folder = run_inputs["folder"]
    coords = run_inputs["coords"]
    # A second slide whose tile data cannot be read, and a third not in the sheet.
    unreadable = tmp_path / "unreadable.svs"
    shutil.copy(fixture_slides / "unreadable.svs", unreadable)
    patches = tmp_path / "patches"
    shutil.copytree(run_inputs["patches"], patches)
    shutil.copy(patches / "slide_a.h5", patches / "broken.h5")
    with h5py.File(patches / "broken.h5", "a") as file:
        file.attrs["level0_width"], file.attrs["level0_height"] = open_slide(unreadable).dimensions
    attention = tmp_path / "attention.h5"
    write_attention_file(
        attention, {"slide_a": coords, "broken": coords, "ghost": coords}, run_inputs["hot"]
    )
    sheet = tmp_path / "slides.csv"
    table = pd.read_csv(folder / "slides.csv")
    table.loc[1] = ["broken", str(unreadable), "p2", "a1"]
    table.to_csv(sheet, index=False)
    predictions = tmp_path / "predictions.csv"
    pd.DataFrame(
        [
            {
                "slide_id": "slide_a",
                "split": "test",
                "fine_label": "b1",
                "coarse_label": "B",
                "pred_fine": "a2",
                "pred_coarse": "B",
            }
        ]
    ).to_csv(predictions, index=False)
    out = tmp_path / "out"

    code = main(
        [
            str(attention),
            "--slides",
            str(sheet),
            "--patches",
            str(patches),
            "--out",
            str(out),
            "--thumbnail-size",
            "400",
            "--top-k",
            "5",
            "--predictions",
            str(predictions),
        ]
    )

    assert code == 0
    thumb = (400, 300)  # 4000 x 3000 slide, longest side 400
    heatmap_png = Image.open(out / "slide_a.png")
    assert heatmap_png.size == heatmap_figure_size(thumb, 2)
    assert heatmap_png.size[0] >= 2 * thumb[0] and heatmap_png.size[1] > thumb[1]
    assert "hmil-pipeline" in heatmap_png.info["Software"]
    assert '"normalisation": "rank within slide"' in heatmap_png.info["Description"]
    top_png = Image.open(out / "slide_a_top.jpg")
    assert top_png.format == "JPEG"
    assert "rank within slide" in top_png.info["comment"].decode()
    assert top_png.size == montage_figure_size(5, min(MAX_TILE, 64))
    # the montage shows tissue (pink), not the background, in the first tile
    pixels = np.asarray(top_png.convert("RGB")).astype(int)
    left = (top_png.size[0] - 3 * (64 + 2 * TILE_PAD)) // 2 + TILE_PAD  # 3 columns for 5 tiles
    first_tile = pixels[MONTAGE_TITLE_BAND : MONTAGE_TITLE_BAND + 64, left : left + 64]
    assert (first_tile[..., 1] < 200).mean() > 0.5
    for bad in ("broken", "ghost"):
        for suffix in (".png", "_top.jpg"):
            card = Image.open(out / f"{bad}{suffix}")
            assert card.size == (800, 160)
    assert sorted(p.name for p in out.iterdir()) == [
        "broken.png",
        "broken_top.jpg",
        "ghost.png",
        "ghost_top.jpg",
        "slide_a.png",
        "slide_a_top.jpg",
    ]


def test_slides_only_draws_just_those(run_inputs, tmp_path):
    folder = run_inputs["folder"]
    out = tmp_path / "out"
    main(
        [
            str(folder / "attention.h5"),
            "--slides",
            str(folder / "slides.csv"),
            "--patches",
            str(run_inputs["patches"]),
            "--out",
            str(out),
            "--thumbnail-size",
            "200",
            "--slides-only",
            "nope",
        ]
    )
    assert not out.exists() or not any(out.iterdir())


def test_missing_attention_file_is_one_error_line(run_inputs, tmp_path, capsys):
    folder = run_inputs["folder"]
    missing = tmp_path / "attention.h5"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            main,
            [
                str(missing),
                "--slides",
                str(folder / "slides.csv"),
                "--patches",
                str(run_inputs["patches"]),
                "--out",
                str(tmp_path / "out"),
            ],
        )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {missing}: attention file not found"
    assert not (tmp_path / "out").exists()


def heatmaps_cli(attention: Path, run_inputs, out: Path, *extra: str) -> int:
    folder = run_inputs["folder"]
    return main(
        [
            str(attention),
            "--slides",
            str(folder / "slides.csv"),
            "--patches",
            str(run_inputs["patches"]),
            "--out",
            str(out),
            "--thumbnail-size",
            "200",
            "--top-k",
            "2",
            *extra,
        ]
    )


def test_geojson_follows_qupath_conventions_with_one_measurement_per_attention_row(
    run_inputs, tmp_path, capsys
):
    out = tmp_path / "out"
    assert heatmaps_cli(run_inputs["folder"] / "attention.h5", run_inputs, out, "--geojson") == 0
    assert "QuPath GeoJSON of 1" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "slide_a.geojson",
        "slide_a.png",
        "slide_a_top.jpg",
    ]
    collection = json.loads((out / "slide_a.geojson").read_text())
    with h5py.File(run_inputs["patches"] / "slide_a.h5", "r") as file:
        side = float(file.attrs.get("patch_size_level0_exact", file.attrs["patch_size_level0"]))
        width, height = int(file.attrs["level0_width"]), int(file.attrs["level0_height"])
    with h5py.File(run_inputs["folder"] / "attention.h5", "r") as file:
        fine = file["slide_a/fine_attention"][()]
        coarse = file["slide_a/coarse_attention"][()]
    coords, hot = run_inputs["coords"], run_inputs["hot"]
    assert side == pytest.approx(128)

    # QuPath (PathObjectTypeAdapters): a FeatureCollection of Features, Polygon geometry in
    # full-resolution pixels, objectType "tile", measurements a flat name -> number map.
    assert set(collection) == {"type", "features"}
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == len(coords)
    names = [f"attention coarse: {c}" for c in COARSE] + [f"attention fine: {c}" for c in FINE]
    names += ["attention rank: coarse", "attention rank: fine"]
    rings = []
    for index, feature in enumerate(features):
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "Polygon"
        (ring,) = feature["geometry"]["coordinates"]  # one exterior ring, no holes
        assert len(ring) == 5 and ring[0] == ring[-1]
        rings.append(ring)
        properties = feature["properties"]
        assert properties["objectType"] == "tile"
        measurements = properties["measurements"]
        assert list(measurements) == names
        assert all(type(v) is float and np.isfinite(v) for v in measurements.values())
        for row, name in enumerate(names[:2]):
            assert measurements[name] == coarse[row, index]
        for row, name in enumerate(names[2:6]):
            assert measurements[name] == fine[row, index]
    rings = np.array(rings)
    x, y = coords[:, 0:1].astype(float), coords[:, 1:2].astype(float)
    np.testing.assert_allclose(rings[:, :, 0], np.hstack([x, x + side, x + side, x, x]))
    np.testing.assert_allclose(rings[:, :, 1], np.hstack([y, y, y + side, y + side, y]))
    assert rings[..., 0].min() >= 0 and rings[..., 0].max() <= width
    assert rings[..., 1].min() >= 0 and rings[..., 1].max() <= height
    # The shown fine row is b1 (largest attention, no predictions given): its hot patch ranks 1.
    ranks = np.array([f["properties"]["measurements"]["attention rank: fine"] for f in features])
    assert ranks[hot] == 1.0 and (ranks < 1.0).sum() == len(ranks) - 1
    assert ranks.min() == 0.0


def test_no_geojson_without_coordinates_in_the_attention_file(run_inputs, tmp_path, caplog):
    attention = tmp_path / "attention.h5"
    write_attention_file(
        attention, {"slide_a": run_inputs["coords"]}, run_inputs["hot"], with_coords=False
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "slide_a.geojson").write_text("{}")  # from an earlier run: must not survive
    with caplog.at_level(logging.INFO, logger="hmil.heatmaps"):
        assert heatmaps_cli(attention, run_inputs, out, "--geojson") == 0
    # The PNG still comes (from the patches file's grid); the QuPath objects do not.
    assert sorted(p.name for p in out.iterdir()) == ["slide_a.png", "slide_a_top.jpg"]
    assert "slide_a: attention.h5 has no patch coordinates" in caplog.text
    assert "no GeoJSON for 1 slide(s)" in caplog.text
