"""The Snakemake workflow through preprocessing, on a tiny cohort with one broken slide."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.workflow
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def make_cohort(folder: Path, small_slide_factory, fixture_slides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(3):
        source = small_slide_factory(f"s{i}.tiff")
        shutil.copy(source, folder / source.name)
        rows.append((f"s{i}", source.name, f"p{i // 2}", "IC", ""))
    shutil.copy(fixture_slides / "unreadable.svs", folder / "broken.svs")
    rows.append(("broken", "broken.svs", "p9", "N", ""))
    shutil.copy(fixture_slides / "boxes.tiff", folder / "boxes.tiff")
    rows.append(("boxes", "boxes.tiff", "p8", "N", "0.5"))  # implausible file mpp, override
    sheet = folder / "slides.csv"
    pd.DataFrame(rows, columns=["slide_id", "path", "patient_id", "label", "mpp"]).to_csv(
        sheet, index=False
    )
    return sheet


def write_config(folder: Path, sheet: Path, strict: bool = False) -> Path:
    config = yaml.safe_load((PROJECT_ROOT / "config" / "config.yaml").read_text())
    config.update(slides=str(sheet), outdir=str(folder / "results"), strict=strict)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(config: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        *SNAKEMAKE,
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
    return subprocess.run(command, capture_output=True, text=True)


def test_cohort_completes_and_reports_the_bad_slide(tmp_path, small_slide_factory, fixture_slides):
    sheet = make_cohort(tmp_path / "cohort", small_slide_factory, fixture_slides)
    config = write_config(tmp_path, sheet)
    done = snakemake(config)
    assert done.returncode == 0, done.stderr[-3000:]
    results = tmp_path / "results"
    stats = pd.read_csv(results / "preprocessing" / "slides.csv").set_index("slide_id")
    assert stats.loc["broken", "status"] == "failed"
    assert "tile data cannot be read" in stats.loc["broken", "status_reason"]
    assert (stats.loc[["s0", "s1", "s2"], "status"] == "ok").all()
    assert (stats.loc[["s0", "s1", "s2"], "n_patches"] > 10).all()
    assert stats.loc["boxes", "mpp_source"] == "override"
    failed = pd.read_csv(results / "preprocessing" / "failed_slides.csv")
    assert set(failed["slide_id"]) == {"broken", "boxes"}  # boxes: no tissue in 300 px
    for slide in ("s0", "s1", "s2", "broken", "boxes"):
        assert (results / "qc" / f"{slide}.png").stat().st_size > 0
        with h5py.File(results / "patches" / f"{slide}.h5") as h5:
            assert h5.attrs["slide_id"] == slide
    assert "broken: failed" in done.stdout + done.stderr

    # Nothing to do on a re-run; a new report builds from the outputs.
    again = snakemake(config, "--dry-run")
    assert "Nothing to be done" in again.stdout + again.stderr
    report = snakemake(config, "--report", str(tmp_path / "report.html"))
    assert report.returncode == 0, report.stderr[-2000:]
    assert (tmp_path / "report.html").stat().st_size > 10_000


def test_strict_mode_stops_at_the_bad_slide(tmp_path, small_slide_factory, fixture_slides):
    sheet = make_cohort(tmp_path / "cohort", small_slide_factory, fixture_slides)
    config = write_config(tmp_path, sheet, strict=True)
    done = snakemake(config)
    assert done.returncode != 0
    assert not (tmp_path / "results" / "patches" / "broken.h5").exists()
    log = (tmp_path / "results" / "logs" / "patch" / "broken.log").read_text()
    assert "error:" in log and "broken.svs: tile data cannot be read" in log


def test_missing_slide_file_is_recorded_not_fatal(tmp_path, small_slide_factory, fixture_slides):
    sheet = make_cohort(tmp_path / "cohort", small_slide_factory, fixture_slides)
    (tmp_path / "cohort" / "s2.tiff").unlink()
    done = snakemake(write_config(tmp_path, sheet))
    assert done.returncode == 0, done.stderr[-3000:]
    stats = pd.read_csv(tmp_path / "results" / "preprocessing" / "slides.csv").set_index("slide_id")
    assert stats.loc["s2", "status_reason"] == "file not found"


@pytest.mark.parametrize(
    ("sheet_text", "message"),
    [
        ("slide_id,path,patient_id,label\na,a.svs,p,IC\na,b.svs,q,N\n", "duplicate slide_id(s): a"),
        ("slide_id,path,label\na,a.svs,IC\n", "missing column(s) patient_id"),
    ],
)
def test_bad_sheet_stops_before_any_job(tmp_path, sheet_text, message):
    sheet = tmp_path / "slides.csv"
    sheet.write_text(sheet_text)
    done = snakemake(write_config(tmp_path, sheet), "--dry-run")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert message in output
    assert "Traceback" not in output


def test_workflow_passes_lint_and_snakefmt():
    lint = subprocess.run(
        [
            *SNAKEMAKE,
            "--lint",
            "--snakefile",
            "workflow/Snakefile",
            "--configfile",
            "config/config.yaml",
            "--config",
            f"slides={PROJECT_ROOT / 'tests' / 'data' / 'lint_slides.csv'}",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Lints for" not in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    fmt = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "workflow/"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
