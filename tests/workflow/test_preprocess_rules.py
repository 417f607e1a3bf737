"""The Snakemake workflow through preprocessing (``--until preprocess_summary``), on a tiny
cohort with one broken slide; tests/test_full_chain.py runs the whole chain."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml

from preprocessing.slides.demo_cohort import DEMO_CLASSES, write_cohort
from tests.workflow.configs import write_workflow_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.workflow
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
PREPROCESS_ONLY = ("--until", "preprocess_summary")


def make_cohort(folder: Path, fixture_slides) -> Path:
    """The demo cohort generator's slides plus two problem slides, as users would list them."""
    sheet_path = write_cohort(folder, n_slides=3, width=3000, height=2000, seed=1)
    sheet = pd.read_csv(sheet_path)
    shutil.copy(fixture_slides / "unreadable.svs", folder / "broken.svs")
    shutil.copy(fixture_slides / "boxes.tiff", folder / "boxes.tiff")
    extra = pd.DataFrame(
        [
            ("broken", "broken.svs", "P90", "normal", None),
            ("boxes", "boxes.tiff", "P91", "normal", 0.5),  # implausible file mpp, override
        ],
        columns=["slide_id", "path", "patient_id", "label", "mpp"],
    )
    pd.concat([sheet, extra]).to_csv(sheet_path, index=False)
    return sheet_path


def write_config(folder: Path, sheet: Path, strict: bool = False) -> Path:
    return write_workflow_config(folder / "config.yaml", sheet, folder / "results", strict=strict)


def test_cohort_completes_and_reports_the_bad_slide(tmp_path, fixture_slides, run_snakemake):
    sheet = make_cohort(tmp_path / "cohort", fixture_slides)
    config = write_config(tmp_path, sheet)
    done = run_snakemake(config, *PREPROCESS_ONLY)
    assert done.returncode == 0, done.stderr[-3000:]
    results = tmp_path / "results"
    stats = pd.read_csv(results / "preprocessing" / "slides.csv").set_index("slide_id")
    assert stats.loc["broken", "status"] == "failed"
    assert "tile data cannot be read" in stats.loc["broken", "status_reason"]
    assert (stats.loc[["slide_000", "slide_001", "slide_002"], "status"] == "ok").all()
    assert (stats.loc[["slide_000", "slide_001", "slide_002"], "n_patches"] > 0).all()
    assert stats.loc["boxes", "mpp_source"] == "override"
    failed = pd.read_csv(results / "preprocessing" / "failed_slides.csv")
    assert set(failed["slide_id"]) == {"broken", "boxes"}  # boxes: no tissue in 300 px
    for slide in ("slide_000", "slide_001", "slide_002", "broken", "boxes"):
        assert (results / "qc" / f"{slide}.png").stat().st_size > 0
        with h5py.File(results / "patches" / f"{slide}.h5") as h5:
            assert h5.attrs["slide_id"] == slide
    assert "broken: failed" in done.stdout + done.stderr

    again = run_snakemake(config, "--dry-run", *PREPROCESS_ONLY)
    assert re.search(r"^total\s+0$", again.stdout, re.MULTILINE), again.stdout  # no job to run


def test_strict_mode_stops_at_the_bad_slide(tmp_path, fixture_slides, run_snakemake):
    sheet = make_cohort(tmp_path / "cohort", fixture_slides)
    config = write_config(tmp_path, sheet, strict=True)
    done = run_snakemake(config, *PREPROCESS_ONLY)
    assert done.returncode != 0
    assert not (tmp_path / "results" / "patches" / "broken.h5").exists()
    log = (tmp_path / "results" / "logs" / "patch" / "broken.log").read_text()
    assert "error:" in log and "broken.svs: tile data cannot be read" in log


def test_missing_slide_file_is_recorded_not_fatal(tmp_path, fixture_slides, run_snakemake):
    sheet = make_cohort(tmp_path / "cohort", fixture_slides)
    (tmp_path / "cohort" / "slides" / "slide_002.tiff").unlink()
    done = run_snakemake(write_config(tmp_path, sheet), *PREPROCESS_ONLY)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = pd.read_csv(tmp_path / "results" / "preprocessing" / "slides.csv").set_index("slide_id")
    assert stats.loc["slide_002", "status_reason"] == "file not found"


