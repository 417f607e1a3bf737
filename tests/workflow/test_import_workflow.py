"""The workflow from features made elsewhere: one run on a cohort given as CLAM `h5_files`
(with coordinates) for one encoder and as bare `.pt` tensors for another.

Nothing is patched or extracted; the imported features files are links; both encoders
train, evaluate and enter the comparison; heatmaps are asked only where coordinates exist,
and the other encoder gets a note instead of a crash. Both encoders hold the same numbers,
so their fold predictions must agree exactly.
"""

from __future__ import annotations

import shutil
import subprocess

import h5py
import pandas as pd
import pytest

from hmil.data.synthetic import SyntheticConfig
from tests.conftest import snakemake_command
from tests.hmil.train_cli import write_fold_cohort
from tests.preprocessing.feature_layouts import write_clam, write_pt, write_sheet
from tests.workflow.configs import write_workflow_config

COHORT = SyntheticConfig(bags_per_class=4, feature_dim=16, min_instances=20, max_instances=40)


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    cohort = write_fold_cohort(root, COHORT, 1, 1)
    shutil.copy(cohort["hierarchy"], root / "hierarchy.yaml")
    ids = list(cohort["table"]["slide_id"])
    dirs = {
        "conch_v15": str(write_clam(root / "features", root / "clam", ids)),
        "hmil_pt": str(write_pt(root / "features", root / "hmil_pt", ids)),
    }
    sheet = write_sheet(root / "slides.csv", cohort["table"])
    config = write_workflow_config(
        root / "config.yaml",
        sheet,
        root / "results",
        sections={
            "features": {"dirs": dirs},
            "splits": {"folds": 2},
            "training": {"epochs": 1, "batch_bags": 2},
            "evaluation": {"bootstrap": 10},
        },
        encoders=list(dirs),
        models=["abmil"],
    )
    command = snakemake_command(config)
    command[command.index("--directory") + 1] = str(root)  # its own .snakemake
    result = subprocess.run(command, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "results": root / "results", "ids": ids, "log": result.stderr}


def test_imported_encoders_are_never_patched_or_extracted(imported_run):
    results, log = imported_run["results"], imported_run["log"]
    assert not (results / "patches").exists() and not (results / "preprocessing").exists()
    assert "rule patch" not in log and "rule extract_features" not in log
    assert log.count("rule import_features") == 2
    for encoder in ("conch_v15", "hmil_pt"):
        summary = pd.read_csv(results / "features" / encoder / "imported.csv")
        assert (summary["status"] == "ok").all() and len(summary) == len(imported_run["ids"])
    with h5py.File(results / "features" / "conch_v15" / f"{imported_run['ids'][0]}.h5") as h5:
        assert isinstance(h5.get("features", getlink=True), h5py.ExternalLink)
        assert isinstance(h5.get("coords", getlink=True), h5py.ExternalLink)
    with h5py.File(results / "features" / "hmil_pt" / f"{imported_run['ids'][0]}.h5") as h5:
        assert "features" not in h5 and h5.attrs["features_pt"].endswith(".pt")


def test_both_encoders_train_evaluate_and_agree(imported_run):
    results = imported_run["results"]
    for fold in (0, 1):
        clam, pt = (
            pd.read_csv(results / "models" / e / "abmil" / f"fold{fold}" / "predictions.csv")
            for e in ("conch_v15", "hmil_pt")
        )
        assert len(clam) > 0
        pd.testing.assert_frame_equal(clam, pt)
    comparison = pd.read_csv(results / "eval" / "comparison.csv").set_index("encoder")
    assert sorted(comparison.index) == ["conch_v15", "hmil_pt"]
    assert (comparison["status"] == "ok").all() and (comparison["n_slides"] == 16).all()
    assert (
        comparison.loc["conch_v15", "fine_auc_mean"] == comparison.loc["hmil_pt", "fine_auc_mean"]
    )


def test_heatmaps_only_where_the_features_have_coordinates(imported_run):
    results, log = imported_run["results"], imported_run["log"]
    assert "note: the hmil_pt features in" in log and "no attention heatmaps" in log
    assert not (results / "eval" / "hmil_pt" / "abmil" / "heatmaps").exists()
    for fold in (0, 1):
        assert any(
            (results / "eval" / "conch_v15" / "abmil" / "heatmaps" / f"fold{fold}").iterdir()
        )
    # The slides themselves are absent (cards), but the geometry came from the features files.
    heatmap_log = (results / "logs" / "heatmaps" / "conch_v15" / "abmil" / "fold0.log").read_text()
    assert "file not found" in heatmap_log and "patch_size_level0" not in heatmap_log
