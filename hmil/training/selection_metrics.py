"""Slide-level classification metrics that tolerate classes missing from a split.

Validation and test sets of small cohorts often lack a class. Macro AUC is therefore the
mean of the one-vs-rest AUCs of the classes present in the true labels (the sklearn
``multi_class="ovr"`` macro average restricted to those classes), and NaN when fewer
than two classes are present; it never raises.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest ROC AUC over the classes present in ``labels``.

    Args:
        labels: int [S] true class indices.
        probs: float [S, C] class probabilities.

    Returns NaN when fewer than two classes are present (no AUC is defined).
    """
    labels = np.asarray(labels)
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    aucs = [roc_auc_score(labels == c, probs[:, c]) for c in present]
    return float(np.mean(aucs))


def chance_macro_auc(
    labels: np.ndarray, quantile: float = 0.95, replicates: int = 2000, seed: int = 0
) -> float:
    """The ``quantile`` of the macro AUC that random scores reach on these ``labels``.

    On the 20–60 validation slides of a small cohort chance is not 0.5 but a spread (its
    95th percentile is ≈ 0.6 for 28 slides of 7 classes), so whether a run left chance is
    judged against this. Replicate scores are independent uniforms per class, ranked at
    once (Mann–Whitney); NaN when fewer than two classes are present.
    """
    labels = np.asarray(labels)
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    total = np.zeros(replicates)
    for c in present:  # a loop over classes; replicates and slides are vectorised
        ranks = rng.random((replicates, len(labels))).argsort(axis=1).argsort(axis=1) + 1
        positive = labels == c
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        total += (ranks[:, positive].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(np.quantile(total / len(present), quantile))


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro AUC and macro F1 of probabilities [S, C].

    The predicted class is the arg-max. Empty inputs give NaN everywhere.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return dict.fromkeys(("accuracy", "balanced_accuracy", "auc", "f1"), math.nan)
    predicted = np.asarray(probs).argmax(axis=1)
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected when a split lacks a class.
        warnings.simplefilter("ignore", UserWarning)
        balanced_accuracy = float(balanced_accuracy_score(labels, predicted))
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "balanced_accuracy": balanced_accuracy,
        "auc": macro_auc(labels, probs),
        "f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }
