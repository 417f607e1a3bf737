"""Deployment (`python -m hmil.deploy`): the fold models' ensemble on another sheet.

Two fold models of a small generated cohort are trained once; every test deploys them
and checks the outputs against numbers recomputed here (the models run by hand,
scikit-learn's AUC), and bad input against one error line.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from hmil.data.hierarchy import Hierarchy
from hmil.data.synthetic import SyntheticConfig
from hmil.deploy import main
from hmil.predict import DEPRECATION
from hmil.train import main as train_main
from plumbing.cli import run_cli
from tests.hmil.train_cli import write_fold_cohort

ROOT = Path(__file__).resolve().parents[2]
COHORT = SyntheticConfig(
    bags_per_class=8, feature_dim=16, min_instances=20, max_instances=40,
    min_key_fraction=0.2, max_key_fraction=0.3, signal=6.0, fine_offset=3.0, seed=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cohort, its two fold models (hmil and abmil) and a deployment sheet of all slides."""
    root = tmp_path_factory.mktemp("deploy")
    cohort = write_fold_cohort(root, COHORT, 2, 2)
    table = pd.read_csv(cohort["splits"])
    table["fold1"] = table["fold0"].map({"test": "val", "val": "test", "train": "train"})
    table.to_csv(cohort["splits"], index=False)
    runs = {}
    for model in ("hmil", "abmil"):
        runs[model] = []
        for fold in (0, 1):
            out = root / "models" / "synthetic" / model / f"fold{fold}"
            args = [
                "--features", str(root / "features"), "--splits", str(cohort["splits"]),
                "--fold", str(fold), "--model", model, "--hierarchy", str(cohort["hierarchy"]),
                "--out", str(out), "--epochs", "2", "--batch-bags", "4", "--seed", str(fold),
            ]  # fmt: skip
            with pytest.raises(SystemExit) as exit_info:
                run_cli(train_main, args)
            assert exit_info.value.code == 0
            runs[model].append(out)
    sheet = root / "external.csv"
    pd.DataFrame(
        {
            "slide_id": table["slide_id"],
            "path": [f"slides/{s}.svs" for s in table["slide_id"]],
            "patient_id": table["patient_id"],
            "label": table["label"],
        }
    ).to_csv(sheet, index=False)
    return {**cohort, "runs": runs, "sheet": sheet, "table": table}


def deploy(trained, out, *extra, model="hmil", runs=None, sheet=None, features=None):
    args = [
        *map(str, runs or trained["runs"][model]),
        "--slides", str(sheet or trained["sheet"]),
        "--features", str(features or trained["root"] / "features"),
        "--out", str(out), "--bootstrap", "200", *extra,
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args)
    return exit_info.value.code


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def run_model(run_dir, features):
    from hmil.evaluation.fold_models import load_fold_model

    model = load_fold_model(run_dir, torch.device("cpu"))
    with torch.no_grad():
        output = model.module(torch.from_numpy(features))
    return output


def read_features(trained, slide_id):
    with h5py.File(trained["root"] / "features" / f"{slide_id}.h5", "r") as file:
        return file["features"][()]


@pytest.mark.parametrize("model", ["hmil", "abmil"])
def test_ensemble_is_the_mean_of_the_fold_models(trained, tmp_path, model):
    assert deploy(trained, tmp_path, model=model) == 0
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert len(predictions) == len(trained["table"])
    assert set(predictions["split"]) == {"deploy"}
    fine = Hierarchy.from_yaml(trained["hierarchy"]).fine
    for name in fine:
        folds = predictions[[f"fold0_p_fine_{name}", f"fold1_p_fine_{name}"]].to_numpy()
        np.testing.assert_allclose(predictions[f"p_fine_{name}"], folds.mean(axis=1), atol=1e-6)
    # each fold's column is that model's own output, recomputed here
    slide_id = predictions["slide_id"].iloc[3]
    features = read_features(trained, slide_id)
    outputs = [run_model(run, features) for run in trained["runs"][model]]
    row = predictions.set_index("slide_id").loc[slide_id]
    for fold, output in enumerate(outputs):
        expected = output.fine_probs().numpy()
        got = row[[f"fold{fold}_p_fine_{name}" for name in fine]].to_numpy(dtype=float)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (
        row["pred_fine"]
        == fine[int(np.mean([o.fine_probs().numpy() for o in outputs], 0).argmax())]
    )
    # attention: the folds' attention averaged per patch, with the features' coordinates
    with h5py.File(tmp_path / "attention.h5", "r") as file:
        group = file[slide_id]
        mean_attention = np.mean([o.fine_attention.numpy() for o in outputs], axis=0)
        np.testing.assert_allclose(group["fine_attention"][()], mean_attention, atol=1e-6)
        assert group["coords"].shape == (len(features), 2)
        assert list(file.attrs["ensemble_folds"]) == [0, 1]
    coarse_head = predictions[[c for c in predictions.columns if c.startswith("p_coarse_")]]
    assert coarse_head.notna().all().all() == (model == "hmil")


