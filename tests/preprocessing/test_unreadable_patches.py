"""Slides with corrupt tiles: degraded (patches left out, counted) or failed above a fraction.

The slide is a generated pyramid whose level-0 JPEG tiles under the tissue are overwritten
with garbage, as a damaged scanner file would be; patching (done at a low level) succeeds and
feature extraction meets the corrupt tiles.
"""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile

from preprocessing import feature_summary
from preprocessing.extract import main as extract_main
from preprocessing.features.features_files import validate_features
from preprocessing.features.unreadable import unreadable_verdict
from preprocessing.slides.patching import PatchParams, patch_slide, write_outputs
from preprocessing.slides.synthetic import Ellipse, SlideSpec, write_slide

ENCODER = "timm:resnet10t"


def garble_level0_tiles(slide, tiles, seed=0) -> None:
    """Overwrite the JPEG data of level-0 `tiles` ((row, column) pairs) with random bytes."""
    with tifffile.TiffFile(slide) as tiff:
        level0 = tiff.pages[0]
        columns = -(-level0.shape[1] // level0.tilewidth)
        spans = [
            (level0.dataoffsets[r * columns + c], level0.databytecounts[r * columns + c])
            for r, c in tiles
        ]
    rng = np.random.default_rng(seed)
    with open(slide, "r+b") as file:
        for offset, size in spans:
            file.seek(offset)
            file.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())


#: A 3000 × 2000 px slide (0.5 µm/px, 512 px tiles) and the level-0 tiles under the middle of
#: its tissue: about half of its 29 patches touch them.
DAMAGED_SPEC = SlideSpec(
    width=3000, height=2000, mpp=0.5, regions=(Ellipse(1500, 1000, 1100, 700),)
)
GARBLED_TILES = [(2, 2), (2, 3), (2, 4)]
#: The same at 6000 × 4000 px: large enough for patching's QC picture to be read from level 1,
#: so that, as on a real slide, only extraction meets the garbled level-0 tiles.
LARGE_DAMAGED_SPEC = SlideSpec(
    width=6000, height=4000, mpp=0.5, regions=(Ellipse(3000, 2000, 2200, 1400),)
)
LARGE_GARBLED_TILES = [(3, 4), (3, 5), (3, 6), (3, 7)]


def write_damaged_slide(path, large: bool = False):
    slide = write_slide(path, LARGE_DAMAGED_SPEC if large else DAMAGED_SPEC)
    garble_level0_tiles(slide, LARGE_GARBLED_TILES if large else GARBLED_TILES)
    return slide


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """The damaged slide and its patches file."""
    folder = tmp_path_factory.mktemp("damaged")
    slide = write_damaged_slide(folder / "damaged.tiff")
    params = PatchParams()
    patches = folder / "damaged.h5"
    write_outputs(patch_slide(slide, params), params, patches, None, None)
    return slide, patches


def extract(slide, patches, out, *extra):
    return extract_main(
        [
            str(slide), str(patches), "--encoder", ENCODER, "--out", str(out),
            "--weights", "random", "--device", "cpu", "--workers", "0", "--no-progress",
            "--on-bad-patch", "skip", *extra,
        ]
    )  # fmt: skip


def attributes(path):
    with h5py.File(path) as h5:
        return dict(h5.attrs), h5["features"].shape[0], len(h5["skipped_indices"])


def test_garbled_tiles_above_the_allowed_fraction_fail_the_slide(damaged, tmp_path, capsys):
    slide, patches = damaged
    out = tmp_path / "damaged.h5"
    assert extract(slide, patches, out) == 0
    attrs, kept, skipped = attributes(out)
    total = kept + skipped
    assert 0.1 < skipped / total < 1, (skipped, total)  # the two tiles hold part of the tissue
    assert attrs["status"] == "failed"
    assert (
        f"{skipped} of {total} patches unreadable ({skipped / total:.1%})"
        in (attrs["status_reason"])
    )
    assert "more than the 10% allowed" in attrs["status_reason"]
    assert attrs["unreadable_fraction"] == pytest.approx(skipped / total)
    assert "recorded as failed" in capsys.readouterr().out
    assert validate_features(out, patches, ENCODER, "random") is None


def test_garbled_tiles_within_the_allowed_fraction_degrade_the_slide(damaged, tmp_path):
    slide, patches = damaged
    out = tmp_path / "damaged.h5"
    assert extract(slide, patches, out, "--max-unreadable-fraction", "0.9") == 0
    attrs, kept, skipped = attributes(out)
    assert attrs["status"] == "ok" and skipped > 0 and kept > 0
    assert attrs["status_reason"].startswith(f"{skipped} of {kept + skipped} patches unreadable")
    # a new allowed fraction changes the verdict: the valid file is recomputed, not kept
    assert extract(slide, patches, out) == 0
    assert attributes(out)[0]["status"] == "failed"


def test_cohort_table_lists_degraded_and_failed_slides_with_count_and_fraction(
    damaged, fixture_slides, tmp_path, capsys
):
    slide, patches = damaged
    failed, degraded = tmp_path / "a" / "damaged.h5", tmp_path / "b" / "damaged.h5"
    assert extract(slide, patches, failed) == 0
    assert extract(slide, patches, degraded, "--max-unreadable-fraction", "0.9") == 0
    clean = tmp_path / "clean.h5"
    cmu = fixture_slides / "cmu_small_region.svs"
    params = PatchParams()
    write_outputs(patch_slide(cmu, params), params, tmp_path / "cmu_patches.h5", None, None)
    assert extract(cmu, tmp_path / "cmu_patches.h5", clean) == 0
    table_path = tmp_path / "degraded_slides.csv"
    capsys.readouterr()
    code = feature_summary.main([str(failed), str(degraded), str(clean), "--out", str(table_path)])
    assert code == 0
    table = pd.read_csv(table_path)
    assert list(table["status"]) == ["failed", "ok"]  # the clean slide has no row
    _, kept, skipped = attributes(failed)
    assert (table["n_unreadable"] == skipped).all() and (table["n_patches"] == kept + skipped).all()
    assert table["unreadable_fraction"].tolist() == [round(skipped / (kept + skipped), 4)] * 2
    out = capsys.readouterr().out
    assert "2 of 3 feature files left unreadable patches out; 1 of them recorded as failed" in out
    assert "degraded:" in out and "failed:" in out

    # the same files listed in a file (@FILE, as a cohort too large for a command line)
    listing = tmp_path / "features.txt"
    listing.write_text(f"{failed}\n{degraded}\n{clean}\n")
    again = tmp_path / "from_list.csv"
    assert feature_summary.main([f"@{listing}", "--out", str(again)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(again), table)


@pytest.mark.parametrize(
    ("unreadable", "total", "status", "fragment"),
    [
        (0, 50, "ok", ""),
        (5, 50, "ok", "5 of 50 patches unreadable (10.0%), skipped"),
        (6, 50, "failed", "6 of 50 patches unreadable (12.0%), more than the 10% allowed"),
        (50, 50, "failed", "no patch could be read (50 of 50"),
    ],
)
def test_verdict_counts_the_fraction_against_the_limit(unreadable, total, status, fragment):
    verdict, reason = unreadable_verdict(unreadable, total, 0.1)
    assert verdict == status and fragment in reason
