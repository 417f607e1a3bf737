"""The per-fold trainer: outputs and their contracts, reproducibility, resume, learning, and
one-line errors for bad input. Runs on a small generated cohort (tiny 4-class hierarchy)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from hmil.data.hierarchy import Hierarchy
from hmil.data.synthetic import SyntheticConfig
from hmil.train import main
from tests.hmil.train_cli import one_error_line, write_fold_cohort

ROOT = Path(__file__).resolve().parents[2]
# Easy: fine classes of one coarse group far apart, 10–30 % key instances, strong signal.
EASY = SyntheticConfig(
    bags_per_class=10,
    feature_dim=32,
    min_instances=30,
    max_instances=60,
    min_key_fraction=0.1,
    max_key_fraction=0.3,
    signal=6.0,
    fine_offset=3.0,
    seed=1,
)
FINE = ["a1", "a2", "b1", "b2"]
COARSE_OF = {"a1": "A", "a2": "A", "b1": "B", "b2": "B"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Features of 40 slides, a hierarchy file and a DATA_SPLIT.csv whose fold0 puts 2
    slides per class in test, 2 in val and 6 in train."""
    return write_fold_cohort(tmp_path_factory.mktemp("cohort"), EASY, 2, 2)


def train_args(cohort, out, *extra, model="hmil", epochs=3, splits=None):
    return [
        "--features", str(cohort["root"] / "features"),
        "--splits", str(splits or cohort["splits"]),
        "--fold", "0",
        "--model", model,
        "--hierarchy", str(cohort["hierarchy"]),
        "--out", str(out),
        "--epochs", str(epochs),
        "--batch-bags", "8",
        "--lr", "1e-3",
        "--seed", "3",
        *extra,
    ]  # fmt: skip


