"""Shared test fixtures: the real slides of ../shared/fixtures and small generated slides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _fixture_dir() -> Path | None:
    candidates = [
        os.environ.get("HMIL_FIXTURES"),
        PROJECT_ROOT.parent / "shared" / "fixtures" / "slides",
        "/work/shared/fixtures/slides",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "cmu_small_region.svs").is_file():
            return Path(candidate)
    return None


FIXTURES = _fixture_dir()


@pytest.fixture(scope="session")
def fixture_slides() -> Path:
    """Folder of the real test slides (read-only)."""
    if FIXTURES is None:
        pytest.skip("test slides not found: set HMIL_FIXTURES to shared/fixtures/slides")
    return FIXTURES
