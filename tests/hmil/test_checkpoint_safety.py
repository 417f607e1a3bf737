"""Checkpoints a user hands to a command (a fold's model.pt to deploy, an MHIM teacher) are
read as tensors and plain data only: one made to run a command is refused, and it never runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hmil.data.synthetic import SyntheticConfig
from hmil.evaluation.fold_models import UnusableFold, load_fold_model
from hmil.models import create_model
from hmil.models.mhim import TeacherError, load_teacher
from tests.hmil.train_cli import one_error_line, write_fold_cohort

SMALL = SyntheticConfig(bags_per_class=4, feature_dim=8, min_instances=10, max_instances=20)


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def booby_trapped_model(path, marker) -> None:
    """A model.pt-shaped checkpoint whose loading with full unpickling runs `touch marker`."""
    torch.save({"state_dict": {}, "model": "abmil", "note": RunsACommand(marker)}, path)


def test_the_trap_is_live_with_full_unpickling(tmp_path):
    marker = tmp_path / "MARKER"
    booby_trapped_model(tmp_path / "model.pt", marker)
    loader = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", loader, str(tmp_path / "model.pt")], check=True)
    assert marker.exists()


def test_deployment_refuses_a_model_that_would_run_a_command(tmp_path):
    marker = tmp_path / "MARKER"
    run_dir = tmp_path / "fold0"
    run_dir.mkdir()
    booby_trapped_model(run_dir / "model.pt", marker)
    fold = load_fold_model(run_dir, torch.device("cpu"))
    assert isinstance(fold, UnusableFold)
    assert fold.reason.startswith(f"{run_dir / 'model.pt'}: cannot read checkpoint (refused:")
    assert "\n" not in fold.reason
    assert not marker.exists()


def test_a_teacher_that_would_run_a_command_is_refused(tiny_hierarchy, tmp_path):
    marker = tmp_path / "MARKER"
    booby_trapped_model(tmp_path / "teacher.pt", marker)
    model = create_model("mhim_abmil", 8, tiny_hierarchy)
    with pytest.raises(TeacherError) as error:
        load_teacher(model, tmp_path / "teacher.pt", 8, list(tiny_hierarchy.fine), fold=0)
    assert "cannot read teacher checkpoint (refused: it holds objects other than" in str(
        error.value
    )
    assert not marker.exists()


def test_training_does_not_resume_from_a_last_pt_that_would_run_a_command(tmp_path, capsys):
    cohort = write_fold_cohort(tmp_path, SMALL, 1, 1)
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "MARKER"
    booby_trapped_model(out / "last.pt", marker)
    args = [
        "--features", str(cohort["root"] / "features"), "--splits", str(cohort["splits"]),
        "--fold", "0", "--model", "abmil", "--hierarchy", str(cohort["hierarchy"]),
        "--out", str(out), "--epochs", "1", "--batch-bags", "2",
    ]  # fmt: skip
    line = one_error_line(capsys, args)
    assert line == (
        f"error: {out / 'last.pt'}: cannot read checkpoint (refused: it holds objects other "
        "than tensors and plain data (not loaded, nothing in it was run))"
    )
    assert not marker.exists()
