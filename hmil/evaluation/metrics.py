"""Evaluation metrics of slide-level predictions: point values, fold statistics, bootstrap CIs.

Point values come from scikit-learn. The bootstrap needs the same metrics on ~1000
resamples, where one scikit-learn call per class and replicate costs about a minute per
run; it therefore computes them for all replicates at once from per-replicate slide
weights (a resample is a weighted copy of the slides): accuracy, balanced accuracy and
macro F1 from weighted confusion matrices, one-vs-rest AUC as the weighted Mann–Whitney
statistic (ties count ½). With unit weights these equal scikit-learn's values, and with
the weights of a resample they equal scikit-learn's on the repeated slides
(tests/hmil/test_evaluate.py checks both).

Conventions, shared with :mod:`hmil.training.selection_metrics` (the trainer's model selection):

- the predicted class is the arg-max of the probabilities;
- macro AUC is the mean one-vs-rest AUC over the classes present in the true labels (NaN
  with fewer than two); a class absent from the labels has no AUC and no recall (NaN);
- macro F1 averages over the classes that are true or predicted (scikit-learn's default);
- balanced accuracy is the mean recall over the present classes;
- on a binary level the positive class is the second one: sensitivity is its recall,
  specificity the recall of the first.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

HEADLINE_METRICS = ("auc", "balanced_accuracy", "accuracy", "f1")
BINARY_METRICS = ("sensitivity", "specificity")
PER_CLASS_METRICS = ("precision", "recall", "f1", "specificity", "auc")
CI_LEVEL = 0.95
BOOTSTRAP_CHUNK = 250  # replicates per vectorised block: bounds memory at B × slides floats


def metric_names(num_classes: int) -> tuple[str, ...]:
    """Headline metrics of a level with ``num_classes`` classes (binary adds two)."""
    return HEADLINE_METRICS + (BINARY_METRICS if num_classes == 2 else ())


@dataclass(frozen=True)
class LevelMetrics:
    """Metrics of one level (fine, coarse, ...) on one set of slides.

    Attributes:
        headline: metric name → value (see :func:`metric_names`).
        per_class: metric name → float [C] (NaN where undefined).
        support: int [C] true slides per class.
        confusion: int [C, C] counts, rows true, columns predicted.
    """

    headline: dict[str, float]
    per_class: dict[str, np.ndarray]
    support: np.ndarray
    confusion: np.ndarray

    @property
    def present(self) -> np.ndarray:
        """bool [C]: classes with at least one true slide."""
        return self.support > 0


def per_class_auc(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """float [C]: one-vs-rest ROC AUC of each class (scikit-learn), NaN when the class is
    absent from ``labels`` or is the only one present."""
    num_classes = probs.shape[1]
    aucs = np.full(num_classes, math.nan)
    present = np.unique(labels)
    if len(present) < 2:
        return aucs
    for c in present:  # a loop over classes, each call vectorised over slides
        aucs[c] = roc_auc_score(labels == c, probs[:, c])
    return aucs


def level_metrics(labels: np.ndarray, probs: np.ndarray) -> LevelMetrics:
    """All metrics of int labels [S] against probabilities [S, C], with scikit-learn."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = probs.shape[1]
    classes = np.arange(num_classes)
    if len(labels) == 0:
        nan = np.full(num_classes, math.nan)
        return LevelMetrics(
            headline=dict.fromkeys(metric_names(num_classes), math.nan),
            per_class=dict.fromkeys(PER_CLASS_METRICS, nan),
            support=np.zeros(num_classes, dtype=np.int64),
            confusion=np.zeros((num_classes, num_classes), dtype=np.int64),
        )
    predicted = probs.argmax(axis=1)
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true" and undefined-metric warnings are expected
        # when a test set lacks a class; the NaNs below report it.
        warnings.simplefilter("ignore", UserWarning)
        precision, recall, f1, support = precision_recall_fscore_support(
            labels, predicted, labels=classes, zero_division=np.nan
        )
        headline = {
            "auc": _nanmean(per_class_auc(labels, probs)),
            "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
            "accuracy": float(accuracy_score(labels, predicted)),
            "f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        }
    one_vs_rest = multilabel_confusion_matrix(labels, predicted, labels=classes)
    true_negative, false_positive = one_vs_rest[:, 0, 0], one_vs_rest[:, 0, 1]
    specificity = _ratio(true_negative, true_negative + false_positive)
    recall = np.where(support > 0, recall, math.nan)
    if num_classes == 2:
        headline["sensitivity"] = float(recall[1])
        headline["specificity"] = float(recall[0])
    return LevelMetrics(
        headline=headline,
        per_class={
            "precision": precision.astype(np.float64),
            "recall": recall.astype(np.float64),
            "f1": f1.astype(np.float64),
            "specificity": specificity,
            "auc": per_class_auc(labels, probs),
        },
        support=support.astype(np.int64),
        confusion=confusion_matrix(labels, predicted, labels=classes),
    )


# ---- statistics over folds -------------------------------------------------------------------


def fold_mean_std(values: np.ndarray | list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof = 1) and count of the defined (non-NaN) values.

    The sample std estimates the spread of the metric between folds; it is NaN with
    fewer than two defined folds.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan, 0
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return float(np.mean(values)), std, len(values)


# ---- bootstrap -------------------------------------------------------------------------------


def patient_groups(patient_ids: np.ndarray | list[object]) -> np.ndarray:
    """int [S]: the patient index of each slide (the resampling unit)."""
    _, index = np.unique(np.asarray(patient_ids, dtype=str), return_inverse=True)
    return index.astype(np.int64)


def bootstrap_weights(
    groups: np.ndarray, num_replicates: int, rng: np.random.Generator
) -> np.ndarray:
    """float [B, S]: how often each slide appears in each of B resamples of the groups.

    Each resample draws as many groups as there are, with replacement; a drawn group
    brings all its slides (slides of one patient are correlated, so the patient is the
    independent unit).
    """
    num_groups = int(groups.max()) + 1
    draws = rng.integers(0, num_groups, size=(num_replicates, num_groups))
    offsets = (np.arange(num_replicates) * num_groups)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=num_replicates * num_groups)
    return counts.reshape(num_replicates, num_groups)[:, groups].astype(np.float64)


