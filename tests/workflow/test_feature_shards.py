"""features.slides_per_job: extraction jobs of several slides, each slide its own files.

A cohort of three generated slides and one whose level-0 tiles are garbled, in shards of two:
the damaged slide is recorded as failed (more of its patches unreadable than the config
allows; count and fraction in degraded_slides.csv) while its shard-mate and the other shard
complete, and re-running one slide re-runs its shard only.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import h5py
import pandas as pd
import pytest

from hmil.data.bags import rebuild_hint, shard_record_of
from preprocessing.slides.demo_cohort import write_cohort
from tests.conftest import snakemake_command
from tests.preprocessing.test_unreadable_patches import write_damaged_slide
from tests.workflow.configs import write_workflow_config

ENCODER = "stain_texture"


def run_in(folder: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    """The project's snakemake command with `folder` as working directory (its .snakemake)."""
    command = snakemake_command(config, *extra)
    command[command.index("--directory") + 1] = str(folder)
    return subprocess.run(command, cwd=folder, capture_output=True, text=True)


def planned_jobs(plan: subprocess.CompletedProcess) -> dict[str, int]:
    """rule -> job count of a dry run's job table."""
    output = plan.stdout + plan.stderr
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", output, re.M)}


def planned_outputs(plan: subprocess.CompletedProcess, folder: str) -> list[str]:
    """The outputs of a dry run's jobs that lie in a folder named `folder`."""
    outputs = re.findall(r"^\s+output: (.+)$", plan.stdout, re.M)
    paths = [path for line in outputs for path in line.split(", ")]
    return sorted(path for path in paths if Path(path).parent.name == folder)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    sheet_path = write_cohort(
        folder / "cohort", n_slides=3, width=3000, height=2000, seed=7, slides_per_patient=(1,)
    )
    write_damaged_slide(folder / "cohort" / "damaged.tiff", large=True)
    sheet = pd.read_csv(sheet_path)
    sheet.loc[len(sheet)] = ["damaged", "damaged.tiff", "P98", sheet.loc[0, "label"]]
    sheet.to_csv(sheet_path, index=False)
    # max_unreadable_fraction: the damaged slide loses 8 of its 139 patches (5.8 %)
    features = {
        "slides_per_job": 2,
        "max_unreadable_fraction": 0.05,
        "workers": 0,
        "batch_size": 16,
        "threads": 1,
    }
    config = write_workflow_config(
        folder / "config.yaml",
        sheet_path,
        folder / "results",
        {"features": features},
        encoders=[ENCODER],
        models=["abmil"],
    )
    target = folder / "results" / "preprocessing" / "degraded_slides.csv"
    done = run_in(folder, config, str(target))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return {"folder": folder, "config": config, "results": folder / "results", "target": target}


@pytest.mark.workflow
def test_shards_write_every_slide_and_record_the_damaged_one(sharded):
    results = sharded["results"]
    features = results / "features" / ENCODER
    slides = ["slide_000", "slide_001", "slide_002", "damaged"]
    assert sorted(p.name for p in features.glob("*.h5")) == sorted(f"{s}.h5" for s in slides)
    assert all((features / f"{slide}.pt").is_file() for slide in slides)
    logs = results / "logs" / "features" / ENCODER
    assert sorted(p.name for p in logs.glob("*.log")) == ["shard0.log", "shard1.log"]
    for slide in slides:
        with h5py.File(features / f"{slide}.h5") as h5:
            status, skipped = h5.attrs["status"], int(h5.attrs["n_skipped"])
        assert (status, skipped > 0) == (("failed", True) if slide == "damaged" else ("ok", False))
    table = pd.read_csv(sharded["target"])
    assert list(table["slide_id"]) == ["damaged"] and table.loc[0, "status"] == "failed"
    assert (table.loc[0, "n_unreadable"], table.loc[0, "n_patches"]) == (8, 139)
    assert table.loc[0, "unreadable_fraction"] == pytest.approx(8 / 139, abs=1e-4)
    assert "more than the 5% allowed" in table.loc[0, "status_reason"]


