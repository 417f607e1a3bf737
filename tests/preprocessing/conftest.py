"""Small generated slides shared by the preprocessing tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from preprocessing.slides.synthetic import Ellipse, SlideSpec, two_region_spec, write_slide


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory) -> tuple[Path, SlideSpec]:
    """A 12,000 × 9,000 px slide at 0.25 µm/px with two tissue pieces, one with a hole."""
    spec = two_region_spec(12000, 9000, 0.25)
    path = tmp_path_factory.mktemp("slides") / "two_regions.tiff"
    return write_slide(path, spec), spec


@pytest.fixture(scope="session")
def blank_slide(tmp_path_factory) -> Path:
    spec = SlideSpec(width=4000, height=3000, mpp=0.5, regions=())
    return write_slide(tmp_path_factory.mktemp("slides") / "blank.tiff", spec)


@pytest.fixture(scope="session")
def small_slide_factory(tmp_path_factory):
    """Write small one-ellipse slides on demand (for cohorts)."""
    folder = tmp_path_factory.mktemp("cohort")

    def make(name: str, mpp: float | None = 0.5, aperio: bool = False) -> Path:
        spec = SlideSpec(
            width=3000,
            height=2000,
            mpp=mpp,
            regions=(Ellipse(750, 500, 400, 300),),
            aperio=aperio,
        )
        return write_slide(folder / name, spec)

    return make
