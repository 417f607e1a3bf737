"""Trainer options that must not change the result (feature cache, data-loader workers), the
AdamW + cosine schedule, and TensorBoard logging. A 16-slide generated cohort, few epochs."""

import json
import math
from collections import Counter

import pandas as pd
import pytest
import torch

import hmil.bags
from hmil.synthetic_features import SyntheticConfig
from hmil.train import main
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
    """3 epochs with the defaults: no cache, no workers."""
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
    load = hmil.bags.load_bag_features

    def counting_load(path, slide_id):
        reads[slide_id] += 1
        return load(path, slide_id)

    monkeypatch.setattr(hmil.bags, "load_bag_features", counting_load)
    return reads


def test_cache_reads_each_file_once_and_gives_the_same_predictions(
    cohort, reference_run, tmp_path, feature_reads
):
    predictions, log = train(cohort, tmp_path / "cached", "--cache")
    pd.testing.assert_frame_equal(predictions, reference_run[0])
    pd.testing.assert_frame_equal(log, reference_run[1])
    # Every slide of train, val and test was read exactly once over 3 epochs + final outputs.
    assert set(feature_reads) == set(cohort["table"]["slide_id"])
    assert set(feature_reads.values()) == {1}

    feature_reads.clear()
    train(cohort, tmp_path / "uncached")
    train_slides = cohort["table"].loc[cohort["table"]["fold0"] == "train", "slide_id"]
    assert all(feature_reads[slide_id] == 3 for slide_id in train_slides)  # once per epoch


def test_two_loader_workers_give_the_same_result_as_none(cohort, reference_run, tmp_path):
    predictions, log = train(cohort, tmp_path / "workers", "--num-workers", "2")
    pd.testing.assert_frame_equal(predictions, reference_run[0])
    pd.testing.assert_frame_equal(log, reference_run[1])


def test_adamw_with_cosine_schedule_anneals_the_lr_from_lr_to_zero(cohort, tmp_path):
    epochs, lr = 6, 1e-3
    out = tmp_path / "adamw"
    _, log = train(cohort, out, "--optimizer", "adamw", "--scheduler", "cosine", epochs=epochs)
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
