"""Trainer options that must not change the result (feature cache, data-loader workers), the
AdamW + cosine schedule, and TensorBoard logging. A 16-slide generated cohort, few epochs."""

import json
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

import hmil.data.bags
import hmil.training.cohort
from hmil.data.synthetic import SyntheticConfig
from hmil.train import main
from hmil.training.cohort import cache_budget
from hmil.training.config import RunOptions
from hmil.training.loop import drop_instances
from hmil.training.selection import learning_warnings
from hmil.training.selection_metrics import chance_macro_auc
from tests.hmil.train_cli import write_fold_cohort

SMALL = SyntheticConfig(
    bags_per_class=4, feature_dim=16, min_instances=20, max_instances=40, signal=6.0, seed=5
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """16 slides; fold0 puts 1 slide per class in test, 1 in val and 2 in train."""
    return write_fold_cohort(tmp_path_factory.mktemp("options_cohort"), SMALL, 1, 1)


def train(cohort, out, *extra, epochs=3):
    args = [
        "--features", str(cohort["root"] / "features"),
        "--splits", str(cohort["root"] / "DATA_SPLIT.csv"),
        "--fold", "0",
        "--model", "hmil",
        "--hierarchy", str(cohort["hierarchy"]),
        "--out", str(out),
        "--epochs", str(epochs),
        "--batch-bags", "4",
        "--lr", "1e-3",
        "--seed", "2",
        *extra,
    ]  # fmt: skip
    assert main(args) == 0
    return pd.read_csv(out / "predictions.csv"), pd.read_csv(out / "log.csv").drop(
        columns="seconds"
    )


@pytest.fixture(scope="module")
def reference_run(cohort, tmp_path_factory):
    """3 epochs with the defaults: no workers, so the small cohort's features are cached."""
    # One thread, as the function-scoped one_thread fixture (not yet active here) sets it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cohort, tmp_path_factory.mktemp("reference"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def feature_reads(monkeypatch):
    """Counts feature-file reads per slide (BagDataset reads through this function)."""
    reads: Counter[str] = Counter()
    load = hmil.data.bags.load_bag_features

    def counting_load(path, slide_id):
        reads[slide_id] += 1
        return load(path, slide_id)

    monkeypatch.setattr(hmil.data.bags, "load_bag_features", counting_load)
    return reads


def test_cache_reads_each_file_once_and_gives_the_same_predictions(
    cohort, reference_run, tmp_path, feature_reads
):
    predictions, log = train(cohort, tmp_path / "uncached", "--no-cache")
    pd.testing.assert_frame_equal(predictions, reference_run[0])
    pd.testing.assert_frame_equal(log, reference_run[1])
    train_slides = cohort["table"].loc[cohort["table"]["fold0"] == "train", "slide_id"]
    # once for slide_norm auto's test of the slide means, then once per epoch
    assert all(feature_reads[slide_id] == 1 + 3 for slide_id in train_slides)

    # The default keeps features that fit in memory: every slide of train, val and test
    # is read exactly once over 3 epochs + final outputs.
    feature_reads.clear()
    train(cohort, tmp_path / "cached")
    assert set(feature_reads) == set(cohort["table"]["slide_id"])
    assert set(feature_reads.values()) == {1}


def test_a_cache_budget_smaller_than_the_features_keeps_some_and_rereads_the_rest(
    cohort, reference_run, tmp_path, feature_reads
):
    train_table = cohort["table"].loc[cohort["table"]["fold0"] == "train"]
    one_bag = 40 * SMALL.feature_dim * 4  # the largest bag as float32
    predictions, log = train(cohort, tmp_path / "budget", "--cache-gib", str(3.5 * one_bag / 2**30))
    pd.testing.assert_frame_equal(predictions, reference_run[0])
    pd.testing.assert_frame_equal(log, reference_run[1])
    reads = [feature_reads[slide_id] for slide_id in train_table["slide_id"]]
    kept = sum(count == 1 for count in reads)  # read once (slide_norm auto's test of the
    assert 3 <= kept < len(reads)  # slide means), served from memory since; not all fit
    assert all(count in (1, 1 + 3) for count in reads)  # the others read every epoch too


def test_the_cache_budget_follows_the_options_and_the_available_memory(monkeypatch, tmp_path):
    assert hmil.training.cohort.available_memory() > 2**20  # this machine's, from the OS

    def options(**kw):
        return RunOptions(features=tmp_path, splits=tmp_path, hierarchy="h", out=tmp_path, **kw)

    monkeypatch.setattr(hmil.training.cohort, "available_memory", lambda: 8 * 2**30)
    assert cache_budget(options(), 1) == 2 * 2**30  # a quarter of 8 GiB
    assert cache_budget(options(), 100 * 2**30) == 2 * 2**30  # larger cohorts: part of them
    assert cache_budget(options(cache_gib=0.5), 100 * 2**30) == 2**29
    assert cache_budget(options(num_workers=2), 1) == 0  # a worker's copy dies with its loader
    assert cache_budget(options(cache=True), 10 * 2**30) == math.inf  # --cache: all
    assert cache_budget(options(cache=False, cache_gib=1.0), 1) == 0  # --no-cache: none


def test_cache_gib_refuses_a_negative_budget(cohort, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train(cohort, tmp_path / "bad", "--cache-gib", "-1")
    assert "--cache-gib: must be ≥ 0, got -1.0" in capsys.readouterr().err


def test_two_loader_workers_give_the_same_result_as_none(cohort, reference_run, tmp_path):
    predictions, log = train(cohort, tmp_path / "workers", "--num-workers", "2")
    pd.testing.assert_frame_equal(predictions, reference_run[0])
    pd.testing.assert_frame_equal(log, reference_run[1])


def test_adamw_with_cosine_schedule_anneals_the_lr_from_lr_to_its_floor(cohort, tmp_path):
    epochs, lr = 6, 1e-3
    out = tmp_path / "adamw"
    _, log = train(
        cohort, out, "--optimizer", "adamw", "--scheduler", "cosine", "--lr-floor", "0",
        "--weight-decay", "0.01", epochs=epochs,
    )  # fmt: skip
    # log.csv records the lr each epoch trained with: lr·(1 + cos(πe/E))/2.
    expected = [lr * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)]
    assert log["lr"].tolist() == pytest.approx(expected, rel=1e-6)
    assert log["lr"].iloc[0] == pytest.approx(lr) and log["lr"].iloc[-1] < 0.1 * lr

    checkpoint = torch.load(out / "last.pt", weights_only=False)
    assert checkpoint["optimizer"]["param_groups"][0]["weight_decay"] == pytest.approx(0.01)
    assert checkpoint["scheduler"]["T_max"] == epochs
    assert checkpoint["scheduler"]["last_epoch"] == epochs  # stepped after every epoch
    # After the last step the schedule has reached its floor.
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert (config["optimizer"], config["scheduler"]) == ("adamw", "cosine")


def test_default_schedule_warms_up_in_steps_and_never_falls_below_its_floor(cohort, tmp_path):
    """8 training slides, 4 bags per step: 2 steps an epoch; warm-up 1 epoch, floor 5 %."""
    epochs, lr = 8, 1e-3
    out = tmp_path / "default"
    _, log = train(cohort, out, epochs=epochs)
    steps, warmup, floor = 2 * epochs, 2, 0.05

    def factor(step):  # the lr multiplier after `step` optimiser steps
        if step < warmup:
            return floor + (1 - floor) * (step + 1) / warmup
        progress = (step - warmup) / (steps - warmup)
        return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2

    # log.csv: the lr after each epoch's last step, i.e. the one the next step trains with
    expected = [lr * factor(2 * (e + 1)) for e in range(epochs)]
    assert log["lr"].tolist() == pytest.approx(expected, rel=1e-6)
    assert log["lr"].min() >= floor * lr * (1 - 1e-9)
    assert (log.loc[log["epoch"] < epochs / 2, "lr"] > 0.5 * lr).all()  # no collapse by E/2
    checkpoint = torch.load(out / "last.pt", weights_only=False)
    assert checkpoint["scheduler"]["last_epoch"] == steps  # stepped after every step
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["protocol"] == "default" and config["scheduler"] == "warmup_cosine"
    assert (config["dropout"], config["instance_dropout"]) == (0.25, 0.25)
    assert config["min_epochs"] == math.ceil(epochs / math.sqrt(2))  # HMIL's curriculum


def test_paper_protocol_runs_the_reference_settings(cohort, tmp_path):
    out = tmp_path / "paper"
    # a flag still wins over the protocol: 4 bags per step on this 8-slide fold
    train(cohort, out, "--protocol", "paper", epochs=2)
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config | {"batch_bags": 64} == config | {
        "protocol": "paper", "optimizer": "adam", "scheduler": "plateau", "weight_decay": 0.0,
        "lr_floor": 0.0, "dropout": 0.0, "instance_dropout": 0.0, "min_epochs": 0,
        "patience": 20, "batch_bags": 64,
    }  # fmt: skip
    assert config["batch_bags"] == 4


def test_early_stopping_waits_for_the_minimum_epochs(cohort, tmp_path):
    out = tmp_path / "patient"
    # lr 0: nothing improves after epoch 0, so patience 1 would stop after epoch 1
    train(cohort, out, "--lr", "1e-12", "--patience", "1", "--min-epochs", "5", epochs=8)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_early"] and metrics["epochs_trained"] == 5
    assert metrics["best_epoch"] == 0


def test_run_whose_best_epoch_is_its_first_says_so(cohort, tmp_path, caplog):
    out = tmp_path / "untrained"
    with caplog.at_level("WARNING", logger="hmil.train"):
        train(cohort, out, "--lr", "1e-12", epochs=8)
    warnings = json.loads((out / "metrics.json").read_text())["learning_warnings"]
    assert any("best validation epoch is 0 of 8" in warning for warning in warnings)
    lines = [r.getMessage() for r in caplog.records if "may not have learned" in r.getMessage()]
    assert len(lines) == 1 and "best validation epoch is 0" in lines[0]


def test_learning_warnings_name_an_early_best_epoch_and_a_run_that_stayed_at_chance():
    def history(aucs):
        return [{"val_fine_auc": auc} for auc in aucs]

    learned = history([0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.9, 0.9, 0.9])
    assert learning_warnings(learned, best_epoch=6) == []
    (early,) = learning_warnings(learned, best_epoch=1)
    assert "best validation epoch is 1 of 10" in early
    # one lucky epoch (0.70) does not make a run that stayed at chance one that learned
    (chance,) = learning_warnings(history([0.5, 0.52, 0.48, 0.54, 0.5, 0.7, 0.5, 0.5]), 5)
    assert "stayed at chance (median 0.500 over epochs 2–7 ≤ 0.550)" in chance
    assert learning_warnings(history([float("nan")] * 8), best_epoch=7) == []


def test_chance_bar_is_what_random_scores_reach_on_the_validation_labels():
    few = np.repeat(np.arange(7), 4)  # 28 validation slides, as a 300-slide cohort's fold
    many = np.repeat(np.arange(7), 100)
    assert 0.58 < chance_macro_auc(few) < 0.62  # sklearn on 2,000 random draws: 0.601
    assert 0.5 < chance_macro_auc(many) < 0.53
    assert math.isnan(chance_macro_auc(np.zeros(10, dtype=int)))
    # a median of 0.58 is chance on 28 slides, and above it on 700
    modest = [{"val_fine_auc": 0.58}] * 12
    (chance,) = learning_warnings(modest, 8, few)
    assert "median 0.580 over epochs 3–11" in chance and "on 28 slides" in chance
    assert learning_warnings(modest, 8, many) == []


def test_instance_dropout_drops_about_its_fraction_and_keeps_one():
    torch.manual_seed(0)
    bag = torch.arange(10_000, dtype=torch.float32).unsqueeze(1)
    kept = drop_instances(bag, 0.25)
    assert 0.73 < len(kept) / len(bag) < 0.77
    assert torch.equal(kept, bag[torch.isin(bag[:, 0], kept[:, 0])])  # order and rows kept
    assert drop_instances(bag, 0.0) is bag
    assert all(len(drop_instances(bag[:1], 0.99)) == 1 for _ in range(20))


def test_tensorboard_event_files_hold_the_logged_scalars(cohort, tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    out = tmp_path / "tensorboard_run"
    _, log = train(cohort, out, epochs=2)
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    # Scalar tags are stored as plain strings in the event records.
    data = b"".join(path.read_bytes() for path in events)
    for tag in ("train_loss", "val_loss", "val_fine_auc", "alpha", "tau", "lr"):
        assert tag in log.columns and tag.encode() in data, tag
