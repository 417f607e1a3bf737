"""The whole chain in one Snakemake run, as the demo runs it but smaller: slides → patches →
features → splits → training → evaluation → heatmaps → comparison → report.

A cohort of 30 generated slides (6 classes, patients of 1–2 slides) plus one unreadable
slide, a tiny random-weight timm encoder, two folds, HMIL and ABMIL for three epochs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml

from hmil.data.bags import rebuild_hint, shard_record_of
from preprocessing.slides.demo_cohort import write_cohort
from tests.workflow.configs import write_workflow_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENCODER = "timm:resnet10t"
MODELS = ["hmil_mb", "hmil", "abmil"]
FOLDS = 2
SHIPPED = yaml.safe_load((PROJECT_ROOT / "config" / "config.yaml").read_text())
SLIDES_PER_JOB = SHIPPED["features"]["slides_per_job"]

pytestmark = pytest.mark.workflow


def write_config(folder: Path, sheet: Path, **changes) -> Path:
    sections = {
        "features": {"weights": {ENCODER: "random"}, "batch_size": 16, "workers": 0, "threads": 1},
        "splits": {"folds": FOLDS, "val_fraction": 0.3},
        "training": {"epochs": 3, "batch_bags": 4, "patience": 3},
        "evaluation": {"bootstrap": 50, "heatmap_top_k": 4},
    }
    top = {"encoders": [ENCODER], "models": MODELS, **changes}
    return write_workflow_config(folder / "config.yaml", sheet, folder / "results", sections, **top)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, fixture_slides, run_snakemake):
    """Run the full workflow once; the tests below read what it made."""
    folder = tmp_path_factory.mktemp("chain")
    sheet_path = write_cohort(
        folder / "cohort", n_slides=30, width=2000, height=1500, seed=2,
        slides_per_patient=(2, 1, 1),
    )  # fmt: skip
    sheet = pd.read_csv(sheet_path)
    shutil.copy(fixture_slides / "unreadable.svs", folder / "cohort" / "broken.svs")
    sheet.loc[len(sheet)] = ["broken", "broken.svs", "P99", "normal"]
    sheet.to_csv(sheet_path, index=False)
    external = write_external_sheet(folder, sheet, EXTERNAL_SLIDES)
    config = write_config(
        folder, sheet_path, deploy=[{"name": "external", "slides": str(external)}]
    )
    done = run_snakemake(config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {
        "folder": folder, "config": config, "results": folder / "results", "sheet": sheet,
        "external": external,
    }  # fmt: skip


EXTERNAL_SLIDES = 3


def write_external_sheet(folder: Path, sheet: pd.DataFrame, count: int) -> Path:
    """A deployment cohort: `count` slides of the training cohort's files under new ids and
    patients (a second scan of the same glass), labelled."""
    external = sheet[sheet["slide_id"] != "broken"].head(count).copy()
    external["slide_id"] = [f"ext_{i}" for i in range(count)]
    external["patient_id"] = [f"X{i}" for i in range(count)]
    external["path"] = [str(folder / "cohort" / path) for path in external["path"]]
    path = folder / f"external_{count}.csv"
    external.to_csv(path, index=False)
    return path


def test_every_stage_wrote_its_outputs(chain):
    results = chain["results"]
    slides = list(chain["sheet"]["slide_id"])
    encoder_dir = results / "features" / ENCODER
    for slide in slides:
        assert (results / "patches" / f"{slide}.h5").is_file()
        with h5py.File(encoder_dir / f"{slide}.h5") as features:
            assert features.attrs["encoder"] == ENCODER
            assert features.attrs["weights"] == "random"
            expected = "failed" if slide == "broken" else "ok"
            assert features.attrs["status"] == expected
    splits = pd.read_csv(results / "splits" / "DATA_SPLIT.csv")
    assert set(splits["slide_id"]) == set(slides)
    for model in MODELS:
        for fold in range(FOLDS):
            run = results / "models" / ENCODER / model / f"fold{fold}"
            metrics = json.loads((run / "metrics.json").read_text())
            predictions = pd.read_csv(run / "predictions.csv")
            test_slides = set(splits.loc[splits[f"fold{fold}"] == "test", "slide_id"])
            # The unreadable slide is left out of training and evaluation, and says so.
            assert set(predictions.loc[predictions["split"] == "test", "slide_id"]) == (
                test_slides - {"broken"}
            )
            assert "broken" in metrics["excluded_slides"]
            heatmaps = results / "eval" / ENCODER / model / "heatmaps" / f"fold{fold}"
            for slide in test_slides - {"broken"}:
                assert (heatmaps / f"{slide}.png").stat().st_size > 10_000
                assert (heatmaps / f"{slide}_top.jpg").stat().st_size > 5_000
        summary = json.loads((results / "eval" / ENCODER / model / "summary.json").read_text())
        assert summary
    comparison = pd.read_csv(results / "eval" / "comparison.csv")
    assert len(comparison) == len(MODELS)
    failed = pd.read_csv(results / "preprocessing" / "failed_slides.csv")
    assert list(failed["slide_id"]) == ["broken"]


def test_rerun_has_nothing_to_do_and_report_builds(chain, run_snakemake):
    again = run_snakemake(chain["config"], "--dry-run")
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]
    report = chain["folder"] / "report.html"
    built = run_snakemake(chain["config"], "--report", str(report))
    assert built.returncode == 0, built.stderr[-2000:]
    assert report.stat().st_size > 100_000


def test_new_encoder_schedules_features_and_downstream_only(chain, run_snakemake):
    config = yaml.safe_load(chain["config"].read_text())
    config["encoders"] = [ENCODER, "timm:resnet18"]
    config["features"]["weights"]["timm:resnet18"] = "random"
    path = chain["folder"] / "two_encoders.yaml"
    path.write_text(yaml.safe_dump(config))
    plan = run_snakemake(path, "--dry-run")
    assert plan.returncode == 0, plan.stderr[-2000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", plan.stdout, re.MULTILINE))
    assert counts.get("extract_features") == str(shards(len(chain["sheet"])))
    assert counts.get("train") == str(len(MODELS) * FOLDS)
    assert counts.get("evaluate") == str(len(MODELS))
    assert "compare" in counts
    for upstream in ("patch", "preprocess_summary", "splits"):
        assert upstream not in counts, plan.stdout


def planned_jobs(plan) -> dict[str, int]:
    assert plan.returncode == 0, plan.stderr[-2000:]
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", plan.stdout, re.MULTILINE)}


def shards(n_slides: int) -> int:
    """Extraction jobs of a cohort at the shipped features.slides_per_job."""
    return -(-n_slides // SLIDES_PER_JOB)


def test_readme_rerun_examples_schedule_what_they_say(chain, run_snakemake):
    """docs/cluster.md's re-run recipes at the shipped settings: features only for a new
    encoder (--until extract_features), retraining one model (--forcerun train --until its
    summary), rebuilding one features file (--forcerun of its shard record, which the
    training error names), deploying only (--until deploy)."""
    assert SLIDES_PER_JOB > 1 and shards(len(chain["sheet"])) > 1
    results, n_shards = chain["results"], shards(len(chain["sheet"]))
    config = yaml.safe_load(chain["config"].read_text())
    assert "slides_per_job" not in config["features"] or (
        config["features"]["slides_per_job"] == SLIDES_PER_JOB
    )
    config["encoders"] = [ENCODER, "timm:resnet18"]
    config["features"]["weights"]["timm:resnet18"] = "random"
    two = chain["folder"] / "readme_two_encoders.yaml"
    two.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(run_snakemake(two, "--dry-run", "--until", "extract_features"))
    assert jobs == {"extract_features": n_shards, "total": n_shards}

    summary = results / "eval" / ENCODER / "hmil" / "summary.csv"
    jobs = planned_jobs(
        run_snakemake(chain["config"], "--dry-run", "--forcerun", "train", "--until", str(summary))
    )
    assert jobs == {"train": FOLDS, "evaluate": 1, "total": FOLDS + 1}

    feature_file = sorted((results / "features" / ENCODER).glob("*.h5"))[-1]
    record = shard_record_of(feature_file)
    assert record is not None and f"--forcerun {record}" in rebuild_hint(feature_file)
    rebuild = ["--until", "extract_features", "--forcerun", str(record)]
    jobs = planned_jobs(run_snakemake(chain["config"], "--dry-run", *rebuild))
    assert jobs == {"extract_features": 1, "total": 1}

    bigger = write_external_sheet(chain["folder"], chain["sheet"], EXTERNAL_SLIDES + 1)
    config = yaml.safe_load(chain["config"].read_text())
    config["deploy"] = [{"name": "external", "slides": str(bigger)}]
    path = chain["folder"] / "readme_deploy_only.yaml"
    path.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(run_snakemake(path, "--dry-run", "--until", "deploy"))
    assert jobs == {
        "deploy_patch": 1, "deploy_extract_features": 1, "deploy": len(MODELS),
        "total": 2 + len(MODELS),
    }  # fmt: skip


@pytest.mark.parametrize("strict", [False, True])
def test_failed_model_runs_are_recorded_unless_strict(chain, run_snakemake, strict):
    """Outside strict mode a failing fold is recorded (tests/hmil/test_failed_runs.py shows
    evaluation and comparison then name it); in strict mode it stops the run."""
    config = yaml.safe_load(chain["config"].read_text())
    config["strict"] = strict
    path = chain["folder"] / f"strict_{strict}.yaml"
    path.write_text(yaml.safe_dump(config))
    plan = run_snakemake(path, "--dry-run", "--printshellcmds", "--forcerun", "train")
    assert plan.returncode == 0, plan.stderr[-2000:]
    train = [line for line in plan.stdout.splitlines() if "python -m hmil.train" in line]
    evaluate = [line for line in plan.stdout.splitlines() if "python -m hmil.evaluate" in line]
    assert train and evaluate
    expected = "--on-error fail" if strict else "--on-error record"
    assert all(expected in line for line in train)
    assert all(("--strict" in line) == strict for line in evaluate)
    assert all(("--on-error record" in line) != strict for line in evaluate)


def test_deployment_predicts_the_external_cohort_with_the_fold_ensemble(chain):
    results = chain["results"]
    external = pd.read_csv(chain["external"])
    for model in MODELS:
        deployed = results / "deploy" / "external" / ENCODER / model
        predictions = pd.read_csv(deployed / "predictions.csv").set_index("slide_id")
        assert sorted(predictions.index) == sorted(external["slide_id"])
        fine = [c.removeprefix("p_fine_") for c in predictions.columns if c.startswith("p_fine_")]
        for name in fine:
            folds = [predictions[f"fold{k}_p_fine_{name}"] for k in range(FOLDS)]
            expected = sum(folds) / FOLDS
            assert (predictions[f"p_fine_{name}"] - expected).abs().max() < 1e-6
        summary = json.loads((deployed / "summary.json").read_text())
        assert summary["folds_used"] == list(range(FOLDS)) and summary["n_labelled"] == 3
        assert summary["features"]["encoder"] == ENCODER
        # the heatmaps sit on the deployed slide's tissue: the attention's squares are the
        # patches of that slide's own tissue grid
        with h5py.File(deployed / "attention.h5") as attention:
            for slide in external["slide_id"]:
                patches = results / "deploy" / "external" / "patches" / f"{slide}.h5"
                with h5py.File(patches) as grid:
                    assert (attention[slide]["coords"][()] == grid["coords"][()]).all()
                    assert (grid["tissue_fraction"][()] >= grid.attrs["min_tissue"]).all()
                    assert len(grid["coords"]) > 0
                assert (deployed / "heatmaps" / f"{slide}.png").stat().st_size > 1000
    comparison = (results / "eval" / "comparison.md").read_text()
    assert "## External validation" in comparison
    assert f"external: {ENCODER}/hmil" in comparison


def test_adding_an_external_slide_deploys_it_and_trains_nothing(chain, run_snakemake):
    """A fourth slide on the external sheet: its patching and encoding, the deployments and
    what reads them; no training, no training-cohort job."""
    bigger = write_external_sheet(chain["folder"], chain["sheet"], EXTERNAL_SLIDES + 1)
    config = yaml.safe_load(chain["config"].read_text())
    config["deploy"] = [{"name": "external", "slides": str(bigger)}]
    path = chain["folder"] / "bigger_external.yaml"
    path.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(run_snakemake(path, "--dry-run"))
    deployments = len(MODELS)
    assert jobs == {
        "deploy_patch": 1, "deploy_extract_features": 1, "deploy": deployments,
        "deploy_heatmaps": deployments, "compare": 1, "all": 1, "total": 4 + 2 * deployments,
    }, jobs  # fmt: skip
