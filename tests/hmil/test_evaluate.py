"""hmil.evaluate and hmil.evaluation.metrics: metrics equal scikit-learn's, fold statistics and
bootstrap CIs, classes absent from a fold, missing folds, flat models, and a real run."""

import json
import logging
import math

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from hmil.evaluate import main
from hmil.evaluation.metrics import (
    bootstrap_level,
    bootstrap_weights,
    fold_mean_std,
    level_metrics,
    patient_groups,
    percentile_ci,
)
from hmil.training.selection_metrics import classification_metrics, macro_auc
from plumbing.cli import run_cli

FINE = ("a1", "a2", "b1")
COARSE = ("A", "B")
COARSE_OF_FINE = np.array([0, 0, 1])  # a1, a2 → A; b1 → B
MEMBERSHIP = np.eye(2)[COARSE_OF_FINE]  # [3, 2]
HIERARCHY = {"name": "tiny3", "coarse": list(COARSE), "fine": {"a1": "A", "a2": "A", "b1": "B"}}
ABSENT = "n/a: class absent from test set"


def noisy_probs(labels: np.ndarray, num_classes: int, rng, signal: float = 1.5) -> np.ndarray:
    """Softmax of Gaussian logits with the true class raised by ``signal``."""
    logits = rng.normal(size=(len(labels), num_classes))
    logits[np.arange(len(labels)), labels] += signal
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def predictions_frame(fine_labels, fine_probs, coarse_probs=None, patients=None, prefix="s"):
    """A predictions.csv table as hmil.train writes it (test rows, plus two val rows that
    evaluation must ignore)."""
    fine_labels = np.asarray(fine_labels)
    count = len(fine_labels)
    if patients is None:
        patients = [f"p_{prefix}{i}" for i in range(count)]
    frame = pd.DataFrame(
        {
            "slide_id": [f"{prefix}{i:03d}" for i in range(count)],
            "patient_id": patients,
            "split": "test",
            "fine_label": [FINE[i] for i in fine_labels],
            "coarse_label": [COARSE[i] for i in COARSE_OF_FINE[fine_labels]],
        }
    )
    from_fine = fine_probs @ MEMBERSHIP
    for index, name in enumerate(FINE):
        frame[f"p_fine_{name}"] = fine_probs[:, index]
    for index, name in enumerate(COARSE):
        frame[f"p_coarse_{name}"] = coarse_probs[:, index] if coarse_probs is not None else math.nan
    for index, name in enumerate(COARSE):
        frame[f"p_coarse_from_fine_{name}"] = from_fine[:, index]
    frame["pred_fine"] = [FINE[i] for i in fine_probs.argmax(axis=1)]
    frame["pred_coarse"] = [COARSE[i] for i in from_fine.argmax(axis=1)]
    frame["pred_coarse_from_fine"] = [COARSE[i] for i in from_fine.argmax(axis=1)]
    val = frame.iloc[:2].copy()
    val["split"] = "val"
    val["slide_id"] = val["slide_id"] + "_val"
    val["fine_label"] = "a1"
    return pd.concat([frame, val], ignore_index=True)


def write_run(run_dir, frame, fold, log_rows=4):
    """A fold directory: predictions.csv, metrics.json (hierarchy, best epoch), log.csv."""
    run_dir.mkdir(parents=True)
    frame.to_csv(run_dir / "predictions.csv", index=False)
    metrics = {"config": {"fold": fold, "hierarchy": HIERARCHY}, "best_epoch": 1}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    epochs = np.arange(log_rows)
    pd.DataFrame(
        {
            "epoch": epochs,
            "train_fine_ce": 1.0 / (epochs + 1),
            "train_coarse_ce": 0.5 / (epochs + 1),
            "train_loss": 1.5 / (epochs + 1),
            "val_loss": 1.6 / (epochs + 1),
            "val_fine_auc": 0.5 + 0.1 * epochs,
            "val_coarse_auc": 0.6 + 0.05 * epochs,
        }
    ).to_csv(run_dir / "log.csv", index=False)
    return run_dir