@pytest.mark.workflow
def test_shard_records_list_their_slides(sharded):
    shards = sharded["results"] / "features" / ENCODER / "shards"
    records = {p.name: pd.read_csv(p) for p in sorted(shards.glob("*.csv"))}
    assert sorted(records) == ["shard0.csv", "shard1.csv"]
    assert list(records["shard0.csv"]["slide_id"]) == ["slide_000", "slide_001"]
    shard1 = records["shard1.csv"].set_index("slide_id")
    assert list(shard1.index) == ["slide_002", "damaged"]
    assert list(shard1["status"]) == ["ok", "failed"]
    assert "more than the 5% allowed" in shard1.loc["damaged", "reason"]


@pytest.mark.workflow
def test_rerunning_one_slide_reruns_its_shard_only(sharded):
    """A damaged file's training error names the shard record to force (rebuild_hint);
    forcing it plans that shard and the summary that reads it, nothing else."""
    victim = sharded["results"] / "features" / ENCODER / "slide_002.h5"
    record = shard_record_of(victim)
    assert record == victim.parent / "shards" / "shard1.csv"
    assert f"--forcerun {record}" in rebuild_hint(victim)
    plan = run_in(
        sharded["folder"], sharded["config"], "--dry-run", str(sharded["target"]),
        "--forcerun", str(record),
    )  # fmt: skip
    assert plan.returncode == 0, (plan.stdout + plan.stderr)[-2000:]
    assert planned_jobs(plan) == {"extract_features": 1, "feature_summary": 1, "total": 2}
    assert planned_outputs(plan, "shards") == [str(record)]


@pytest.mark.workflow
def test_a_slide_added_at_the_end_leaves_the_earlier_shards_alone(sharded):
    """A fifth slide at the end of the sheet starts shard 2: its patching and that shard;
    shards 0 and 1 stay as they are."""
    sheet_path = sharded["folder"] / "cohort" / "slides.csv"
    original = sheet_path.read_text()
    sheet = pd.read_csv(sheet_path)
    sheet.loc[len(sheet)] = ["added", sheet.loc[0, "path"], "P97", sheet.loc[0, "label"]]
    try:
        sheet.to_csv(sheet_path, index=False)
        plan = run_in(sharded["folder"], sharded["config"], "--dry-run", str(sharded["target"]))
    finally:
        sheet_path.write_text(original)
    assert plan.returncode == 0, (plan.stdout + plan.stderr)[-2000:]
    jobs = planned_jobs(plan)
    assert jobs == {"patch": 1, "extract_features": 1, "feature_summary": 1, "total": 3}, jobs
    shards = sharded["results"] / "features" / ENCODER / "shards"
    assert planned_outputs(plan, "shards") == [str(shards / "shard2.csv")]


@pytest.mark.workflow
@pytest.mark.parametrize("slides_per_job", [1, 2])
def test_deployed_cohort_slides_keep_one_job_each(sharded, slides_per_job):
    """deploy_extract_features inherits extract_features' rule: it must still match the
    deployed cohort's slides whether the training cohort is sharded or not."""
    folder = sharded["folder"]
    external = folder / "external.csv"
    slide = folder / "cohort" / pd.read_csv(folder / "cohort" / "slides.csv").loc[0, "path"]
    pd.DataFrame({"slide_id": ["ext_0"], "path": [str(slide)]}).to_csv(external, index=False)
    config = write_workflow_config(
        folder / f"deploy_{slides_per_job}.yaml",
        folder / "cohort" / "slides.csv",
        sharded["results"],
        {"features": {"slides_per_job": slides_per_job}},
        encoders=[ENCODER],
        models=["abmil"],
        deploy=[{"name": "external", "slides": str(external)}],
    )
    jobs = planned_jobs(run_in(folder, config, "--dry-run"))
    assert jobs.get("deploy_extract_features") == 1, jobs
