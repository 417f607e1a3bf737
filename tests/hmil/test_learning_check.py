"""Learning check (issues 4 and 13): HMIL and ABMIL trained by ``hmil.train`` with exactly the
training settings of the shipped config/config.yaml, on one cohort of the benchmark grid.

The grid and its runner are ``benchmarks/learning_check.py``. This is its ``small_d64``
cell (150 slides of 7 BRACS classes, two per patient, D = 64, 50–300 instances of which
2–10 % carry the class 4 noise-SDs out, fine classes of a group at cosine 0.8), fold 0 of
seed 0: a cohort of realistic difficulty, not an easy one. ``pytest -s`` prints the scores.
"""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
SEED = 0  # cohort seed = training seed, fixed before looking at any result


def load_learning_check(name="learning_check"):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def learning_check():
    return load_learning_check()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("learning_check")


@pytest.fixture(scope="module")
def runs(learning_check, workdir):
    # Module fixtures run before the function-scoped one-thread fixture; small matrices on
    # several threads of a busy machine can run many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = learning_check.run_grid(
            [learning_check.CELLS["small_d64"]], ["hmil", "abmil", "hmil_mb"], [SEED], 3,
            workdir, folds_to_run=1, progress=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    print("\n" + learning_check.format_grid(result))
    return result.set_index("model")


def test_the_check_trains_with_the_shipped_config(learning_check):
    training = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["training"]
    flags = learning_check.training_flags()
    assert flags[:2] == ["--protocol", training["protocol"]]
    for key in learning_check.TRAINING_FLAGS:
        if training.get(key) is not None:
            assert f"--{key.replace('_', '-')}" in flags, key


def test_both_models_learn_at_the_defaults(runs):
    # Chance is 0.5; on this cell ABMIL reaches about 0.85–0.9 and HMIL 0.8–0.85.
    assert runs.loc["abmil", "fine_auc"] > 0.75, runs.loc["abmil"]
    assert runs.loc["hmil", "fine_auc"] > 0.7, runs.loc["hmil"]
    assert (runs["coarse_from_fine_auc"] > 0.8).all(), runs["coarse_from_fine_auc"]
    assert not runs["warned"].any()  # neither stopped at its initialisation
    # this cell's slide means carry the class (no offsets): slide_norm auto leaves them
    assert not runs["centred"].any()


def test_hmil_mb_learns_at_the_defaults_and_its_class_rows_find_the_key_instances(runs):
    # HMIL with a scorer per class row (benchmarks/README.md "Learning check": 0.99 here,
    # ABMIL 0.88)
    assert runs.loc["hmil_mb", "fine_auc"] > 0.9, runs.loc["hmil_mb"]
    assert runs.loc["hmil_mb", "coarse_from_fine_auc"] > 0.9
    # the true class's row puts several times the chance mass (2–10 %) on the key
    # instances, and more than the other rows do
    row = runs.loc["hmil_mb"]
    assert row["fine_key_attention"] > 0.2
    assert row["fine_key_attention"] > 1.5 * row["other_rows_key_attention"]
    assert {"fine_balanced_accuracy", "fine_macro_f1"} <= set(runs.columns)
    assert 0 <= row["fine_macro_f1"] <= 1 and row["fine_balanced_accuracy"] > 1 / 7


def test_no_lr_falls_below_one_percent_of_its_peak_before_half_the_run(runs):
    assert (runs["min_lr_ratio_first_half"] >= 0.01).all(), runs["min_lr_ratio_first_half"]
    # and early stopping let the curriculum run: HMIL trained past E/√2
    assert runs.loc["hmil", "epochs_trained"] >= 36


