"""`--resources gpu=G` against the GPUs jobs can claim (HMIL_GPU_DEVICES fakes them here)."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

NOTE = "note: --resources gpu="


def gpu_config(tmp_path, gpus: int):
    config = {
        "slides": str(PROJECT_ROOT / ".test" / "config" / "slides.csv"),
        "hierarchy": "bracs",
        "outdir": str(tmp_path / "results"),
        "deploy": [],
        "features": {"gpus": gpus},
    }
    path = tmp_path / f"gpus_{gpus}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("gpus", "asked", "devices", "expected"),
    [
        (1, 3, "0,1", "note: --resources gpu=3 but 2 GPU(s) here"),
        (1, 2, "0,1", None),
        (1, 1, "", "note: --resources gpu=1 but no GPU found here"),
        (0, 3, "0,1", None),  # no rule asks for a GPU
    ],
)
def test_more_gpus_asked_than_found_is_one_note(
    tmp_path, run_snakemake, gpus, asked, devices, expected
):
    env = {**os.environ, "HMIL_GPU_DEVICES": devices, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("SLURM_JOB_ID", None)
    plan = run_snakemake(
        gpu_config(tmp_path, gpus), "--dry-run", "--resources", f"gpu={asked}", env=env
    )
    assert plan.returncode == 0, plan.stderr[-2000:]
    notes = [line for line in plan.stderr.splitlines() if line.startswith(NOTE)]
    assert notes == ([] if expected is None else [notes[0]])
    if expected is not None:
        assert notes[0].startswith(expected)
