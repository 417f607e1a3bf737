"""The synthetic slide generator writes pyramids that OpenSlide reads correctly."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import openslide
import tifffile

from preprocessing.slides.synthetic import (
    BACKGROUND_RGB,
    Ellipse,
    SlideSpec,
    tissue_at,
    write_slide,
)


def test_generated_slide_is_a_jpeg_pyramid_with_mpp(synthetic_slide):
    path, _spec = synthetic_slide
    slide = openslide.OpenSlide(str(path))
    assert slide.dimensions == (12000, 9000)
    assert slide.level_count >= 4
    assert slide.level_downsamples[:4] == (1.0, 2.0, 4.0, 8.0)
    assert float(slide.properties["openslide.mpp-x"]) == 0.25
    with tifffile.TiffFile(path) as tiff:
        pages = list(tiff.pages)
        assert all(page.is_tiled and page.compression == 7 for page in pages)
        assert all(page.photometric == 2 for page in pages)  # RGB, not YCbCr
        assert [page.subfiletype for page in pages[:2]] == [0, 1]


def test_pixels_follow_the_geometry_at_every_level(synthetic_slide):
    path, spec = synthetic_slide
    slide = openslide.OpenSlide(str(path))
    region = spec.regions[0]
    for level in range(slide.level_count):
        ds = slide.level_downsamples[level]
        cx0, cy0 = region.cx / spec.mpp, region.cy / spec.mpp  # level-0 px
        # a point inside the tissue ring (between hole and outer edge) and a corner of glass
        inside = (int(cx0 + 0.7 * region.rx / spec.mpp), int(cy0))
        assert tissue_at(
            spec.regions, np.array(inside[0] * spec.mpp), np.array(inside[1] * spec.mpp)
        )
        tissue = np.asarray(slide.read_region(inside, level, (1, 1)).convert("RGB"))[0, 0]
        glass = np.asarray(
            slide.read_region((int(10 * ds), int(10 * ds)), level, (1, 1)).convert("RGB")
        )[0, 0]
        assert np.abs(glass.astype(int) - BACKGROUND_RGB).max() < 15
        assert int(tissue.max()) - int(tissue.min()) > 40  # saturated pink/purple


def test_aperio_description_and_missing_mpp(tmp_path):
    spec = SlideSpec(
        width=1024, height=1024, mpp=0.25, regions=(Ellipse(128, 128, 50, 50),), aperio=True
    )
    slide = openslide.OpenSlide(str(write_slide(tmp_path / "aperio.svs", spec)))
    assert slide.properties["openslide.vendor"] == "aperio"
    assert float(slide.properties["aperio.MPP"]) == 0.25
    bare = SlideSpec(width=1024, height=1024, mpp=None, regions=())
    slide = openslide.OpenSlide(str(write_slide(tmp_path / "bare.tiff", bare)))
    assert "openslide.mpp-x" not in slide.properties


def test_huge_slide_is_written_tile_by_tile(tmp_path):
    """100,000 × 100,000 px (30 GB as RGB) written in a child process with bounded memory."""
    path = tmp_path / "huge.tiff"
    code = (
        "from preprocessing.slides.synthetic import SlideSpec, Ellipse, write_slide\n"
        "spec = SlideSpec(width=100_000, height=100_000, mpp=0.25, levels=4,\n"
        "                 regions=(Ellipse(12500, 12500, 800, 600),))\n"
        f"write_slide({str(path)!r}, spec)\n"
        # VmHWM, unlike ru_maxrss, is not inherited from the parent (pytest) across exec.
        "status = open('/proc/self/status').read()\n"
        "print(status.split('VmHWM:')[1].split()[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_mib = int(done.stdout.split()[-1]) / 1024
    slide = openslide.OpenSlide(str(path))
    assert slide.dimensions == (100_000, 100_000)
    assert slide.level_count == 4
    centre = np.asarray(slide.read_region((50_000, 50_000), 0, (1, 1)).convert("RGB"))[0, 0]
    assert int(centre.max()) - int(centre.min()) > 40
    assert peak_mib < 500, f"peak memory {peak_mib:.0f} MiB"
    path.unlink()