def test_scorer_diagnostics_read_the_key_masks_the_grid_saved(runs, workdir, capsys):
    seed_dir = workdir / "small_d64" / f"seed{SEED}"
    with (
        np.load(seed_dir / "keys.npz") as keys,
        h5py.File(seed_dir / "features" / "synthetic_0000.h5") as first,
    ):
        splits = pd.read_csv(seed_dir / "DATA_SPLIT.csv")
        assert sorted(keys.files) == sorted(splits["slide_id"])
        mask = keys["synthetic_0000"]
        assert mask.dtype == bool and len(mask) == len(first["features"])
        assert 0.02 <= mask.mean() <= 0.1 + 1 / len(mask)  # the cell's key fraction
    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports learning_check
    try:
        diagnostics = load_learning_check("hmil_scorer_diagnostics")
        assert diagnostics.main([str(workdir), "--cell", "small_d64"]) == 0
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    printed = capsys.readouterr().out
    test_bags = (splits["fold0"] == "test").sum()
    assert f"small_d64: 1 HMIL runs, {test_bags} test bags" in printed
    assert "fine classes whose key instances the scorer ranks above" in printed


def test_runs_in_parallel_processes_give_the_rows_of_one_process(learning_check, tmp_path):
    # the grid's --jobs: each run seeds itself, so where it trains cannot change its row
    # (a tiny cohort and 3 epochs: this checks the runner, not learning)
    sys.path.insert(0, str(ROOT / "benchmarks"))  # a spawned worker imports the module
    try:
        tiny = replace(learning_check.SMALL_D64, name="tiny", slides=105, feature_dim=16,
                       min_instances=20, max_instances=40)  # fmt: skip
        flags = [*learning_check.training_flags(), "--epochs", "3"]
        grids = []
        for jobs in (1, 2):
            grid = learning_check.run_grid(
                [tiny], ["hmil", "abmil"], [SEED], 3, tmp_path / f"jobs{jobs}",
                flags=flags, folds_to_run=1, progress=False, jobs=jobs,
            )  # fmt: skip
            grids.append(grid.drop(columns="seconds"))
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert list(grids[1]["model"]) == ["hmil", "abmil"]  # in grid order, not finishing order
    pd.testing.assert_frame_equal(grids[0], grids[1])


def test_variants_become_training_flags(learning_check):
    assert learning_check.variant_flags("slide_norm=center,balanced_sampling=true") == [
        "--slide-norm", "center", "--balanced-sampling", "true",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="expected training keys"):
        learning_check.variant_flags("nonsense=1")


def test_runs_of_an_earlier_grid_are_reused_not_retrained(learning_check, tmp_path):
    tiny = replace(learning_check.SMALL_D64, name="tiny", slides=105, feature_dim=16,
                   min_instances=20, max_instances=40)  # fmt: skip
    flags = [*learning_check.training_flags(), "--epochs", "2"]
    first = learning_check.run_grid(
        [tiny], ["abmil"], [SEED], 3, tmp_path / "first", flags=flags, folds_to_run=1,
        progress=False,
    )  # fmt: skip
    earlier = first.to_dict(orient="records")
    # the reused row comes back as it was (its seconds too: nothing was trained) ...
    again = learning_check.run_grid(
        [tiny], ["abmil", "abmil+slide_norm=center"], [SEED], 3, tmp_path / "again",
        flags=flags, folds_to_run=1, progress=False, reuse=earlier,
    )  # fmt: skip
    assert list(again["model"]) == ["abmil", "abmil+slide_norm=center"]
    pd.testing.assert_series_equal(again.iloc[0], first.iloc[0], check_names=False)
    assert not (tmp_path / "again" / "tiny" / f"seed{SEED}" / "abmil_fold0").exists()
    assert (tmp_path / "again" / "tiny" / f"seed{SEED}" / "abmil_slide_norm-center_fold0").is_dir()
    # ... and a report trains nothing: the rows it has, in grid order
    report = learning_check.run_grid(
        [tiny], ["abmil+slide_norm=center", "abmil"], [SEED], 3, tmp_path / "report",
        flags=flags, folds_to_run=1, progress=False, reuse=earlier, train=False,
    )  # fmt: skip
    assert list(report["model"]) == ["abmil"]
    assert not (tmp_path / "report").exists()
    assert "abmil+slide_norm=center − abmil" in learning_check.format_grid(again)
