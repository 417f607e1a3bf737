"""Shared test fixtures: the real slides of ../shared/fixtures and small generated slides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread in the test process: tiny models on a shared 2-core machine run
    faster and steadier (subprocesses, Snakemake jobs included, choose their own).
    Session-scoped, so that module fixtures (reference features, reference runs) run
    under it too: features computed with 2 threads differ from 1-thread ones in the last
    bits on some CPUs, which broke bit-identity tests that compare the two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Checkpoint digests go to a temporary cache, not the user's ~/.cache (subprocesses,
    Snakemake jobs included, inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HMIL_CACHE_DIR", str(tmp_path_factory.mktemp("hmil_cache")))
        yield


@pytest.fixture(scope="session")
def fixture_slides() -> Path:
    """Folder of the real test slides (read-only)."""
    if FIXTURES is None:
        pytest.skip("test slides not found: set HMIL_FIXTURES to shared/fixtures/slides")
    return FIXTURES


def snakemake_command(config: Path, *extra: str) -> list[str]:
    """`snakemake` on the project's workflow with a test config, run from the project root."""
    return [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(PROJECT_ROOT / "workflow" / "Snakefile"),
        "--directory",
        str(PROJECT_ROOT),
        "--configfile",
        str(config),
        "--cores",
        "2",
        *extra,
    ]


@pytest.fixture(scope="session")
def run_snakemake():
    """Run the workflow with a test config; returns the CompletedProcess (text output)."""

    def run(config: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            snakemake_command(config, *extra), capture_output=True, text=True, **kwargs
        )

    return run
