"""hmil.compare: one row per evaluated run, failed runs named, best values bolded, plot."""

import json
import math

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from hmil.compare import main
from hmil.evaluate import main as evaluate_main
from hmil.evaluation.comparison import FAILED_MARKER, mark_failed

FINE = ("a1", "a2", "b1")
COARSE = ("A", "B")
COARSE_OF_FINE = np.array([0, 0, 1])
HIERARCHY = {"name": "tiny3", "coarse": list(COARSE), "fine": {"a1": "A", "a2": "A", "b1": "B"}}


def fold_predictions(labels, signal, rng, flat, prefix):
    """A predictions.csv table (test rows) whose fine probabilities favour the true class
    by ``signal``."""
    logits = rng.normal(size=(len(labels), 3))
    logits[np.arange(len(labels)), labels] += signal
    fine = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    from_fine = fine @ np.eye(2)[COARSE_OF_FINE]
    frame = pd.DataFrame(
        {
            "slide_id": [f"{prefix}{i}" for i in range(len(labels))],
            "patient_id": [f"{prefix}p{i // 2}" for i in range(len(labels))],
            "split": "test",
            "fine_label": [FINE[i] for i in labels],
            "coarse_label": [COARSE[i] for i in COARSE_OF_FINE[labels]],
        }
    )
    for index, name in enumerate(FINE):
        frame[f"p_fine_{name}"] = fine[:, index]
    for index, name in enumerate(COARSE):
        frame[f"p_coarse_{name}"] = math.nan if flat else from_fine[:, index]
    for index, name in enumerate(COARSE):
        frame[f"p_coarse_from_fine_{name}"] = from_fine[:, index]
    return frame


@pytest.fixture(scope="module")
def eval_dirs(tmp_path_factory):
    """eval/enc/strong (hierarchical, clear signal), eval/enc/weak (flat, little signal),
    each evaluated from two folds by hmil.evaluate."""
    root = tmp_path_factory.mktemp("compare")
    dirs = {}
    for model, signal, flat in (("weak", 0.3, True), ("strong", 3.0, False)):
        rng = np.random.default_rng(5)
        run_dirs = []
        for fold in (0, 1):
            run_dir = root / "models" / "enc" / model / f"fold{fold}"
            run_dir.mkdir(parents=True)
            labels = np.arange(18) % 3
            fold_predictions(labels, signal, rng, flat, f"f{fold}_").to_csv(
                run_dir / "predictions.csv", index=False
            )
            (run_dir / "metrics.json").write_text(
                json.dumps({"config": {"fold": fold, "hierarchy": HIERARCHY}})
            )
            run_dirs.append(str(run_dir))
        out = root / "eval" / "enc" / model
        assert evaluate_main([*run_dirs, "--out", str(out), "--bootstrap", "200"]) == 0
        dirs[model] = out
    return root, dirs


def assert_real_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05, f"{path} looks blank"


def test_two_runs_and_a_missing_one_make_three_rows(eval_dirs, tmp_path):
    root, dirs = eval_dirs
    missing = root / "eval" / "enc" / "transmil"
    csv, md, png = tmp_path / "comparison.csv", tmp_path / "comparison.md", tmp_path / "auc.png"
    argv = [str(dirs["weak"]), str(missing), str(dirs["strong"]), "--out", str(csv)]
    assert main([*argv, "--md", str(md), "--plot", str(png)]) == 0

    table = pd.read_csv(csv)
    assert len(table) == 3
    # Sorted by mean fine AUC, best first; the failed run last, named with its reason.
    assert table["name"].tolist() == ["enc/strong", "enc/weak", "enc/transmil"]
    assert table["status"].tolist() == ["ok", "ok", "failed"]
    assert table.loc[2, "reason"] == f"{missing}: directory not found"
    assert table.loc[0, "fine_auc_mean"] > table.loc[1, "fine_auc_mean"]
    # Values are those of the evaluations' summary.json.
    strong = json.loads((dirs["strong"] / "summary.json").read_text())["headline"]
    assert table.loc[0, "fine_auc_mean"] == pytest.approx(strong["fine"]["auc"]["mean"])
    assert table.loc[0, "fine_auc_std"] == pytest.approx(strong["fine"]["auc"]["std"])
    assert table.loc[0, "fine_auc_ci_low"] == pytest.approx(strong["fine"]["auc"]["ci_low"])
    assert table.loc[0, "coarse_auc_pooled"] == pytest.approx(strong["coarse"]["auc"]["pooled"])
    # The flat model has no coarse-head metrics, but coarse-from-fine ones.
    assert math.isnan(table.loc[1, "coarse_auc_mean"])
    assert not math.isnan(table.loc[1, "coarse_from_fine_auc_mean"])
    assert table.loc[0, "n_folds"] == 2

    text = md.read_text()
    lines = [line for line in text.splitlines() if line.startswith("| enc/")]
    assert len(lines) == 3
    strong_line, weak_line, failed_line = lines
    assert f"**{strong['fine']['auc']['mean']:.3f} ± " in strong_line  # best is bold
    assert "**" not in weak_line.split("|")[3]  # fine AUC cell of the weaker run
    assert "FAILED" in failed_line and "transmil" in failed_line
    assert_real_png(png)


