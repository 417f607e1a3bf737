"""Model selection over epochs: an epoch's log row, its score, the best epoch so far,
early stopping, and the warnings of a run that may not have learned."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from torch import nn

from hmil.training.losses import HMILLoss, curriculum_weight
from hmil.training.prediction import SlidePredictions, split_metrics
from hmil.training.selection_metrics import chance_macro_auc


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


def selection_score(row: dict[str, float], selection: str) -> float:
    """Higher is better. ``auc``: val fine macro-AUC (−val loss when val has < 2 fine
    classes). ``loss``: −val fine cross-entropy, which also sees how sure and how well
    placed the arg-max is: on cohorts where val AUC reaches its ceiling within a few
    epochs, AUC keeps the first of them, before accuracy has followed."""
    if selection == "loss" and not math.isnan(row.get("val_fine_ce", math.nan)):
        return -row["val_fine_ce"]
    if not math.isnan(row["val_fine_auc"]):
        return row["val_fine_auc"]
    return -row["val_loss"]


#: A best epoch below this (or below E/4 for short runs) is an early best: the saved model
#: is the initialisation or close to it.
EARLY_BEST_EPOCHS = 5
#: Validation fine macro-AUC at or below which a run has not left chance (0.5), whatever
#: the size of its validation set; smaller sets raise the bar to what random scores reach.
CHANCE_AUC_MARGIN = 0.05
#: How often random scores may reach the bar on the run's own validation labels.
CHANCE_QUANTILE = 0.95


def learning_warnings(
    history: list[dict[str, float]],
    best_epoch: int | None,
    val_fine_labels: np.ndarray | None = None,
) -> list[str]:
    """Why a finished run's model may not have learned: its best validation epoch is one of
    the first few, or its validation fine AUC stayed at chance. Empty when neither.

    Chance is judged on the median over the epochs after the first quarter, not on the
    best epoch: the best of 50 noisy AUCs on 28 slides clears 0.6 by luck alone. The bar
    is the 95th percentile of random scores on ``val_fine_labels`` (at least 0.55).
    """
    warnings = []
    early = max(1, min(EARLY_BEST_EPOCHS, len(history) // 4))
    if best_epoch is not None and best_epoch < early and len(history) > early:
        warnings.append(
            f"best validation epoch is {best_epoch} of {len(history)} (the saved model is "
            f"the initialisation or close to it)"
        )
    start = len(history) // 4
    aucs = np.asarray([row["val_fine_auc"] for row in history[start:]], dtype=float)
    aucs = aucs[~np.isnan(aucs)]
    if len(aucs):
        bar, why = 0.5 + CHANCE_AUC_MARGIN, ""
        random_bar = math.nan
        if val_fine_labels is not None:
            random_bar = chance_macro_auc(val_fine_labels, CHANCE_QUANTILE)
        if random_bar > bar:  # False for NaN (fewer than two classes)
            bar = random_bar
            why = f"; random scores reach it 1 time in 20 on {len(val_fine_labels)} slides"
        median = float(np.median(aucs))
        if median <= bar:
            warnings.append(
                f"validation fine macro-AUC stayed at chance (median {median:.3f} over "
                f"epochs {start}–{len(history) - 1} ≤ {bar:.3f}{why})"
            )
    return warnings


@dataclass
class TrainingState:
    """Where a run's epochs stand: the log rows so far, the best epoch (its score and
    weights), how long since, whether early stopping ended the run. last.pt holds it as
    :meth:`as_saved`'s plain dict (read back with torch's weights-only loading)."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, Any] | None = None  # the best epoch's model state_dict
    epochs_without_improvement: int = 0
    stopped_early: bool = False

    def as_saved(self) -> dict[str, Any]:
        """The state as last.pt holds it (a dict: tensors and plain data only). Not
        ``asdict``: that would deep-copy the best weights every epoch."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def of_saved(cls, saved: Any) -> TrainingState:
        """The state :meth:`as_saved` gave (of this or an earlier release: the dict has
        not changed); ValueError for anything else."""
        names = {f.name for f in fields(cls)}
        if not isinstance(saved, dict) or set(saved) != names:
            found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"expected a training state of {sorted(names)}, found {found}")
        return cls(**saved)

    def record_epoch(
        self,
        epoch: int,
        row: dict[str, float],
        model: nn.Module,
        patience: int,
        min_epochs: int,
        selection: str,
    ) -> None:
        """Add epoch ``epoch``'s log ``row``: keep the model if it scores best so far, and
        mark the run stopped early after ``patience`` epochs without a better one (never
        before ``min_epochs``)."""
        self.history.append(row)
        score = selection_score(row, selection)
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            self.best_state = copy.deepcopy(model.state_dict())
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        self.stopped_early = self.epochs_without_improvement >= patience and epoch + 1 >= min_epochs
        self.epoch = epoch + 1
