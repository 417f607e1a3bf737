"""`python -m preprocessing.patch` on real, generated and broken slides."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import openslide
import pytest

from preprocessing.slides.synthetic import expected_patch_count, two_region_spec, write_slide

ARCHITECTURE_ATTRIBUTES = {
    "patch_size", "patch_level", "downsample", "level_dim", "patch_size_level0", "target_mpp",
    "slide_mpp", "mpp_source", "min_tissue", "level0_width", "level0_height", "code_version",
    "params", "status", "n_patches", "tissue_area_mm2",
}  # fmt: skip


def run_patch(slide, out_dir, *extra):
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "preprocessing.patch", str(slide), "--out", str(out_dir / "p.h5"),
        "--qc", str(out_dir / "qc.png"), "--geojson", str(out_dir / "tissue.geojson"), *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True)


def test_real_he_slide_patches_land_on_tissue(fixture_slides, tmp_path):
    done = run_patch(fixture_slides / "cmu_small_region.svs", tmp_path)
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "p.h5") as h5:
        coords = h5["coords"][:]
        attrs = dict(h5.attrs)
        assert set(h5["coords"].attrs) >= ARCHITECTURE_ATTRIBUTES  # CLAM reads them here
    assert set(attrs) >= ARCHITECTURE_ATTRIBUTES
    assert attrs["mpp_source"] == "openslide.mpp-x" and attrs["slide_mpp"] == 0.499
    assert attrs["status"] == "ok"
    size = attrs["patch_size_level0"]
    assert size == 257  # 256 px × 0.5 / 0.499
    assert 30 <= len(coords) <= 60, len(coords)
    # inside the slide
    assert (coords >= 0).all()
    assert (coords[:, 0] + size <= 2220).all() and (coords[:, 1] + size <= 2967).all()
    # tissue covers 0.62 mm² of the 1.64 mm² crop (checked by eye on the QC image)
    fraction = attrs["tissue_area_mm2"] / (2220 * 2967 * 0.499**2 / 1e6)
    assert 0.25 < fraction < 0.5, fraction
    # the white corners of the crop hold no patch
    corner = 400  # µm-scale boxes of glass (0.2 mm), checked on the QC image
    for x0, y0 in [(0, 0), (2220 - corner, 0), (0, 2967 - corner), (2220 - corner, 2967 - corner)]:
        in_corner = (
            (coords[:, 0] + size > x0) & (coords[:, 0] < x0 + corner)
            & (coords[:, 1] + size > y0) & (coords[:, 1] < y0 + corner)
        )  # fmt: skip
        assert not in_corner.any(), (x0, y0)
    # every kept patch really shows stained tissue at full resolution
    slide = openslide.OpenSlide(str(fixture_slides / "cmu_small_region.svs"))
    for x, y in coords:
        rgb = np.asarray(slide.read_region((int(x), int(y)), 0, (size, size)).convert("RGB"))
        saturation = rgb.max(axis=2).astype(int) - rgb.min(axis=2)
        assert (saturation > 25).mean() > 0.15, (x, y)
    geojson = json.loads((tmp_path / "tissue.geojson").read_text())
    assert geojson["features"], "no tissue polygon"
    assert (tmp_path / "qc.png").stat().st_size > 10_000


def test_generated_slide_count_matches_geometry(synthetic_slide, tmp_path):
    path, spec = synthetic_slide
    done = run_patch(path, tmp_path)
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "p.h5") as h5:
        found = h5.attrs["n_patches"]
        assert h5.attrs["patch_size_level0"] == 512
    expected = expected_patch_count(spec)
    assert expected > 50
    assert abs(found - expected) <= 0.03 * expected, (found, expected)
    # the hole (an ellipse of 0.05 × 0.07 slide) holds no patch
    polygons = json.loads((tmp_path / "tissue.geojson").read_text())["features"]
    assert sum(len(f["geometry"]["coordinates"]) - 1 for f in polygons) == 1  # one hole


def test_same_physical_grid_at_025_and_05_mpp(tmp_path):
    scan40 = write_slide(tmp_path / "s40.tiff", two_region_spec(8000, 6000, 0.25))
    scan20 = write_slide(tmp_path / "s20.tiff", two_region_spec(4000, 3000, 0.5))
    assert run_patch(scan40, tmp_path / "a").returncode == 0
    assert run_patch(scan20, tmp_path / "b").returncode == 0
    with h5py.File(tmp_path / "a" / "p.h5") as a, h5py.File(tmp_path / "b" / "p.h5") as b:
        coords40, coords20 = a["coords"][:], b["coords"][:]
        assert a.attrs["patch_level"] == 1 and b.attrs["patch_level"] == 0
    same = {tuple(c) for c in coords40 // 2} & {tuple(c) for c in coords20}
    assert len(same) >= 0.97 * max(len(coords40), len(coords20))
    assert abs(len(coords40) - len(coords20)) <= 0.03 * len(coords20)


def test_blank_slide_gives_flagged_empty_file(blank_slide, tmp_path):
    done = run_patch(blank_slide, tmp_path)
    assert done.returncode == 0
    assert "0 patches (no tissue found)" in done.stdout
    with h5py.File(tmp_path / "p.h5") as h5:
        assert h5["coords"].shape == (0, 2)
        assert h5.attrs["status"] == "empty" and h5.attrs["status_reason"] == "no tissue found"


def _bad_inputs(fixture_slides, tmp_path):
    zero = tmp_path / "zero.svs"
    zero.touch()
    fake = tmp_path / "fake.svs"
    shutil.copy(fixture_slides / "../README.md", fake)
    return {
        "unreadable.svs": (fixture_slides / "unreadable.svs", "tile data cannot be read"),
        "unopenable.tiff": (fixture_slides / "unopenable.tiff", "Unsupported TIFF compression"),
        "fake.svs": (fake, "not a slide format OpenSlide can read"),
        "zero.svs": (zero, "empty"),
        "missing.svs": (tmp_path / "missing.svs", "file not found"),
        "boxes.tiff": (fixture_slides / "boxes.tiff", "implausible mpp"),
    }


def test_bad_slides_fail_with_one_line_and_no_output(fixture_slides, tmp_path):
    for name, (path, problem) in _bad_inputs(fixture_slides, tmp_path).items():
        out = tmp_path / f"out_{name}"
        done = run_patch(path, out)
        assert done.returncode == 1, name
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, (name, done.stderr)
        assert lines[0].startswith(f"error: {path}") and problem in lines[0], (name, lines)
        assert "Traceback" not in done.stderr
        assert list(out.iterdir()) == [], (name, list(out.iterdir()))


def test_bad_slides_are_recorded_on_request(fixture_slides, tmp_path):
    for name, (path, problem) in _bad_inputs(fixture_slides, tmp_path).items():
        out = tmp_path / f"out_{name}"
        done = run_patch(path, out, "--on-error", "record")
        assert done.returncode == 0, (name, done.stderr)
        with h5py.File(out / "p.h5") as h5:
            assert h5.attrs["status"] == "failed"
            assert problem in h5.attrs["status_reason"]
            assert h5["coords"].shape == (0, 2)
        assert (out / "qc.png").exists()


def test_mpp_override_rescues_boxes_tiff(fixture_slides, tmp_path):
    done = run_patch(fixture_slides / "boxes.tiff", tmp_path, "--mpp", "0.5")
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "p.h5") as h5:
        assert h5.attrs["mpp_source"] == "override"
        assert h5.attrs["slide_mpp"] == 0.5


@pytest.mark.parametrize("option", [["--min-tissue", "1.5"], ["--threshold", "bright"]])
def test_bad_options_are_rejected(fixture_slides, tmp_path, option):
    done = run_patch(fixture_slides / "small.svs", tmp_path, *option)
    assert done.returncode == 2
    assert not (tmp_path / "p.h5").exists()
