"""The workflow on a real SLURM: a one-node cluster on localhost (tests/workflow/slurm_cluster.py)
runs a small cohort through the `workflow/profiles/slurm` profile, and its outputs equal
those of a local run of the same config and seed.

Skipped, saying why, where SLURM is not installed (`.ci/run` installs it when apt is there).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from preprocessing.slides.demo_cohort import write_cohort
from tests.workflow import slurm_cluster
from tests.workflow.configs import write_workflow_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENCODER = "stain_texture"
MODELS = ["hmil", "abmil"]
FOLDS = 2

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.missing_reason()
    if reason:
        pytest.skip(reason)
    running = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    yield running
    running.stop()


def write_config(folder: Path, sheet: Path, outdir: Path) -> Path:
    # Small memory requests, so that several jobs fit the test node at once.
    # One GPU per extraction and training job: the test node has two counted GPUs, so the
    # jobs go through SLURM's GPU scheduling and run on the CPU (device auto / cpu).
    small = {"threads": 1, "mem_mb": 1000, "gpus": 1}
    sections = {
        "features": {"batch_size": 32, "workers": 0, **small},
        "splits": {"folds": FOLDS, "val_fraction": 0.3},
        "training": {"epochs": 3, "batch_bags": 4, "patience": 3, **small},
        "evaluation": {"bootstrap": 20, "heatmap_top_k": 2, "heatmap_size": 256},
    }
    cluster = {"partition": "debug", "gpu_partition": "debug"}
    top = {"encoders": [ENCODER], "models": MODELS, "cluster": cluster}
    return write_workflow_config(folder / f"{outdir.name}.yaml", sheet, outdir, sections, **top)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fixture_slides, cluster, run_snakemake):
    """The same cohort and config run locally and on SLURM."""
    folder = tmp_path_factory.mktemp("slurm_chain")
    sheet_path = write_cohort(
        folder / "cohort", n_slides=24, width=1600, height=1200, seed=5,
        slides_per_patient=(1,),
    )  # fmt: skip
    sheet = pd.read_csv(sheet_path)
    shutil.copy(fixture_slides / "unreadable.svs", folder / "cohort" / "broken.svs")
    sheet.loc[len(sheet)] = ["broken", "broken.svs", "P99", sheet["label"].iloc[0]]
    sheet.to_csv(sheet_path, index=False)

    local = folder / "local"
    done = run_snakemake(write_config(folder, sheet_path, local))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    on_slurm = folder / "slurm"
    logs = folder / "slurm_logs"
    done = run_snakemake(
        write_config(folder, sheet_path, on_slurm),
        "--profile", str(PROJECT_ROOT / "workflow" / "profiles" / "slurm"),
        # No accounting database here: ask squeue, not sacct; and ask early.
        "--slurm-status-command", "squeue",
        "--slurm-no-account",
        "--slurm-init-seconds-before-status-checks", "2",
        "--slurm-logdir", str(logs),
        "--slurm-keep-successful-logs",
        env=cluster.env, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:] + "\n" + cluster.logs()
    return {"local": local, "slurm": on_slurm, "logs": logs, "sheet": sheet, "cluster": cluster}


def test_jobs_ran_as_slurm_jobs(runs):
    """Compute rules went through sbatch (one log per job); summaries ran locally."""
    logged = {path.name for path in runs["logs"].iterdir() if path.is_dir()}
    for rule in ("patch", "extract_features", "train", "evaluate", "heatmaps"):
        assert any(rule in name for name in logged), (rule, sorted(logged))
    for local_rule in ("splits", "compare", "preprocess_summary"):
        assert not any(local_rule in name for name in logged), (local_rule, sorted(logged))
    # Patching went in groups (one SLURM job for many slides), not one job per slide.
    patch_logs = [p for p in runs["logs"].rglob("*.log") if "patch" in str(p)]
    assert 0 < len(patch_logs) < len(runs["sheet"])


def test_gpu_rules_asked_slurm_for_a_gpu(runs):
    """Extraction and training jobs requested one GPU each (`gpu` resource → --gpus=1) on
    the configured partition; the other jobs none."""
    shown = subprocess.run(
        ["scontrol", "show", "job", "--oneliner"],
        env=runs["cluster"].env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    jobs = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in shown.splitlines() if line]
    rules = {}
    for job in jobs:
        rule = re.match(r"rule_(extract_features|train|patch|evaluate|heatmaps)", job["Comment"])
        rules.setdefault(rule[1] if rule else job["Comment"], []).append(job)
    assert {"extract_features", "train", "evaluate", "heatmaps"} <= set(rules), sorted(rules)
    for rule, submitted in rules.items():
        for job in submitted:
            assert job["Partition"] == "debug"
            asks_gpu = "gpu:1" in job.get("TresPerJob", "")
            assert asks_gpu == (rule in ("extract_features", "train")), (rule, job)


def test_every_output_on_slurm(runs):
    results = runs["slurm"]
    slides = list(runs["sheet"]["slide_id"])
    for slide in slides:
        assert (results / "patches" / f"{slide}.h5").is_file()
        assert (results / "features" / ENCODER / f"{slide}.h5").is_file()
        assert (results / "features" / ENCODER / f"{slide}.pt").is_file()
    failed = pd.read_csv(results / "preprocessing" / "failed_slides.csv")
    assert list(failed["slide_id"]) == ["broken"]
    for model in MODELS:
        for fold in range(FOLDS):
            run = results / "models" / ENCODER / model / f"fold{fold}"
            for name in ("model.pt", "predictions.csv", "metrics.json", "attention.h5", "log.csv"):
                assert (run / name).is_file(), run / name
            heatmaps = results / "eval" / ENCODER / model / "heatmaps" / f"fold{fold}"
            assert any(heatmaps.glob("*.png"))
        assert (results / "eval" / ENCODER / model / "summary.csv").is_file()
    comparison = pd.read_csv(results / "eval" / "comparison.csv")
    assert len(comparison) == len(MODELS)


def _datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as h5:
        return {name: h5[name][()] for name in h5 if isinstance(h5[name], h5py.Dataset)}


def test_slurm_outputs_equal_local(runs):
    local, on_slurm = runs["local"], runs["slurm"]
    h5_files = sorted(local.glob("patches/*.h5")) + sorted(local.glob(f"features/{ENCODER}/*.h5"))
    h5_files += sorted(local.glob("models/*/*/fold*/attention.h5"))
    assert len(h5_files) > 2 * len(runs["sheet"])
    for path in h5_files:
        mine, theirs = _datasets(path), _datasets(on_slurm / path.relative_to(local))
        assert mine.keys() == theirs.keys(), path
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name], err_msg=f"{path}:{name}")

    tables = ["splits/DATA_SPLIT.csv", "preprocessing/failed_slides.csv"]
    tables += [str(p.relative_to(local)) for p in local.glob("models/*/*/fold*/predictions.csv")]
    tables += [str(p.relative_to(local)) for p in local.glob("eval/*/*/summary.csv")]
    assert len(tables) == 2 + len(MODELS) * FOLDS + len(MODELS)
    for table in tables:
        pd.testing.assert_frame_equal(
            pd.read_csv(local / table), pd.read_csv(on_slurm / table), obj=table
        )