def test_failed_marker_names_the_reason(eval_dirs, tmp_path):
    root, dirs = eval_dirs
    failed = root / "eval" / "enc" / "clam_sb"
    mark_failed(failed, "training diverged (loss NaN)\nsecond line")
    assert (failed / FAILED_MARKER).read_text() == "training diverged (loss NaN)\n"
    broken = tmp_path / "eval" / "enc" / "dsmil"
    broken.mkdir(parents=True)
    (broken / "summary.json").write_text("{not json")
    unevaluated = tmp_path / "eval" / "enc" / "abmil"
    unevaluated.mkdir(parents=True)
    csv = tmp_path / "comparison.csv"
    argv = [str(dirs["strong"]), str(failed), str(broken), str(unevaluated), "--out", str(csv)]
    assert main(argv) == 0
    table = pd.read_csv(csv).set_index("name")
    assert table.loc["enc/clam_sb", "status"] == "failed"
    assert "training diverged" in table.loc["enc/clam_sb", "reason"]
    assert "unreadable" in table.loc["enc/dsmil", "reason"]
    assert table.loc["enc/abmil", "reason"].endswith("summary.json not found (evaluation missing)")
    assert table.loc["enc/strong", "status"] == "ok"


def test_only_failed_runs_still_write_a_table_and_a_plot(tmp_path):
    csv, png = tmp_path / "comparison.csv", tmp_path / "auc.png"
    assert main([str(tmp_path / "eval" / "a" / "b"), "--out", str(csv), "--plot", str(png)]) == 0
    table = pd.read_csv(csv)
    assert table["status"].tolist() == ["failed"] and table["name"].tolist() == ["a/b"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_with_a_fold_that_may_not_have_learned_is_marked(eval_dirs, tmp_path):
    root, dirs = eval_dirs
    run_dirs = []
    for fold in (0, 1):
        run_dir = tmp_path / "models" / "enc" / "stuck" / f"fold{fold}"
        run_dir.mkdir(parents=True)
        source = root / "models" / "enc" / "strong" / f"fold{fold}" / "predictions.csv"
        (run_dir / "predictions.csv").write_bytes(source.read_bytes())
        warnings = ["best validation epoch is 0 of 50"] if fold == 1 else []
        (run_dir / "metrics.json").write_text(
            json.dumps(
                {"config": {"fold": fold, "hierarchy": HIERARCHY}, "learning_warnings": warnings}
            )
        )
        run_dirs.append(str(run_dir))
    stuck = tmp_path / "eval" / "enc" / "stuck"
    assert evaluate_main([*run_dirs, "--out", str(stuck), "--bootstrap", "50"]) == 0
    csv, md = tmp_path / "comparison.csv", tmp_path / "comparison.md"
    assert main([str(stuck), str(dirs["weak"]), "--out", str(csv), "--md", str(md)]) == 0
    table = pd.read_csv(csv).set_index("name")
    assert table.loc["enc/stuck", "learning_warnings"] == (
        "fold 1: best validation epoch is 0 of 50"
    )
    assert pd.isna(table.loc["enc/weak", "learning_warnings"])
    lines = {line.split("|")[1].strip(): line for line in md.read_text().splitlines()
             if line.startswith("| enc/")}  # fmt: skip
    assert "**may not have learned**: fold 1: best validation epoch is 0" in lines["enc/stuck"]
    assert lines["enc/weak"].rstrip(" |").endswith("ok")