def make_cohort(root, seed=0, sizes=(30, 24), flat=False, drop_class_in_fold=None):
    """Fold dirs root/models/enc/mod/fold{k} with noisy hand-built predictions."""
    rng = np.random.default_rng(seed)
    run_dirs = []
    for fold, size in enumerate(sizes):
        labels = np.arange(size) % 3
        if drop_class_in_fold == fold:
            labels = np.where(labels == 0, 1 + np.arange(size) % 2, labels)
        fine = noisy_probs(labels, 3, rng)
        coarse = None if flat else noisy_probs(COARSE_OF_FINE[labels], 2, rng)
        # Two slides per patient: patients, not slides, are the bootstrap unit.
        patients = [f"f{fold}_p{i // 2}" for i in range(size)]
        frame = predictions_frame(labels, fine, coarse, patients, prefix=f"f{fold}_")
        run_dirs.append(write_run(root / "models" / "enc" / "mod" / f"fold{fold}", frame, fold))
    return run_dirs


def evaluate(run_dirs, out, *extra):
    assert main([*map(str, run_dirs), "--out", str(out), "--bootstrap", "200", *extra]) == 0
    return out


def test_png(path):
    """A real, non-blank PNG."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05, f"{path} looks blank"


test_png.__test__ = False  # a helper, not a test


# ---- metrics against scikit-learn -----------------------------------------------------------


def test_metrics_equal_scikit_learn_per_fold_and_pooled(tmp_path):
    run_dirs = make_cohort(tmp_path)
    out = evaluate(run_dirs, tmp_path / "eval")
    per_fold = pd.read_csv(out / "metrics_per_fold.csv")
    summary = pd.read_csv(out / "summary.csv")
    per_class = pd.read_csv(out / "per_class.csv", dtype={"fold": str}, keep_default_na=False,
                            na_values=[""])  # fmt: skip
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert sorted(oof["fold"].unique()) == [0, 1] and len(oof) == 30 + 24
    assert set(oof["split"]) == {"test"}  # val rows ignored

    def level_arrays(table, level):
        if level == "fine":
            return table["fine_label"].map(FINE.index).to_numpy(), table[
                [f"p_fine_{c}" for c in FINE]
            ].to_numpy()
        prefix = "p_coarse_" if level == "coarse" else "p_coarse_from_fine_"
        return table["coarse_label"].map(COARSE.index).to_numpy(), table[
            [f"{prefix}{c}" for c in COARSE]
        ].to_numpy()

    for level in ("fine", "coarse", "coarse_from_fine"):
        parts = [(str(k), oof[oof["fold"] == k]) for k in (0, 1)] + [("pooled", oof)]
        fold_values = {}
        for fold, table in parts:
            labels, probs = level_arrays(table, level)
            predicted = probs.argmax(axis=1)
            expected = {
                "accuracy": accuracy_score(labels, predicted),
                "balanced_accuracy": balanced_accuracy_score(labels, predicted),
                "auc": roc_auc_score(labels, probs, multi_class="ovr", average="macro")
                if probs.shape[1] > 2
                else roc_auc_score(labels, probs[:, 1]),
                "f1": f1_score(labels, predicted, average="macro"),
            }
            if fold == "pooled":
                got = summary[summary["level"] == level].set_index("metric")["pooled"]
            else:
                got = per_fold[(per_fold["fold"] == int(fold)) & (per_fold["level"] == level)]
                got = got.iloc[0]
                fold_values[fold] = got
            for name, value in expected.items():
                assert got[name] == pytest.approx(value, abs=1e-12), (level, fold, name)
            # Per class: precision/recall/F1 and one-vs-rest AUC.
            precision, recall, f1, support = precision_recall_fscore_support(labels, predicted)
            rows = per_class[(per_class["level"] == level) & (per_class["fold"] == fold)]
            np.testing.assert_allclose(rows["precision"], precision, atol=1e-12)
            np.testing.assert_allclose(rows["recall"], recall, atol=1e-12)
            np.testing.assert_allclose(rows["f1"], f1, atol=1e-12)
            np.testing.assert_array_equal(rows["support"], support)
            aucs = [roc_auc_score(labels == c, probs[:, c]) for c in range(probs.shape[1])]
            np.testing.assert_allclose(rows["auc"], aucs, atol=1e-12)
            matrix = confusion_matrix(labels, predicted)
            specificity = [
                (matrix.sum() - matrix[c].sum() - matrix[:, c].sum() + matrix[c, c])
                / (matrix.sum() - matrix[c].sum())
                for c in range(len(matrix))
            ]
            np.testing.assert_allclose(rows["specificity"], specificity, atol=1e-12)
            if fold == "pooled":
                confusion = pd.read_csv(out / f"confusion_{level}.csv", index_col=0)
                np.testing.assert_array_equal(confusion.to_numpy(), matrix)
        # Mean ± sample std over the two folds.
        level_summary = summary[summary["level"] == level].set_index("metric")
        for name in ("accuracy", "auc", "f1"):
            values = [fold_values[k][name] for k in ("0", "1")]
            assert level_summary.loc[name, "mean"] == pytest.approx(np.mean(values))
            assert level_summary.loc[name, "std"] == pytest.approx(np.std(values, ddof=1))
            assert level_summary.loc[name, "n_folds"] == 2
    # Binary levels report sensitivity (2nd class) and specificity (1st class).
    binary = summary[summary["level"] == "coarse"].set_index("metric")
    labels, probs = level_arrays(oof, "coarse")
    recalls = precision_recall_fscore_support(labels, probs.argmax(axis=1))[1]
    assert binary.loc["sensitivity", "pooled"] == pytest.approx(recalls[1])
    assert binary.loc["specificity", "pooled"] == pytest.approx(recalls[0])
    # Plots and provenance.
    for level in ("fine", "coarse", "coarse_from_fine"):
        test_png(out / f"roc_{level}.png")
        test_png(out / f"confusion_{level}.png")
    test_png(out / "training_curves.png")
    payload = json.loads((out / "summary.json").read_text())
    assert (payload["encoder"], payload["model"]) == ("enc", "mod")
    assert payload["folds_used"] == [0, 1] and payload["missing_folds"] == []
    assert payload["params"] == {"bootstrap": 200, "seed": 0, "strict": False}
    assert payload["code_version"]
    assert payload["headline"]["fine"]["auc"]["pooled"] == pytest.approx(
        summary.set_index(["level", "metric"]).loc[("fine", "auc"), "pooled"]
    )


def test_headline_metrics_match_the_trainers_metrics():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=50)
    probs = noisy_probs(labels, 4, rng, signal=0.5)
    headline = level_metrics(labels, probs).headline
    for name, value in classification_metrics(labels, probs).items():
        assert headline[name] == pytest.approx(value), name


# ---- bootstrap ------------------------------------------------------------------------------


def test_bootstrap_replicates_equal_scikit_learn_on_the_resampled_slides():
    rng = np.random.default_rng(1)
    labels = np.arange(40) % 3
    labels[:5] = 2  # unbalanced
    # Rounded probabilities make tied scores, which AUC must count as ½.
    probs = np.round(noisy_probs(labels, 3, rng, signal=1.0), 1)
    groups = patient_groups([f"p{i // 3}" for i in range(40)])
    weights = bootstrap_weights(groups, 6, np.random.default_rng(0))
    unit = bootstrap_level(labels, probs, np.ones((1, 40)))
    point = level_metrics(labels, probs)
    for name, value in point.headline.items():
        assert unit.headline[name][0] == pytest.approx(value, abs=1e-12), name
    samples = bootstrap_level(labels, probs, weights)
    for b in range(len(weights)):
        index = np.repeat(np.arange(40), weights[b].astype(int))
        resampled = level_metrics(labels[index], probs[index])
        for name, value in resampled.headline.items():
            assert samples.headline[name][b] == pytest.approx(value, abs=1e-12, nan_ok=True)
        np.testing.assert_allclose(samples.class_auc[b], resampled.per_class["auc"], atol=1e-12)
        # … and scikit-learn's sample weights give the same AUC.
        for c in range(3):
            expected = roc_auc_score(labels == c, probs[:, c], sample_weight=weights[b])
            assert samples.class_auc[b, c] == pytest.approx(expected, abs=1e-12)


def test_bootstrap_resamples_patients_with_all_their_slides():
    patients = ["x", "x", "y", "z", "z", "z", "w"]
    groups = patient_groups(patients)
    weights = bootstrap_weights(groups, 500, np.random.default_rng(7))
    assert weights.shape == (500, 7)
    for group in np.unique(groups):
        members = weights[:, groups == group]
        assert (members == members[:, :1]).all()  # a patient's slides move together
    per_patient = np.stack([weights[:, groups == g][:, 0] for g in np.unique(groups)], axis=1)
    assert (per_patient.sum(axis=1) == 4).all()  # 4 patients drawn per resample
    assert per_patient.mean() == pytest.approx(1.0, abs=0.1)
    again = bootstrap_weights(groups, 500, np.random.default_rng(7))
    np.testing.assert_array_equal(weights, again)  # seeded


def test_perfect_predictions_give_a_ci_of_one(tmp_path):
    labels = np.arange(12) % 3
    fine = np.eye(3)[labels] * 0.9 + 0.1 / 3
    coarse = np.eye(2)[COARSE_OF_FINE[labels]] * 0.8 + 0.1
    run_dirs = [
        write_run(
            tmp_path / "m" / "e" / "x" / f"fold{k}",
            predictions_frame(labels, fine, coarse, prefix=f"k{k}"),
            k,
        )
        for k in (0, 1)
    ]
    out = evaluate(run_dirs, tmp_path / "eval")
    summary = pd.read_csv(out / "summary.csv").set_index(["level", "metric"])
    for level in ("fine", "coarse", "coarse_from_fine"):
        for metric in ("auc", "accuracy", "balanced_accuracy", "f1"):
            row = summary.loc[(level, metric)]
            assert (row["mean"], row["std"], row["pooled"]) == (1.0, 0.0, 1.0)
            assert (row["ci_low"], row["ci_high"]) == (1.0, 1.0)
            assert row["n_bootstrap"] == 200


def test_fold_mean_and_sample_std_are_exact():
    mean, std, count = fold_mean_std([0.7, 0.8, math.nan, 0.9])
    assert (mean, count) == (pytest.approx(0.8), 3)
    assert std == pytest.approx(0.1)  # sample std (ddof = 1) of 0.7, 0.8, 0.9
    mean, std, count = fold_mean_std([0.6])
    assert (mean, count) == (0.6, 1) and math.isnan(std)  # one fold: no spread to estimate
    mean, std, count = fold_mean_std([math.nan, math.nan])
    assert math.isnan(mean) and math.isnan(std) and count == 0


def test_known_fold_accuracies_give_exact_mean_and_std(tmp_path):
    # Fold 0: 3 of 6 right (0.5); fold 1: all right (1.0).
    labels = np.arange(6) % 3
    right = np.eye(3)[labels] * 0.8 + 0.2 / 3
    half = right.copy()
    half[:3] = np.eye(3)[(labels[:3] + 1) % 3] * 0.8 + 0.2 / 3
    run_dirs = [
        write_run(tmp_path / "m" / "e" / "x" / "fold0", predictions_frame(labels, half), 0),
        write_run(
            tmp_path / "m" / "e" / "x" / "fold1", predictions_frame(labels, right, prefix="t"), 1
        ),
    ]
    out = evaluate(run_dirs, tmp_path / "eval")
    row = pd.read_csv(out / "summary.csv").set_index(["level", "metric"]).loc[("fine", "accuracy")]
    assert row["mean"] == pytest.approx(0.75)
    assert row["std"] == pytest.approx(math.sqrt(0.125))  # sample std of 0.5 and 1.0
    assert row["pooled"] == pytest.approx(0.75)
    assert "0.750 ± 0.354" in (out / "summary.md").read_text()


def test_ci_contains_the_pooled_value_and_narrows_with_more_patients():
    widths = []
    for num_patients in (30, 300):
        rng = np.random.default_rng(11)
        labels = np.arange(2 * num_patients) % 3
        probs = noisy_probs(labels, 3, rng, signal=1.0)
        groups = patient_groups([f"p{i // 2}" for i in range(len(labels))])
        weights = bootstrap_weights(groups, 300, np.random.default_rng(0))
        samples = bootstrap_level(labels, probs, weights)
        point = level_metrics(labels, probs).headline
        for name in ("auc", "accuracy", "balanced_accuracy", "f1"):
            low, high, valid = percentile_ci(samples.headline[name])
            assert low <= point[name] <= high, name
            assert valid == 300
        low, high, _ = percentile_ci(samples.headline["auc"])
        widths.append(high - low)
    assert widths[1] < 0.6 * widths[0]  # ~ 1/sqrt(10) in theory


def test_bootstrap_zero_gives_no_ci(tmp_path):
    out = tmp_path / "eval"
    assert main([*map(str, make_cohort(tmp_path)), "--out", str(out), "--bootstrap", "0"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary["ci_low"].isna().all() and (summary["n_bootstrap"] == 0).all()
    assert summary["pooled"].notna().all()


# ---- absent classes, missing folds, bad input -------------------------------------------------


def test_class_absent_from_a_fold_is_nan_and_labelled(tmp_path):
    run_dirs = make_cohort(tmp_path, drop_class_in_fold=1)
    out = evaluate(run_dirs, tmp_path / "eval")
    per_class = pd.read_csv(out / "per_class.csv", dtype={"fold": str})
    row = per_class[(per_class["level"] == "fine") & (per_class["fold"] == "1")].set_index("class")
    assert math.isnan(row.loc["a1", "auc"]) and math.isnan(row.loc["a1", "recall"])
    assert row.loc["a1", "support"] == 0 and row.loc["a1", "note"] == ABSENT
    assert row.loc[["a2", "b1"], "auc"].notna().all()
    # The fold's macro AUC averages the present classes, as the trainer's macro_auc.
    oof = pd.read_csv(out / "oof_predictions.csv")
    fold1 = oof[oof["fold"] == 1]
    labels = fold1["fine_label"].map(FINE.index).to_numpy()
    probs = fold1[[f"p_fine_{c}" for c in FINE]].to_numpy()
    per_fold = pd.read_csv(out / "metrics_per_fold.csv")
    fine1 = per_fold[(per_fold["fold"] == 1) & (per_fold["level"] == "fine")].iloc[0]
    assert fine1["auc"] == pytest.approx(macro_auc(labels, probs))
    assert fine1["auc"] == pytest.approx(row.loc[["a2", "b1"], "auc"].mean())
    assert fine1["auc_classes"] == "2/3" and "absent: a1" in fine1["note"]
    # Pooled, every class is present and has an AUC.
    pooled = per_class[(per_class["fold"] == "pooled") & (per_class["level"] == "fine")]
    assert pooled["auc"].notna().all()
    assert ABSENT in (out / "per_class.md").read_text()
    summary_md = (out / "summary.md").read_text()
    assert "Fold 1: AUC over the 2 classes present" in summary_md and "a1" in summary_md
    payload = json.loads((out / "summary.json").read_text())  # strict JSON despite NaNs
    assert payload["headline"]["fine"]["auc"]["n_folds"] == 2


def test_missing_fold_warns_and_evaluates_the_others(tmp_path, caplog):
    run_dirs = make_cohort(tmp_path, sizes=(30, 24, 18))
    (run_dirs[2] / "predictions.csv").unlink()
    with caplog.at_level(logging.WARNING, logger="hmil.evaluate"):
        out = evaluate(run_dirs, tmp_path / "eval")
    assert str(run_dirs[2] / "predictions.csv") in caplog.text
    payload = json.loads((out / "summary.json").read_text())
    assert payload["folds_used"] == [0, 1]
    assert [m["fold"] for m in payload["missing_folds"]] == [2]
    assert "predictions.csv not found" in payload["missing_folds"][0]["reason"]
    assert "Missing folds" in (out / "summary.md").read_text()
    assert set(pd.read_csv(out / "metrics_per_fold.csv")["fold"]) == {0, 1}


def run_cli_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in error
    return error


def test_strict_missing_fold_is_one_error_line(tmp_path, capsys):
    run_dirs = make_cohort(tmp_path)
    (run_dirs[1] / "predictions.csv").unlink()
    out = tmp_path / "eval"
    error = run_cli_error([*map(str, run_dirs), "--out", str(out), "--strict"], capsys)
    assert str(run_dirs[1] / "predictions.csv") in error and "--strict" in error
    assert not out.exists()


def test_all_folds_missing_is_one_error_line(tmp_path, capsys):
    run_dirs = [tmp_path / "models" / "e" / "m" / f"fold{k}" for k in (0, 1)]
    error = run_cli_error([*map(str, run_dirs), "--out", str(tmp_path / "eval")], capsys)
    assert "no fold to evaluate" in error and str(run_dirs[0]) in error


def test_class_columns_that_differ_between_folds_are_one_error_line(tmp_path, capsys):
    run_dirs = make_cohort(tmp_path)
    path = run_dirs[1] / "predictions.csv"
    table = pd.read_csv(path).rename(columns={"p_fine_b1": "p_fine_b9"})
    table.to_csv(path, index=False)
    (run_dirs[1] / "metrics.json").unlink()  # no recorded hierarchy: classes from columns
    error = run_cli_error([*map(str, run_dirs), "--out", str(tmp_path / "eval")], capsys)
    assert str(path) in error and "b9" in error


def test_unknown_label_is_one_error_line(tmp_path, capsys):
    run_dirs = make_cohort(tmp_path)
    path = run_dirs[0] / "predictions.csv"
    table = pd.read_csv(path)
    table.loc[0, "fine_label"] = "zz"
    table.to_csv(path, index=False)
    error = run_cli_error([*map(str, run_dirs), "--out", str(tmp_path / "eval")], capsys)
    assert str(path) in error and "'zz'" in error


def test_flat_model_skips_the_coarse_head_with_a_note(tmp_path):
    out = evaluate(make_cohort(tmp_path, flat=True), tmp_path / "eval")
    assert not (out / "confusion_coarse.csv").exists() and not (out / "roc_coarse.png").exists()
    assert (out / "confusion_coarse_from_fine.csv").is_file()
    payload = json.loads((out / "summary.json").read_text())
    assert payload["levels"] == ["fine", "coarse_from_fine"]
    assert "no coarse head" in payload["skipped_levels"]["coarse"]
    assert "Skipped: no coarse head" in (out / "summary.md").read_text()
    assert set(pd.read_csv(out / "summary.csv")["level"]) == {"fine", "coarse_from_fine"}


def test_hierarchy_order_of_metrics_json_wins_over_column_order(tmp_path):
    run_dirs = make_cohort(tmp_path)
    for run_dir in run_dirs:  # columns b1, a1, a2; hierarchy a1, a2, b1
        path = run_dir / "predictions.csv"
        table = pd.read_csv(path)
        columns = list(table.columns)
        columns[5:8] = ["p_fine_b1", "p_fine_a1", "p_fine_a2"]
        table[columns].to_csv(path, index=False)
    out = evaluate(run_dirs, tmp_path / "eval")
    confusion = pd.read_csv(out / "confusion_fine.csv", index_col=0)
    assert list(confusion.index) == list(FINE) and list(confusion.columns) == list(FINE)


def test_name_option_and_mixed_runs(tmp_path, capsys):
    run_dirs = make_cohort(tmp_path)
    other = tmp_path / "models" / "enc" / "other" / "fold0"
    other.mkdir(parents=True)
    (other / "predictions.csv").write_text((run_dirs[0] / "predictions.csv").read_text())
    error = run_cli_error([str(run_dirs[0]), str(other), "--out", str(tmp_path / "e")], capsys)
    assert "different runs" in error
    out = evaluate([run_dirs[0]], tmp_path / "named", "--name", "uni/abmil")
    assert json.loads((out / "summary.json").read_text())["name"] == "uni/abmil"


# ---- a real training run ----------------------------------------------------------------------


def test_real_training_runs_are_evaluated_consistently(tmp_path):
    yaml = pytest.importorskip("yaml")
    from hmil.data.hierarchy import Hierarchy
    from hmil.data.synthetic import SyntheticConfig, generate_cohort, write_cohort
    from hmil.train import main as train_main

    hierarchy_path = tmp_path / "tiny3.yaml"
    hierarchy_path.write_text(yaml.safe_dump(HIERARCHY, sort_keys=False))
    config = SyntheticConfig(bags_per_class=6, feature_dim=8, min_instances=8, max_instances=16,
                             seed=2)  # fmt: skip
    generated = generate_cohort(Hierarchy.from_yaml(hierarchy_path), config)
    write_cohort(generated, tmp_path / "features")
    table = generated.table.copy()
    rank = table.groupby("label").cumcount()
    for fold in (0, 1):
        shifted = (rank + 2 * fold) % 6
        table[f"fold{fold}"] = np.where(shifted < 2, "test", np.where(shifted < 4, "val", "train"))
    table.to_csv(tmp_path / "split.csv", index=False)
    run_dirs = []
    for fold in (0, 1):
        run_dir = tmp_path / "models" / "syn" / "hmil" / f"fold{fold}"
        assert train_main([
            "--features", str(tmp_path / "features"), "--splits", str(tmp_path / "split.csv"),
            "--fold", str(fold), "--model", "hmil", "--hierarchy", str(hierarchy_path),
            "--out", str(run_dir), "--epochs", "2", "--batch-bags", "6", "--seed", "0",
        ]) == 0  # fmt: skip
        run_dirs.append(run_dir)
    out = evaluate(run_dirs, tmp_path / "eval" / "syn" / "hmil")
    per_fold = pd.read_csv(out / "metrics_per_fold.csv").set_index(["fold", "level"])
    for fold, run_dir in enumerate(run_dirs):
        trained = json.loads((run_dir / "metrics.json").read_text())["test"]
        for level in ("fine", "coarse", "coarse_from_fine"):
            for name, value in trained[level].items():
                got = per_fold.loc[(fold, level), name]
                assert got == pytest.approx(value if value is not None else math.nan, nan_ok=True)
    payload = json.loads((out / "summary.json").read_text())
    assert (payload["encoder"], payload["model"], payload["n_slides"]) == ("syn", "hmil", 12)
    test_png(out / "training_curves.png")
