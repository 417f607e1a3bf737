"""Metrics of an evaluation: per fold, pooled and bootstrapped, and the tables of them.

Cross-validation pools the folds' test sets; external validation (deployment) pools the
fold models' ensemble on one cohort. Both give an :class:`Evaluation`, which the report
and output modules turn into files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from hmil.evaluation.metrics import (
    PER_CLASS_METRICS,
    BootstrapSamples,
    LevelMetrics,
    bootstrap_level,
    bootstrap_weights,
    fold_mean_std,
    level_metrics,
    metric_names,
    patient_groups,
    percentile_ci,
)
from hmil.evaluation.runs import (
    LEVELS,
    Classes,
    Fold,
    MissingFold,
)
from plumbing.provenance import code_version

METRIC_TITLES = {
    "auc": "AUC (macro one-vs-rest)",
    "balanced_accuracy": "Balanced accuracy",
    "accuracy": "Accuracy",
    "f1": "F1 (macro)",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
}
ABSENT = "n/a: class absent from test set"
NEVER_PREDICTED = "n/a: never predicted"


# ---- evaluation ------------------------------------------------------------------------------


@dataclass
class LevelResult:
    """Everything computed for one level."""

    level: str
    classes: tuple[str, ...]
    per_fold: dict[int, LevelMetrics]
    pooled: LevelMetrics
    pooled_labels: np.ndarray
    pooled_probs: np.ndarray
    bootstrap: BootstrapSamples


@dataclass
class Evaluation:
    encoder: str
    model: str
    folds: list[Fold]
    missing: list[MissingFold]
    classes: Classes
    levels: dict[str, LevelResult]
    skipped: dict[str, str]
    params: dict[str, Any]
    oof: pd.DataFrame
    num_patients: int
    version: str = field(default_factory=code_version)
    #: "cross-validation" (pooled: the folds' test sets together) or "external" (pooled:
    #: the fold models' ensemble on one external cohort; per fold: each model alone)
    kind: str = "cross-validation"

    @property
    def name(self) -> str:
        return f"{self.encoder}/{self.model}"


def evaluate(
    folds: list[Fold],
    missing: list[MissingFold],
    identity: tuple[str, str],
    params: dict[str, Any],
    pooled: Fold | None = None,
) -> Evaluation:
    """Per-fold and pooled metrics of every level, with bootstrap samples of the pooled ones.

    ``pooled`` (external validation): the predictions to pool instead of the folds' test
    sets together, i.e. the fold models' ensemble on an external cohort, which every fold
    scored whole.
    """
    classes = folds[0].classes
    if pooled is None:
        oof = pd.concat([fold.test.assign(fold=fold.fold) for fold in folds], ignore_index=True)
        oof.insert(0, "fold", oof.pop("fold"))
        pooled_parts = folds
    else:
        oof, pooled_parts = pooled.test, [pooled]
    groups = patient_groups(oof["patient_id"].to_numpy())
    rng = np.random.default_rng(params["seed"])
    # One set of resamples for every level and metric, so their CIs are paired.
    weights = bootstrap_weights(groups, params["bootstrap"], rng)
    skipped = {}
    levels = {}
    for level in LEVELS:
        if level == "coarse" and not all(fold.has_coarse_head for fold in folds):
            flat = [str(fold.fold) for fold in folds if not fold.has_coarse_head]
            skipped[level] = (
                f"no coarse head (p_coarse_* empty in fold {', '.join(flat)}: a flat model); "
                "coarse_from_fine is its coarse-level result"
            )
            continue
        labels = np.concatenate([fold.labels(level) for fold in pooled_parts])
        probs = np.concatenate([fold.probs(level) for fold in pooled_parts])
        levels[level] = LevelResult(
            level=level,
            classes=classes.of(level),
            per_fold={
                fold.fold: level_metrics(fold.labels(level), fold.probs(level)) for fold in folds
            },
            pooled=level_metrics(labels, probs),
            pooled_labels=labels,
            pooled_probs=probs,
            bootstrap=bootstrap_level(labels, probs, weights),
        )
    return Evaluation(
        encoder=identity[0],
        model=identity[1],
        folds=folds,
        missing=missing,
        classes=classes,
        levels=levels,
        skipped=skipped,
        params=params,
        oof=oof,
        num_patients=int(groups.max()) + 1,
        kind="cross-validation" if pooled is None else "external",
    )


# ---- tables ----------------------------------------------------------------------------------


def absent_classes(metrics: LevelMetrics, classes: tuple[str, ...]) -> list[str]:
    return [name for name, present in zip(classes, metrics.present, strict=True) if not present]


def metrics_per_fold_table(evaluation: Evaluation) -> pd.DataFrame:
    rows = []
    for fold in evaluation.folds:
        for level, result in evaluation.levels.items():
            metrics = result.per_fold[fold.fold]
            absent = absent_classes(metrics, result.classes)
            present = len(result.classes) - len(absent)
            note = ""
            if absent:
                note = f"AUC over the {present} classes present; absent: {', '.join(absent)}"
            rows.append(
                {
                    "fold": fold.fold,
                    "level": level,
                    "n_slides": len(fold.test),
                    "n_patients": fold.test["patient_id"].nunique(),
                    **metrics.headline,
                    "auc_classes": f"{present}/{len(result.classes)}",
                    "note": note,
                }
            )
    table = pd.DataFrame(rows)
    metric_columns = [m for m in METRIC_TITLES if m in table.columns]
    other = [c for c in table.columns if c not in metric_columns]
    return table[other[:4] + metric_columns + other[4:]]


def summary_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    rows = []
    for level, result in evaluation.levels.items():
        for metric in metric_names(len(result.classes)):
            fold_values = [m.headline[metric] for m in result.per_fold.values()]
            mean, std, num_folds = fold_mean_std(fold_values)
            low, high, num_valid = percentile_ci(result.bootstrap.headline[metric])
            rows.append(
                {
                    "level": level,
                    "metric": metric,
                    "mean": mean,
                    "std": std,
                    "n_folds": num_folds,
                    "pooled": result.pooled.headline[metric],
                    "ci_low": low,
                    "ci_high": high,
                    "n_bootstrap": num_valid,
                }
            )
    return rows


def per_class_table(evaluation: Evaluation) -> pd.DataFrame:
    rows = []
    for level, result in evaluation.levels.items():
        parts = [(str(fold), metrics) for fold, metrics in result.per_fold.items()]
        parts.append(("pooled", result.pooled))
        for fold_name, metrics in parts:
            for c, name in enumerate(result.classes):
                row = {
                    "level": level,
                    "fold": fold_name,
                    "class": name,
                    "support": int(metrics.support[c]),
                    **{m: float(metrics.per_class[m][c]) for m in PER_CLASS_METRICS},
                    "auc_ci_low": math.nan,
                    "auc_ci_high": math.nan,
                    "note": class_note(metrics, c),
                }
                if fold_name == "pooled":
                    low, high, _ = percentile_ci(result.bootstrap.class_auc[:, c])
                    row["auc_ci_low"], row["auc_ci_high"] = low, high
                rows.append(row)
    return pd.DataFrame(rows)


def class_note(metrics: LevelMetrics, c: int) -> str:
    if not metrics.present[c]:
        return ABSENT
    if math.isnan(metrics.per_class["precision"][c]):
        return NEVER_PREDICTED
    return ""


def confusion_table(result: LevelResult) -> pd.DataFrame:
    table = pd.DataFrame(
        result.pooled.confusion, index=list(result.classes), columns=list(result.classes)
    )
    table.index.name = "true \\ predicted"
    return table