def test_labelled_metrics_agree_with_scikit_learn(trained, tmp_path):
    assert deploy(trained, tmp_path) == 0
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    fine = list(Hierarchy.from_yaml(trained["hierarchy"]).fine)
    expected = roc_auc_score(
        predictions["fine_label"].map(fine.index),
        predictions[[f"p_fine_{c}" for c in fine]].to_numpy(),
        multi_class="ovr",
        average="macro",
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kind"] == "external"
    assert summary["headline"]["fine"]["auc"]["pooled"] == pytest.approx(expected, abs=1e-9)
    low, high = (summary["headline"]["fine"]["auc"][k] for k in ("ci_low", "ci_high"))
    assert low <= expected <= high
    fold_aucs = [
        roc_auc_score(
            predictions["fine_label"].map(fine.index),
            predictions[[f"fold{k}_p_fine_{c}" for c in fine]].to_numpy(),
            multi_class="ovr",
        )
        for k in (0, 1)
    ]
    assert summary["headline"]["fine"]["auc"]["mean"] == pytest.approx(np.mean(fold_aucs))
    for figure in ("roc_fine.png", "confusion_fine.png", "roc_coarse_from_fine.png"):
        assert (tmp_path / figure).stat().st_size > 1000
    assert "External validation" in (tmp_path / "summary.md").read_text()


def test_unlabelled_sheet_gives_predictions_only(trained, tmp_path):
    """Nor does it need the slide files: features and ids are enough."""
    sheet = tmp_path / "unlabelled.csv"
    pd.read_csv(trained["sheet"]).drop(columns=["label", "path"]).to_csv(sheet, index=False)
    assert deploy(trained, tmp_path / "out", sheet=sheet) == 0
    predictions = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert predictions["fine_label"].isna().all() and predictions["pred_fine"].notna().all()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "headline" not in summary and summary["n_labelled"] == 0
    assert not (tmp_path / "out" / "roc_fine.png").exists()


def test_unknown_label_is_one_error_line(trained, tmp_path, capsys):
    sheet = tmp_path / "typo.csv"
    table = pd.read_csv(trained["sheet"])
    table.loc[2, "label"] = "a3"
    table.to_csv(sheet, index=False)
    assert deploy(trained, tmp_path / "out", sheet=sheet) == 1
    line = error_line(capsys)
    assert "typo.csv" in line and "a3" in line and table.loc[2, "slide_id"] in line
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_features_of_another_encoder_or_dimension_are_refused(trained, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(trained["root"] / "features", other)
    victim = other / f"{trained['table']['slide_id'].iloc[0]}.h5"
    with h5py.File(victim, "a") as file:
        file.attrs["encoder"] = "uni"
    assert deploy(trained, tmp_path / "out", features=other) == 1
    line = error_line(capsys)
    assert str(victim) in line and "encoder uni" in line and "synthetic" in line

    wide = tmp_path / "wide"
    wide.mkdir()
    for slide_id in trained["table"]["slide_id"]:
        torch.save(torch.randn(5, 24), wide / f"{slide_id}.pt")
    assert deploy(trained, tmp_path / "out", features=wide) == 1
    assert "24-d features but the models take 16-d" in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_failed_fold_is_left_out_and_named_strict_fails(trained, tmp_path, capsys):
    runs = [tmp_path / "fold0", tmp_path / "fold1"]
    for source, target in zip(trained["runs"]["hmil"], runs, strict=True):
        shutil.copytree(source, target)
    (runs[1] / "metrics.json").write_text(json.dumps({"status": "failed", "reason": "OOM"}))
    assert deploy(trained, tmp_path / "out", runs=runs) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["folds_used"] == [0]
    assert summary["missing_folds"][0]["fold"] == 1
    assert "OOM" in summary["missing_folds"][0]["reason"]
    predictions = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert not any(c.startswith("fold1_") for c in predictions.columns)
    assert "Missing folds" in (tmp_path / "out" / "summary.md").read_text()

    assert deploy(trained, tmp_path / "strict", "--strict", runs=runs) == 1
    assert "OOM" in error_line(capsys)


def test_slide_without_features_is_recorded_and_the_rest_go_on(trained, tmp_path, capsys):
    features = tmp_path / "features"
    shutil.copytree(trained["root"] / "features", features)
    missing = trained["table"]["slide_id"].iloc[5]
    (features / f"{missing}.h5").unlink()
    assert deploy(trained, tmp_path / "out", features=features) == 0
    failed = pd.read_csv(tmp_path / "out" / "failed_slides.csv")
    assert failed["slide_id"].tolist() == [missing]
    predictions = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(predictions) == len(trained["table"]) - 1
    assert deploy(trained, tmp_path / "strict", "--strict", features=features) == 1
    assert missing in error_line(capsys)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert deploy(trained, tmp_path / "none", features=empty) == 1
    line = error_line(capsys)
    assert str(empty) in line and "none of the" in line


def test_old_command_name_runs_deploy_with_one_deprecation_note(trained, tmp_path):
    """`python -m hmil.predict` stays for one release: the same predictions, a note on stderr."""
    assert deploy(trained, tmp_path / "new", "--bootstrap", "0") == 0
    args = [
        *map(str, trained["runs"]["hmil"]), "--slides", str(trained["sheet"]),
        "--features", str(trained["root"] / "features"), "--out", str(tmp_path / "old"),
        "--bootstrap", "0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "hmil.predict", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if "deprecated" in line]
    assert notes == [DEPRECATION]
    assert "python -m hmil.deploy" in DEPRECATION
    old = pd.read_csv(tmp_path / "old" / "predictions.csv")
    pd.testing.assert_frame_equal(old, pd.read_csv(tmp_path / "new" / "predictions.csv"))