@pytest.mark.parametrize(
    ("sheet_text", "message"),
    [
        ("slide_id,path,patient_id,label\na,a.svs,p,IC\na,b.svs,q,N\n", "duplicate slide_id(s): a"),
        (
            "slide_id,path,patient_id,label\n"
            + "".join(f"{s},{s}.svs,p,IC\n" for s in "abcdefg" * 2),
            "7 duplicate slide_id(s): a, b, c, d, e, ...",
        ),
        ("slide_id,path,label\na,a.svs,IC\n", "missing column(s) patient_id"),
    ],
)
def test_bad_sheet_stops_before_any_job(tmp_path, sheet_text, message, run_snakemake):
    sheet = tmp_path / "slides.csv"
    sheet.write_text(sheet_text)
    done = run_snakemake(write_config(tmp_path, sheet), "--dry-run")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert message in output
    assert "Traceback" not in output


def test_many_missing_slide_files_are_one_line_before_planning(
    tmp_path, fixture_slides, run_snakemake
):
    """A sheet of 2,000 rows, 40 of whose files are missing: one note with the count and the
    first ids, from the sheet check (before the plan), and the plan goes on."""
    shutil.copy(
        PROJECT_ROOT / "hmil" / "presets" / "hierarchies" / "bracs.yaml",
        tmp_path / "hierarchy.yaml",
    )
    ids = [f"s_{i:04d}" for i in range(2000)]
    missing = set(ids[100:140])
    sheet = tmp_path / "slides.csv"
    pd.DataFrame(
        {
            "slide_id": ids,
            "path": [
                str(tmp_path / f"{s}.svs") if s in missing
                else str(fixture_slides / "cmu_small_region.svs")
                for s in ids
            ],
            "patient_id": [f"p{i}" for i in range(2000)],
            "label": ["N", "IC"] * 1000,
        }
    ).to_csv(sheet, index=False)  # fmt: skip
    done = run_snakemake(write_config(tmp_path, sheet), "--dry-run", "--until", "patch")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    notes = [line for line in done.stderr.splitlines() if "slide files" in line]
    assert notes == [
        f"note: 40 of 2000 slide files of {sheet} not found (s_0100, s_0101, s_0102, s_0103,"
        " s_0104, ...): each is recorded as a failed slide"
    ]


def test_workflow_passes_lint_and_snakefmt():
    lint = subprocess.run(
        [
            *SNAKEMAKE,
            "--lint",
            "--snakefile",
            "workflow/Snakefile",
            "--configfile",
            ".test/config/config.yaml",
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


def test_missing_demo_cohort_names_the_command_that_makes_it():
    """A fresh checkout has no demo/: the shipped config says how to make it."""
    plan = subprocess.run(
        [*SNAKEMAKE, "--dry-run", "--snakefile", "workflow/Snakefile",
         "--config", "slides=demo/no_such_sheet.csv"],
        cwd=PROJECT_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert plan.returncode != 0
    output = plan.stdout + plan.stderr
    assert "demo/no_such_sheet.csv: slide sheet not found" in output
    assert "python -m preprocessing.synthetic cohort demo" in output
    assert "Traceback" not in output


def test_demo_cohort_has_labels_patients_and_readable_slides(tmp_path):
    sheet = pd.read_csv(write_cohort(tmp_path, n_slides=14, width=1024, height=1024, seed=3))
    assert len(sheet) == 14 and sheet["slide_id"].is_unique
    assert set(sheet["label"]) == set(DEMO_CLASSES)
    assert (sheet.groupby("patient_id").size() > 1).any()  # patients with several slides
    assert sheet.groupby("patient_id")["label"].nunique().max() == 1
    hierarchy = yaml.safe_load((tmp_path / "hierarchy.yaml").read_text())
    assert hierarchy["fine"] == {fine: coarse for fine, (coarse, _) in DEMO_CLASSES.items()}
    for path in sheet["path"]:
        assert (tmp_path / path).stat().st_size > 0


def test_unknown_model_in_the_config_is_one_line_naming_it(tmp_path, run_snakemake):
    sheet = tmp_path / "slides.csv"
    sheet.write_text("slide_id,path,patient_id,label\na,a.svs,p,IC\n")
    config = write_workflow_config(
        tmp_path / "config.yaml", sheet, tmp_path / "results", models=["hmil_mb", "hmil_mbb"]
    )
    done = run_snakemake(config, "--dry-run")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    lines = [line for line in output.splitlines() if "unknown model" in line]
    assert lines == [
        "config models: unknown model 'hmil_mbb' (available: " + ", ".join(SCHEMA_MODELS) + ")"
    ]
    assert "Failed validating" not in output  # not the schema's many-line enum dump


def test_the_config_schema_lists_every_registered_model():
    from hmil.models import list_models

    assert sorted(SCHEMA_MODELS) == list_models()


SCHEMA_MODELS = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "workflow/schemas/config.schema.yaml").read_text()
)["properties"]["models"]["items"]["enum"]