def weighted_confusion(
    labels: np.ndarray, predicted: np.ndarray, weights: np.ndarray, num_classes: int
) -> np.ndarray:
    """float [B, C, C]: confusion matrices (rows true) of B weightings [B, S] of the slides."""
    cells = np.zeros((len(labels), num_classes * num_classes))
    cells[np.arange(len(labels)), labels * num_classes + predicted] = 1.0
    return (weights @ cells).reshape(-1, num_classes, num_classes)


def confusion_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, macro F1 (and sensitivity/specificity when binary) of
    confusion matrices [B, C, C]; each value float [B]."""
    true_positive = np.diagonal(confusion, axis1=1, axis2=2)
    support = confusion.sum(axis=2)
    predicted = confusion.sum(axis=1)
    total = support.sum(axis=1)
    recall = _ratio(true_positive, support)
    f1 = _ratio(2 * true_positive, support + predicted)  # 2TP / (2TP + FP + FN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: empty resample
        metrics = {
            "accuracy": _ratio(true_positive.sum(axis=1), total),
            "balanced_accuracy": np.nanmean(recall, axis=1),
            "f1": np.nanmean(f1, axis=1),
        }
    if confusion.shape[1] == 2:
        metrics["sensitivity"] = recall[:, 1]
        metrics["specificity"] = recall[:, 0]
    return metrics


def weighted_ovr_auc(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """float [B, C]: one-vs-rest ROC AUC of each class under B slide weightings [B, S].

    The weighted Mann–Whitney statistic: the weighted share of (positive, negative) pairs
    ranked correctly, ties counting ½ — scikit-learn's ``roc_auc_score`` with
    ``sample_weight``. NaN where a weighting has no positive or no negative slide.
    """
    num_replicates, num_classes = weights.shape[0], probs.shape[1]
    aucs = np.full((num_replicates, num_classes), math.nan)
    for c in range(num_classes):  # a loop over classes; slides and replicates are vectorised
        order = np.argsort(probs[:, c], kind="stable")
        scores = probs[order, c]
        # Slides with equal scores form one rank group (exact equality, as roc_curve).
        starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
        positive = labels[order] == c
        ordered = weights[:, order]
        positive_weight = np.add.reduceat(ordered * positive, starts, axis=1)
        negative_weight = np.add.reduceat(ordered * ~positive, starts, axis=1)
        negatives_below = np.cumsum(negative_weight, axis=1) - negative_weight
        correct = (positive_weight * (negatives_below + 0.5 * negative_weight)).sum(axis=1)
        pairs = positive_weight.sum(axis=1) * negative_weight.sum(axis=1)
        aucs[:, c] = _ratio(correct, pairs)
    return aucs


@dataclass(frozen=True)
class BootstrapSamples:
    """Metric values of B bootstrap resamples of one level.

    Attributes:
        headline: metric name → float [B] (NaN where undefined in a resample).
        class_auc: float [B, C] one-vs-rest AUC per class.
    """

    headline: dict[str, np.ndarray]
    class_auc: np.ndarray


def bootstrap_level(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> BootstrapSamples:
    """The headline metrics and class AUCs of labels [S] / probs [S, C] under weights [B, S],
    computed in blocks of :data:`BOOTSTRAP_CHUNK` replicates."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = probs.shape[1]
    predicted = probs.argmax(axis=1)
    headline_blocks: dict[str, list[np.ndarray]] = {name: [] for name in metric_names(num_classes)}
    auc_blocks = []
    for start in range(0, weights.shape[0], BOOTSTRAP_CHUNK):
        block = weights[start : start + BOOTSTRAP_CHUNK]
        metrics = confusion_metrics(weighted_confusion(labels, predicted, block, num_classes))
        class_auc = weighted_ovr_auc(labels, probs, block)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # < 2 classes in a resample
            metrics["auc"] = np.nanmean(class_auc, axis=1)
        for name in headline_blocks:
            headline_blocks[name].append(metrics[name])
        auc_blocks.append(class_auc)
    if not auc_blocks:
        empty = np.zeros(0)
        return BootstrapSamples(dict.fromkeys(headline_blocks, empty), np.zeros((0, num_classes)))
    return BootstrapSamples(
        headline={name: np.concatenate(blocks) for name, blocks in headline_blocks.items()},
        class_auc=np.concatenate(auc_blocks),
    )


def percentile_ci(samples: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float, int]:
    """Percentile interval of the defined (non-NaN) bootstrap values and their count.

    Resamples where the metric is undefined (e.g. a class drawn without any patient) are
    left out, so the interval is conditional on the metric being defined.
    """
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[~np.isnan(samples)]
    if len(samples) == 0:
        return math.nan, math.nan, 0
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high), len(samples)


# ---- helpers ---------------------------------------------------------------------------------


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, math.nan)


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else math.nan
