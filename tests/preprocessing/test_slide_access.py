"""Opening slides of every fixture format and resolving their pixel size."""

from __future__ import annotations

import shutil

import pytest

from plumbing.errors import SlideError
from preprocessing.slides.access import Mpp, open_slide, resolve_mpp


@pytest.mark.parametrize(
    ("name", "vendor", "size"),
    [
        ("cmu_small_region.svs", "aperio", (2220, 2967)),
        ("small.svs", "aperio", (16, 16)),
        ("boxes.tiff", "generic-tiff", (300, 250)),
        ("boxes_0.dcm", "dicom", (16, 16)),
    ],
)
def test_open_slide_reads_every_fixture_format(fixture_slides, name, vendor, size):
    slide = open_slide(fixture_slides / name)
    assert slide.properties["openslide.vendor"] == vendor
    assert slide.dimensions == size


def test_mpp_of_aperio_slide_comes_from_openslide(fixture_slides):
    slide = open_slide(fixture_slides / "cmu_small_region.svs")
    assert resolve_mpp(slide.properties, "x") == Mpp(0.499, "openslide.mpp-x")


def test_implausible_mpp_is_missing_without_override(fixture_slides):
    path = fixture_slides / "boxes.tiff"
    slide = open_slide(path)
    with pytest.raises(SlideError, match=r"boxes\.tiff: implausible mpp .*352\.8.*--mpp"):
        resolve_mpp(slide.properties, path)


def test_override_replaces_implausible_mpp(fixture_slides):
    slide = open_slide(fixture_slides / "boxes.tiff")
    assert resolve_mpp(slide.properties, "boxes.tiff", override=0.5) == Mpp(0.5, "override")


def test_override_outside_plausible_range_is_rejected():
    with pytest.raises(SlideError, match="override 100"):
        resolve_mpp({}, "a.svs", override=100)


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ({"aperio.MPP": "0.2527"}, Mpp(0.2527, "aperio.MPP")),
        (
            {"philips.DICOM_PIXEL_SPACING": '"0.00025" "0.00025"'},
            Mpp(0.25, "philips.DICOM_PIXEL_SPACING"),
        ),
        (
            {"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000"},
            Mpp(0.25, "tiff.XResolution"),
        ),
        (
            {"tiff.ResolutionUnit": "inch", "tiff.XResolution": "50800"},
            Mpp(0.5, "tiff.XResolution"),
        ),
        # an implausible first candidate falls through to the next plausible one
        ({"openslide.mpp-x": "352.8", "aperio.MPP": "0.5"}, Mpp(0.5, "aperio.MPP")),
    ],
)
def test_mpp_fallback_chain(properties, expected):
    resolved = resolve_mpp(properties, "slide.tif")
    assert resolved.source == expected.source
    assert resolved.value == pytest.approx(expected.value)


def test_missing_mpp_is_an_error_never_a_guess():
    with pytest.raises(SlideError, match=r"s\.tif: no mpp .* --mpp"):
        resolve_mpp({"tiff.ResolutionUnit": "none", "tiff.XResolution": "1"}, "s.tif")


def test_open_errors_name_the_file_and_the_problem(fixture_slides, tmp_path):
    empty = tmp_path / "empty.svs"
    empty.touch()
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n" * 100)
    cases = {
        tmp_path / "missing.svs": "file not found",
        empty: r"empty \(0 bytes\)",
        text: "not a slide format OpenSlide can read",
        fixture_slides / "unopenable.tiff": "Unsupported TIFF compression",
        tmp_path: "is a folder",
    }
    for path, problem in cases.items():
        with pytest.raises(SlideError, match=problem) as caught:
            open_slide(path)
        assert str(caught.value).startswith(str(path))


def test_two_file_dicom_opens_from_either_file(fixture_slides, tmp_path):
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(fixture_slides / name, tmp_path / name)
    assert open_slide(tmp_path / "boxes_1.dcm").dimensions == (16, 16)
