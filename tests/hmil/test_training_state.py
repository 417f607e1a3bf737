"""The training state is a value: last.pt holds it as the plain dict of earlier releases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hmil.training.selection import TrainingState

#: What last.pt's "state" has held since the first release.
SAVED_KEYS = {
    "epoch", "history", "best_score", "best_epoch", "best_state",
    "epochs_without_improvement", "stopped_early",
}  # fmt: skip


def row(auc: float) -> dict[str, float]:
    return {"val_fine_auc": auc, "val_loss": 1.0}


def test_the_state_keeps_the_best_epoch_and_stops_after_its_patience():
    model, state = nn.Linear(2, 1), TrainingState()
    for epoch, auc in enumerate([0.6, 0.8, 0.7, 0.7]):
        state.record_epoch(epoch, row(auc), model, patience=2, min_epochs=0, selection="auc")
    assert (state.epoch, state.best_epoch, state.best_score) == (4, 1, 0.8)
    assert state.epochs_without_improvement == 2 and state.stopped_early
    assert set(state.best_state) == {"weight", "bias"}


def test_the_saved_state_is_the_earlier_releases_dict_and_reads_back(tmp_path):
    state = TrainingState()
    state.record_epoch(0, row(0.7), nn.Linear(2, 1), patience=5, min_epochs=0, selection="auc")
    saved = state.as_saved()
    assert set(saved) == SAVED_KEYS
    torch.save({"state": saved}, tmp_path / "last.pt")
    loaded = torch.load(tmp_path / "last.pt", weights_only=True)["state"]
    restored = TrainingState.of_saved(loaded)
    assert restored.history == state.history and restored.best_epoch == 0
    assert torch.equal(restored.best_state["weight"], state.best_state["weight"])


def test_a_state_of_another_shape_is_refused_naming_what_it_found():
    with pytest.raises(ValueError, match=r"found \['epoch'\]"):
        TrainingState.of_saved({"epoch": 3})
    with pytest.raises(ValueError, match="found list"):
        TrainingState.of_saved([])


def test_selection_by_loss_keeps_the_lowest_val_fine_ce_where_auc_keeps_its_first_peak():
    # AUC at its ceiling from epoch 1 while the cross-entropy still falls: the case of the
    # imbalanced cohorts, where AUC kept an epoch whose arg-max was still poor
    rows = [
        {"val_fine_auc": auc, "val_fine_ce": ce, "val_loss": 9.0}
        for auc, ce in [(0.90, 1.2), (0.99, 0.7), (0.99, 0.4), (0.98, 0.3), (0.99, 0.5)]
    ]
    by = {}
    for selection in ("auc", "loss"):
        state = TrainingState()
        for epoch, values in enumerate(rows):
            state.record_epoch(epoch, values, nn.Linear(2, 1), 9, 0, selection)
        by[selection] = (state.best_epoch, state.best_score, state.epochs_without_improvement)
    assert by == {"auc": (1, 0.99, 3), "loss": (3, -0.3, 1)}