def run_subprocess(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "hmil.train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def cli_runs(cohort, tmp_path_factory):
    """One 3-epoch CLI run per model, in a subprocess as the workflow runs it."""
    outs = {}
    for model in ("hmil", "abmil"):
        out = tmp_path_factory.mktemp(f"run_{model}")
        result = run_subprocess(train_args(cohort, out, model=model))
        assert result.returncode == 0, result.stderr
        outs[model] = out
    return outs


@pytest.mark.parametrize("model", ["hmil", "abmil"])
def test_cli_run_writes_every_output_with_consistent_probabilities(cli_runs, cohort, model):
    out = cli_runs[model]
    for name in ("model.pt", "predictions.csv", "metrics.json", "attention.h5", "log.csv"):
        assert (out / name).is_file(), name

    predictions = pd.read_csv(out / "predictions.csv")
    table = cohort["table"]
    assert sorted(predictions["slide_id"]) == sorted(
        table.loc[table["fold0"] != "train", "slide_id"]
    )
    assert (predictions["split"] == "test").sum() == 8 and (
        predictions["split"] == "val"
    ).sum() == 8
    fine = predictions[[f"p_fine_{name}" for name in FINE]].to_numpy()
    np.testing.assert_allclose(fine.sum(axis=1), 1.0, atol=1e-5)
    for coarse in ("A", "B"):
        members = [f"p_fine_{f}" for f in FINE if COARSE_OF[f] == coarse]
        np.testing.assert_allclose(
            predictions[f"p_coarse_from_fine_{coarse}"], predictions[members].sum(axis=1), atol=1e-5
        )
    head = predictions[["p_coarse_A", "p_coarse_B"]].to_numpy()
    if model == "hmil":
        np.testing.assert_allclose(head.sum(axis=1), 1.0, atol=1e-5)
    else:
        assert np.isnan(head).all()
    expected_fine = np.asarray(FINE)[fine.argmax(axis=1)]
    assert (predictions["pred_fine"] == expected_fine).all()
    truth = table.set_index("slide_id").loc[predictions["slide_id"]]
    assert (predictions["fine_label"].to_numpy() == truth["label"].to_numpy()).all()
    assert (predictions["patient_id"].to_numpy() == truth["patient_id"].to_numpy()).all()

    log = pd.read_csv(out / "log.csv")
    assert log["epoch"].tolist() == [0, 1, 2]
    assert {"alpha", "tau", "lr", "train_fine_ce", "train_loss", "val_loss", "val_fine_auc"} <= set(
        log.columns
    )
    if model == "hmil":
        assert {"train_coarse_ce", "train_contrastive", "val_instance_alignment"} <= set(
            log.columns
        )
        assert log["alpha"].tolist() == pytest.approx([1.0, 1 - 1 / 9, 1 - 4 / 9])
    else:
        assert "train_coarse_ce" not in log.columns

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["model"] == model
    assert metrics["config"]["loss_preset"] == ("hmil" if model == "hmil" else "flat")
    assert metrics["seed"] == 3 and metrics["best_epoch"] in (0, 1, 2)
    assert metrics["runtime"] == {
        "device": "cpu",
        "device_name": "cpu",
        "precision": "fp32",
        "torch": torch.__version__,
    }
    assert metrics["test"]["num_slides"] == 8
    test_fine = metrics["test"]["fine"]
    test_rows = predictions[predictions["split"] == "test"]
    assert test_fine["accuracy"] == pytest.approx(
        (test_rows["pred_fine"] == test_rows["fine_label"]).mean()
    )
    assert (metrics["test"]["coarse"] is None) == (model == "abmil")

    checkpoint = torch.load(out / "model.pt", weights_only=False)
    assert checkpoint["model"] == model and checkpoint["in_dim"] == EASY.feature_dim
    assert Hierarchy.from_mapping(checkpoint["hierarchy"]).fine == tuple(FINE)

    with h5py.File(out / "attention.h5", "r") as attention:
        assert sorted(attention) == sorted(test_rows["slide_id"])
        assert list(attention.attrs["fine_classes"]) == FINE
        for slide_id in attention:
            group = attention[slide_id]
            with h5py.File(cohort["root"] / "features" / f"{slide_id}.h5", "r") as features:
                np.testing.assert_array_equal(group["coords"][()], features["coords"][()])
            num_patches = group["coords"].shape[0]
            fine_attention = group["fine_attention"][()]
            assert fine_attention.shape == ((4 if model == "hmil" else 1), num_patches)
            np.testing.assert_allclose(fine_attention.sum(axis=1), 1.0, atol=1e-5)
            if model == "hmil":
                assert group["coarse_attention"].shape == (2, num_patches)
                np.testing.assert_allclose(
                    group["coarse_attention"][()].sum(axis=1), 1.0, atol=1e-5
                )
            else:
                assert "coarse_attention" not in group


def test_same_seed_gives_identical_predictions(cli_runs, cohort, tmp_path):
    assert main(train_args(cohort, tmp_path / "again")) == 0
    first = pd.read_csv(cli_runs["hmil"] / "predictions.csv")
    again = pd.read_csv(tmp_path / "again" / "predictions.csv")
    pd.testing.assert_frame_equal(first, again)


def test_interrupted_run_resumes_to_the_uninterrupted_result(cohort, tmp_path):
    interrupted = tmp_path / "interrupted"
    assert main(train_args(cohort, interrupted, "--stop-after", "2", epochs=4)) == 0
    assert pd.read_csv(interrupted / "log.csv")["epoch"].tolist() == [0, 1]
    assert (interrupted / "last.pt").is_file() and not (interrupted / "model.pt").exists()

    assert main(train_args(cohort, interrupted, epochs=4)) == 0
    assert pd.read_csv(interrupted / "log.csv")["epoch"].tolist() == [0, 1, 2, 3]

    assert main(train_args(cohort, tmp_path / "straight", epochs=4)) == 0
    pd.testing.assert_frame_equal(
        pd.read_csv(interrupted / "predictions.csv"),
        pd.read_csv(tmp_path / "straight" / "predictions.csv"),
    )
    resumed_log = pd.read_csv(interrupted / "log.csv").drop(columns="seconds")
    straight_log = pd.read_csv(tmp_path / "straight" / "log.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(resumed_log, straight_log)


def test_finished_run_is_not_retrained(cohort, tmp_path):
    out = tmp_path / "done"
    assert main(train_args(cohort, out, epochs=1)) == 0
    written = (out / "model.pt").stat().st_mtime_ns
    assert main(train_args(cohort, out, epochs=1)) == 0
    assert (out / "model.pt").stat().st_mtime_ns == written


def test_hmil_learns_an_easy_cohort(cohort, tmp_path):
    assert main(train_args(cohort, tmp_path, epochs=20)) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test"]["fine"]["auc"] > 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_trains_with_bf16_autocast_and_records_it(cli_runs, cohort, tmp_path):
    assert main(train_args(cohort, tmp_path, "--device", "cuda", epochs=20)) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["runtime"]["device"].startswith("cuda")
    assert metrics["runtime"]["precision"] == "bf16"
    assert metrics["test"]["fine"]["auc"] > 0.9  # learns as on the CPU
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    fine = predictions[[f"p_fine_{name}" for name in FINE]].to_numpy()
    np.testing.assert_allclose(fine.sum(axis=1), 1.0, atol=1e-5)
    # the weights are saved for CPU use and load without a GPU
    checkpoint = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=False)
    assert all(not value.is_cuda for value in checkpoint["state_dict"].values())
    # a resumed CUDA run continues on the device it was stopped on
    resumed = tmp_path / "resumed"
    assert main(train_args(cohort, resumed, "--device", "cuda", "--stop-after", "1")) == 0
    assert main(train_args(cohort, resumed, "--device", "cuda")) == 0
    assert pd.read_csv(resumed / "log.csv")["epoch"].tolist() == [0, 1, 2]


def rewritten_splits(cohort, tmp_path, change) -> Path:
    table = cohort["table"].copy()
    change(table)
    path = tmp_path / "DATA_SPLIT.csv"
    table.to_csv(path, index=False)
    return path


def test_missing_splits_file_is_one_error_line(cohort, tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    line = one_error_line(capsys, train_args(cohort, tmp_path / "out", splits=missing))
    assert str(missing) in line and "not found" in line


def test_absent_fold_column_is_one_error_line(cohort, tmp_path, capsys):
    args = train_args(cohort, tmp_path / "out")
    args[args.index("--fold") + 1] = "7"
    line = one_error_line(capsys, args)
    assert "'fold7'" in line and "fold0" in line and str(cohort["splits"]) in line


def test_empty_val_set_is_one_error_line(cohort, tmp_path, capsys):
    def no_val(table):
        table.loc[table["fold0"] == "val", "fold0"] = "train"

    splits = rewritten_splits(cohort, tmp_path, no_val)
    line = one_error_line(capsys, train_args(cohort, tmp_path / "out", splits=splits))
    assert "no 'val' slides" in line and str(splits) in line


def test_empty_train_set_is_one_error_line(cohort, tmp_path, capsys):
    def no_train(table):
        table.loc[table["fold0"] == "train", "fold0"] = "test"

    splits = rewritten_splits(cohort, tmp_path, no_train)
    line = one_error_line(capsys, train_args(cohort, tmp_path / "out", splits=splits))
    assert "no 'train' slides" in line


def test_unknown_model_is_one_error_line(cohort, tmp_path, capsys):
    line = one_error_line(capsys, train_args(cohort, tmp_path / "out", model="nope"))
    assert "unknown model 'nope'" in line and "hmil" in line


def test_unknown_label_names_the_slide(cohort, tmp_path, capsys):
    def bad_label(table):
        table.loc[0, "label"] = "zz"

    splits = rewritten_splits(cohort, tmp_path, bad_label)
    line = one_error_line(capsys, train_args(cohort, tmp_path / "out", splits=splits))
    slide_id = cohort["table"].loc[0, "slide_id"]
    assert f"slide {slide_id!r}" in line and "'zz'" in line


def test_missing_feature_file_names_the_slide_and_file(cohort, tmp_path, capsys):
    def ghost_slide(table):
        table.loc[len(table)] = ["ghost", "patient_x", "a1", "A", "train"]

    splits = rewritten_splits(cohort, tmp_path, ghost_slide)
    line = one_error_line(capsys, train_args(cohort, tmp_path / "out", splits=splits))
    assert "'ghost'" in line and str(cohort["root"] / "features" / "ghost") in line


def test_val_set_with_one_class_is_one_error_line(cohort, tmp_path, capsys):
    def one_class_val(table):
        table.loc[(table["fold0"] == "val") & (table["label"] != "a1"), "fold0"] = "train"

    splits = rewritten_splits(cohort, tmp_path, one_class_val)
    line = one_error_line(capsys, train_args(cohort, tmp_path / "out", splits=splits, epochs=2))
    assert "validation set has one fine class ('a1', 2 slides)" in line
    assert "val_fraction" in line
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_fewer_training_slides_than_bags_per_step_is_one_error_line(cohort, tmp_path, capsys):
    args = train_args(cohort, tmp_path / "out")
    args[args.index("--batch-bags") + 1] = "25"  # the fold trains on 24 slides
    line = one_error_line(capsys, args)
    assert "24 training slides, fewer than --batch-bags 25" in line


def test_epochs_below_the_minimum_for_early_stopping_is_one_error_line(cohort, tmp_path, capsys):
    line = one_error_line(capsys, [*train_args(cohort, tmp_path / "out"), "--min-epochs", "4"])
    assert "--epochs 3 is below --min-epochs 4" in line


def test_hierarchy_preset_name_is_accepted_and_unknown_preset_is_one_error_line(
    cohort, tmp_path, capsys
):
    args = train_args(cohort, tmp_path / "out")
    args[args.index("--hierarchy") + 1] = "no_such_preset"
    line = one_error_line(capsys, args)
    assert "unknown hierarchy preset 'no_such_preset'" in line and "bracs" in line


def test_slide_with_flagged_feature_file_is_left_out_and_recorded(cohort, tmp_path, capsys):
    """A slide whose extraction found no tissue is reported, not a crash; --strict stops."""
    features = tmp_path / "features"
    features.mkdir()
    for path in (cohort["root"] / "features").iterdir():
        (features / path.name).symlink_to(path)
    with h5py.File(features / "blank.h5", "w") as file:
        file.create_dataset("features", data=np.zeros((0, 32), np.float32))
        file.attrs.update(status="empty", status_reason="no tissue found", feature_dim=32)

    def blank_slide(table):
        table.loc[len(table)] = ["blank", "patient_blank", "a1", "A", "test"]

    splits = rewritten_splits(cohort, tmp_path, blank_slide)
    args = train_args(cohort, tmp_path / "out", splits=splits, epochs=1)
    args[args.index("--features") + 1] = str(features)
    assert main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["excluded_slides"] == {"blank": "empty: no tissue found"}
    predictions = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert "blank" not in set(predictions["slide_id"])

    line = one_error_line(capsys, [*args, "--out", str(tmp_path / "strict"), "--strict"])
    assert "'blank'" in line and "flagged" in line


def test_restart_if_changed_discards_a_run_with_other_settings(cohort, tmp_path, capsys):
    assert main(train_args(cohort, tmp_path, epochs=1)) == 0
    changed = train_args(cohort, tmp_path, epochs=2)
    line = one_error_line(capsys, changed)
    assert "other settings" in line
    assert main([*changed, "--restart-if-changed"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["epochs"] == 2 and metrics["epochs_trained"] == 2
