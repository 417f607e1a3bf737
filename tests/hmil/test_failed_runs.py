"""One model run failing in a cohort run: training records the failure (``--on-error
record``, the workflow's default outside strict mode), evaluation records a failed
evaluation, heatmaps draw nothing, an MHIM student of the failed baseline fails naming it,
and the comparison still builds for the other runs, naming the failure."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from tests.hmil.test_train import cohort, run_subprocess, train_args  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]
RUN_FILES = ("model.pt", "predictions.csv", "metrics.json", "attention.h5", "log.csv")


def run_module(module, *args):
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def poisoned(cohort, tmp_path_factory):  # noqa: F811
    """The cohort with NaN in the feature file of one training slide."""
    root = tmp_path_factory.mktemp("poisoned")
    shutil.copytree(cohort["root"] / "features", root / "features")
    table = cohort["table"]
    slide = table.loc[table["fold0"] == "train", "slide_id"].iloc[0]
    with h5py.File(root / "features" / f"{slide}.h5", "r+") as file:
        file["features"][0, 0] = np.nan
    pt = root / "features" / f"{slide}.pt"
    if pt.exists():
        tensor = torch.load(pt)
        tensor[0, 0] = float("nan")
        torch.save(tensor, pt)
    return {**cohort, "root": root, "slide": slide}


@pytest.fixture(scope="module")
def runs(cohort, poisoned, tmp_path_factory):  # noqa: F811
    models = tmp_path_factory.mktemp("failed_runs") / "models" / "enc"
    good = models / "hmil" / "fold0"
    done = run_subprocess(train_args(cohort, good, epochs=2))
    assert done.returncode == 0, done.stderr
    bad = models / "abmil" / "fold0"
    failed = run_subprocess(
        train_args(poisoned, bad, "--on-error", "record", model="abmil", epochs=2)
    )
    return {"good": good, "bad": bad, "failed": failed, "slide": poisoned["slide"]}


def test_without_record_the_failure_is_one_error_line_and_no_output(poisoned, tmp_path):
    done = run_subprocess(train_args(poisoned, tmp_path / "run", epochs=2))
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and poisoned["slide"] in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not any((tmp_path / "run" / name).exists() for name in RUN_FILES)


def test_recorded_failure_writes_every_output_saying_so(runs):
    failed, bad = runs["failed"], runs["bad"]
    assert failed.returncode == 0, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and runs["slide"] in errors[0] and "recorded" in errors[0]
    for name in RUN_FILES:
        assert (bad / name).is_file(), name
    metrics = json.loads((bad / "metrics.json").read_text())
    assert metrics["status"] == "failed" and runs["slide"] in metrics["reason"]
    assert metrics["config"]["fold"] == 0 and "code_version" in metrics
    assert pd.read_csv(bad / "predictions.csv").empty
    checkpoint = torch.load(bad / "model.pt", weights_only=False)
    assert checkpoint["status"] == "failed" and "state_dict" not in checkpoint
    with h5py.File(bad / "attention.h5") as attention:
        assert attention.attrs["status"] == "failed" and len(attention) == 0


def test_failed_run_becomes_a_failed_evaluation_and_the_comparison_names_it(runs, tmp_path):
    evals = tmp_path / "eval" / "enc"
    done = run_module("hmil.evaluate", runs["good"], "--out", evals / "hmil", "--bootstrap", 10)
    assert done.returncode == 0, done.stderr

    strict = run_module("hmil.evaluate", runs["bad"], "--out", tmp_path / "strict")
    assert strict.returncode == 1 and "training failed" in strict.stderr
    assert not (tmp_path / "strict").exists()

    record = ["--on-error", "record"]
    done = run_module("hmil.evaluate", runs["bad"], "--out", evals / "abmil", *record)
    assert done.returncode == 0, done.stderr
    summary = json.loads((evals / "abmil" / "summary.json").read_text())
    assert summary["status"] == "failed" and runs["slide"] in summary["reason"]
    for figure in ("roc_fine.png", "confusion_fine.png", "training_curves.png", "summary.csv"):
        assert (evals / "abmil" / figure).stat().st_size > 0
    assert (evals / "abmil" / "FAILED").is_file()

    table_path = tmp_path / "comparison.csv"
    done = run_module(
        "hmil.compare", evals / "abmil", evals / "hmil", "--out", table_path,
        "--md", tmp_path / "comparison.md",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(table_path).set_index("model")
    assert table.loc["hmil", "status"] == "ok"
    assert table.loc["abmil", "status"] == "failed"
    assert "training failed" in table.loc["abmil", "reason"]
    assert "FAILED" in (tmp_path / "comparison.md").read_text()


def test_heatmaps_of_a_failed_run_draw_nothing(runs, tmp_path):
    out, sheet = tmp_path / "heatmaps", tmp_path / "slides.csv"
    sheet.write_text("slide_id,path,patient_id,label\ns1,s1.svs,p1,a1\n")
    done = run_module(
        "hmil.heatmaps", runs["bad"] / "attention.h5", "--slides", sheet,
        "--patches", tmp_path, "--out", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.is_dir() and not any(out.iterdir())


def test_mhim_student_of_a_failed_baseline_fails_naming_it(runs, cohort, tmp_path):  # noqa: F811
    out = tmp_path / "mhim"
    args = train_args(cohort, out, "--teacher", str(runs["bad"] / "model.pt"), model="mhim_abmil")
    done = run_subprocess([*args, "--on-error", "record"])
    assert done.returncode == 0, done.stderr
    reason = json.loads((out / "metrics.json").read_text())["reason"]
    assert "teacher's training failed" in reason and str(runs["bad"] / "model.pt") in reason
