"""docs/paper.md "Reproduce the paper", run as printed: the config block of that section, with its
paths pointed at a generated cohort and the training shortened (2 epochs of 4 bags instead
of 200 of 64), on features in the HMIL layout (`<slide_id>.pt`) and split pickles of the
published shape (10 splits, 80/10/10 of the slides).

Nothing is patched or extracted; every fold trains and tests on exactly the slides of the
authors' split of the same number; the runs used the paper protocol.
"""

from __future__ import annotations

import json
import re
import subprocess

import pandas as pd
import pytest
import yaml

from hmil.data.hierarchy import Hierarchy
from hmil.data.synthetic import SyntheticConfig, generate_cohort, write_cohort
from tests.conftest import PROJECT_ROOT, snakemake_command
from tests.hmil.published_pickles import PARTS, published_parts, write_published_pickles
from tests.preprocessing.feature_layouts import write_pt, write_sheet

#: 5 slides of each of BRACS's 7 classes: 35 slides, 27/4/4 per published split.
COHORT = SyntheticConfig(bags_per_class=5, feature_dim=16, min_instances=20, max_instances=40)
SHORTER = {"epochs": 2, "batch_bags": 4, "device": "cpu", "gpus": 0}


def readme_paper_config() -> dict:
    """The YAML block of docs/paper.md's "Reproduce the paper" section (the README links it)."""
    readme = (PROJECT_ROOT / "docs" / "paper.md").read_text()
    section = readme.split("# Reproduce the paper\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert block, "docs/paper.md: no yaml block under 'Reproduce the paper'"
    return yaml.safe_load(block.group(1))


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    config = readme_paper_config()
    generated = generate_cohort(Hierarchy.preset(config["hierarchy"]), COHORT)
    write_cohort(generated, root / "own")
    table = generated.table
    ids = list(table["slide_id"])
    (encoder,) = config["encoders"]
    parts = published_parts(table, splits=10)
    config.update(slides=str(write_sheet(root / "slides.csv", table)), outdir=str(root / "out"))
    config["features"]["dirs"] = {encoder: str(write_pt(root / "own", root / "pt", ids))}
    config["splits"]["from_hmil_pkls"] = str(write_published_pickles(root / "BRACS", table, parts))
    config["training"].update(SHORTER)
    config["evaluation"] = {"bootstrap": 10}
    (root / "paper.yaml").write_text(yaml.safe_dump(config))

    command = snakemake_command(root / "paper.yaml")
    command[command.index("--directory") + 1] = str(root)  # its own .snakemake
    result = subprocess.run(command, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out": root / "out", "encoder": encoder, "parts": parts, "log": result.stderr}


def test_the_readme_config_is_the_paper_setup():
    config = readme_paper_config()
    assert config["models"] == ["hmil"] and config["training"]["protocol"] == "paper"
    assert set(config["training"]) <= {"protocol", "device", "gpus"}  # nothing shortened
    assert config["splits"] == {"from_hmil_pkls": config["splits"]["from_hmil_pkls"]}
    assert list(config["features"]["dirs"]) == config["encoders"]


def test_every_fold_is_the_published_split_of_its_number(paper_run):
    out, parts = paper_run["out"], paper_run["parts"]
    splits = pd.read_csv(out / "splits" / "DATA_SPLIT.csv", dtype=str, keep_default_na=False)
    assert [c for c in splits.columns if c.startswith("fold")] == [f"fold{k}" for k in range(10)]
    sidecar = json.loads((out / "splits" / "DATA_SPLIT.json").read_text())
    assert len(sidecar["source"]["sha256"]) == 30
    for k, published in enumerate(parts):
        assert [len(published[p]) for p in PARTS] == [27, 4, 4]
        written = {p: set(splits.loc[splits[f"fold{k}"] == p, "slide_id"]) for p in PARTS}
        assert written == {p: set(ids) for p, ids in published.items()}
        run = out / "models" / paper_run["encoder"] / "hmil" / f"fold{k}"
        predictions = pd.read_csv(run / "predictions.csv", dtype={"slide_id": str})
        for part in ("val", "test"):
            predicted = set(predictions.loc[predictions["split"] == part, "slide_id"])
            assert predicted == set(published[part]), (k, part)
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["config"]["protocol"] == "paper"
        assert metrics["config"]["optimizer"] == "adam" and metrics["config"]["lr"] == 1e-4
        assert metrics["config"]["scheduler"] == "plateau"
        assert metrics["config"]["dropout"] == 0 and metrics["config"]["epochs"] == 2


def test_nothing_is_patched_and_the_comparison_holds_the_run(paper_run):
    out, log = paper_run["out"], paper_run["log"]
    assert not (out / "patches").exists() and "rule extract_features" not in log
    comparison = pd.read_csv(out / "eval" / "comparison.csv")
    assert comparison[["encoder", "model"]].values.tolist() == [[paper_run["encoder"], "hmil"]]
    assert comparison["status"].tolist() == ["ok"]
    assert "no attention heatmaps" in log  # .pt tensors carry no coordinates


def splits_plan(tmp_path, splits: dict) -> subprocess.CompletedProcess:
    """A dry run of the splits rule, its command printed, on the lint sheet of .test/."""
    config = yaml.safe_load((PROJECT_ROOT / ".test" / "config" / "config.yaml").read_text())
    config.update(
        slides=str(PROJECT_ROOT / ".test" / "config" / "slides.csv"),
        outdir=str(tmp_path / "out"),
        splits=splits,
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = snakemake_command(tmp_path / "config.yaml", "--dry-run", "--printshellcmds")
    command[command.index("--directory") + 1] = str(tmp_path)
    return subprocess.run(
        [*command, "--until", "splits"], cwd=tmp_path, capture_output=True, text=True
    )


@pytest.mark.parametrize("allow", [True, False])
def test_the_workflow_passes_allow_sparse_classes_from_its_config(tmp_path, allow):
    plan = splits_plan(tmp_path, {"folds": 2, "allow_sparse_classes": allow})
    assert plan.returncode == 0, plan.stderr[-2000:]
    (command,) = [line for line in plan.stdout.splitlines() if "python -m hmil.splits" in line]
    assert ("--allow-sparse-classes" in command) == allow
    assert "--folds 2" in command and "--from-hmil-pkls" not in command


def test_published_splits_set_the_folds_and_a_wrong_folder_is_one_line(tmp_path):
    sheet = pd.read_csv(PROJECT_ROOT / ".test" / "config" / "slides.csv")
    parts = [{"train": ["lint_a"], "val": ["lint_b"], "test": []}] * 4
    pkls = write_published_pickles(tmp_path / "pkls", sheet, parts)
    plan = splits_plan(tmp_path, {"from_hmil_pkls": str(pkls)})
    assert plan.returncode == 0, plan.stderr[-2000:]
    (command,) = [line for line in plan.stdout.splitlines() if "python -m hmil.splits" in line]
    assert f"--from-hmil-pkls {pkls} --folds 4" in command
    assert "splits_3_descriptor.csv" in plan.stdout and "splits_4" not in plan.stdout

    (pkls / "test_splits_2.pkl").unlink()
    plan = splits_plan(tmp_path, {"from_hmil_pkls": str(pkls)})
    assert plan.returncode != 0
    assert (
        f"splits.from_hmil_pkls: {pkls}: split 2 lacks test_splits_2.pkl"
        in plan.stdout + plan.stderr
    )
