"""Model selection over epochs: an epoch's log row, its score, the best epoch so far,
early stopping, and the warnings of a run that may not have learned."""

from __future__ import annotations

import copy
import math
from typing import Any

from torch import nn

from hmil.training.losses import HMILLoss, curriculum_weight
from hmil.training.prediction import SlidePredictions, split_metrics


def epoch_log_row(
    epoch: int,
    loss_fn: HMILLoss,
    lr: float,
    train_terms: dict[str, float],
    val: SlidePredictions,
    seconds: float,
) -> dict[str, float]:
    """One row of log.csv: schedules, every loss term (train and val), val metrics."""
    metrics = split_metrics(val)
    coarse = metrics["coarse"] or metrics["coarse_from_fine"]
    row: dict[str, float] = {
        "epoch": epoch,
        "alpha": curriculum_weight(epoch, loss_fn.num_epochs),
        "tau": loss_fn.temperature(epoch),
        "lr": lr,
    }
    row |= {f"train_{name}": value for name, value in train_terms.items() if name != "total"}
    row["train_loss"] = train_terms["total"]
    row |= {f"val_{name}": value for name, value in val.loss.items() if name != "total"}
    row["val_loss"] = val.loss["total"]
    row |= {
        "val_fine_auc": metrics["fine"]["auc"],
        "val_coarse_auc": coarse["auc"],
        "val_fine_accuracy": metrics["fine"]["accuracy"],
        "val_coarse_accuracy": coarse["accuracy"],
        "seconds": seconds,
    }
    return row


def selection_score(row: dict[str, float], use_auc: bool) -> float:
    """Higher is better: val fine macro AUC, or −val loss when val has < 2 fine classes."""
    if use_auc and not math.isnan(row["val_fine_auc"]):
        return row["val_fine_auc"]
    return -row["val_loss"]


#: A best epoch below this (or below E/4 for short runs) is an early best: the saved model
#: is the initialisation or close to it.
EARLY_BEST_EPOCHS = 5
#: Validation fine macro-AUC that a run must exceed at some epoch to have left chance (0.5);
#: the margin absorbs the noise of a validation set of 20–60 slides.
CHANCE_AUC_MARGIN = 0.05


def learning_warnings(history: list[dict[str, float]], best_epoch: int | None) -> list[str]:
    """Why a finished run's model may not have learned: its best validation epoch is one of
    the first few, or its validation fine AUC never left chance. Empty when neither."""
    warnings = []
    early = max(1, min(EARLY_BEST_EPOCHS, len(history) // 4))
    if best_epoch is not None and best_epoch < early and len(history) > early:
        warnings.append(
            f"best validation epoch is {best_epoch} of {len(history)} (the saved model is "
            f"the initialisation or close to it)"
        )
    aucs = [row["val_fine_auc"] for row in history if not math.isnan(row["val_fine_auc"])]
    if aucs and max(aucs) <= 0.5 + CHANCE_AUC_MARGIN:
        warnings.append(
            f"validation fine macro-AUC never left chance (best {max(aucs):.3f} ≤ "
            f"{0.5 + CHANCE_AUC_MARGIN:.2f})"
        )
    return warnings


def record_epoch(
    state: dict[str, Any],
    epoch: int,
    row: dict[str, float],
    model: nn.Module,
    patience: int,
    min_epochs: int,
) -> None:
    """Add epoch ``epoch``'s log ``row`` to the training ``state``: keep the model if it
    scores best so far, and mark the run stopped early after ``patience`` epochs without a
    better one (never before ``min_epochs``)."""
    state["history"].append(row)
    # use_auc: check_cohort refused a validation set of one fine class
    score = selection_score(row, use_auc=True)
    if state["best_score"] is None or score > state["best_score"]:
        state["best_score"], state["best_epoch"] = score, epoch
        state["best_state"] = copy.deepcopy(model.state_dict())
        state["epochs_without_improvement"] = 0
    else:
        state["epochs_without_improvement"] += 1
    state["stopped_early"] = (
        state["epochs_without_improvement"] >= patience and epoch + 1 >= min_epochs
    )
    state["epoch"] = epoch + 1
