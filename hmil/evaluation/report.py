"""The Markdown and JSON texts of an evaluation (summary.md, per_class.md, summary.json)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from hmil.evaluation.metrics import (
    CI_LEVEL,
    PER_CLASS_METRICS,
    fold_mean_std,
)
from hmil.evaluation.runs import (
    LEVELS,
)
from hmil.evaluation.summary import (
    ABSENT,
    METRIC_TITLES,
    NEVER_PREDICTED,
    Evaluation,
    LevelResult,
    absent_classes,
)


def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def mean_std_text(mean: float, std: float, num_folds: int) -> str:
    if num_folds == 0:
        return "n/a"
    return fmt(mean) if num_folds == 1 else f"{fmt(mean)} ± {fmt(std)}"


def ci_text(low: float, high: float) -> str:
    return "n/a" if math.isnan(low) else f"[{fmt(low)}, {fmt(high)}]"


def headline_text(evaluation: Evaluation, rows: list[dict[str, Any]]) -> str:
    """One line: the folds evaluated, the fine AUC over folds and pooled with its CI."""
    auc = {row["metric"]: row for row in rows if row["level"] == "fine"}["auc"]
    missing = ", ".join(m.describe() for m in evaluation.missing) or "none"
    return (
        f"{evaluation.name}: {len(evaluation.folds)} folds evaluated (missing: {missing}); "
        f"fine AUC {mean_std_text(auc['mean'], auc['std'], auc['n_folds'])} over folds, "
        f"pooled {fmt(auc['pooled'])} {ci_text(auc['ci_low'], auc['ci_high'])}"
    )


def header_lines(evaluation: Evaluation) -> list[str]:
    used = ", ".join(str(fold.fold) for fold in evaluation.folds)
    total = len(evaluation.folds) + len(evaluation.missing)
    external = evaluation.kind == "external"
    what = "Fold models in the ensemble" if external else "Folds evaluated"
    lines = [f"{what}: {used} ({len(evaluation.folds)} of {total})."]
    if evaluation.missing:
        lines.append(
            "**Missing folds:** " + "; ".join(m.describe() for m in evaluation.missing) + "."
        )
    pooled = "External cohort (labelled slides)" if external else "Pooled out-of-fold test set"
    lines.append(f"{pooled}: {len(evaluation.oof)} slides from {evaluation.num_patients} patients.")
    return lines


def provenance_line(evaluation: Evaluation) -> str:
    return f"code_version `{evaluation.version}`; parameters `{json.dumps(evaluation.params)}`"


def summary_markdown(evaluation: Evaluation, rows: list[dict[str, Any]]) -> str:
    external = evaluation.kind == "external"
    title = "External validation" if external else "Evaluation"
    lines = [f"# {title}: {evaluation.name}", "", *header_lines(evaluation), ""]
    for level in LEVELS:
        if level in evaluation.skipped:
            lines += [f"## {level}", "", f"Skipped: {evaluation.skipped[level]}.", ""]
            continue
        level_rows = [row for row in rows if row["level"] == level]
        lines += level_section(evaluation.levels[level], level_rows, external)
    lines += notes_lines(evaluation)
    return "\n".join(lines)


def level_section(result: LevelResult, rows: list[dict[str, Any]], external: bool) -> list[str]:
    """One level of summary.md: its metric table, then why some values are missing."""
    spread, pooled = ("Fold models: mean ± SD", "Ensemble") if external else (
        "Mean ± SD over folds", "Pooled")  # fmt: skip
    table = pd.DataFrame(
        [
            {
                "Metric": METRIC_TITLES[row["metric"]],
                spread: mean_std_text(row["mean"], row["std"], row["n_folds"]),
                "Folds": row["n_folds"],
                pooled: fmt(row["pooled"]),
                f"{CI_LEVEL:.0%} CI ({pooled.lower()})": ci_text(row["ci_low"], row["ci_high"]),
            }
            for row in rows
        ]
    )
    lines = [
        f"## {result.level} ({len(result.classes)} classes)",
        "",
        table.to_markdown(index=False, disable_numparse=True),
        "",
    ]
    for fold, metrics in result.per_fold.items():
        absent = absent_classes(metrics, result.classes)
        if absent:
            lines.append(
                f"- Fold {fold}: AUC over the {len(result.classes) - len(absent)} classes "
                f"present; {ABSENT}: {', '.join(absent)}."
            )
    if len(result.classes) == 2:
        positive, negative = result.classes[1], result.classes[0]
        lines.append(
            f"- Binary level: sensitivity = recall of {positive!r}, specificity = recall "
            f"of {negative!r}."
        )
    lines.append("")
    return lines


def notes_lines(evaluation: Evaluation) -> list[str]:
    """The conventions summary.md's numbers follow, so a reader can check them."""
    params = evaluation.params
    return [
        "## Notes",
        "",
        "- AUC: macro one-vs-rest AUC over the classes present in the test set; a class "
        "absent from a fold's test set has no AUC or recall (n/a, see per_class.md).",
        "- Mean ± SD: over the folds where the metric is defined; SD is the sample standard "
        "deviation (ddof = 1).",
        (
            "- Ensemble: the mean of the fold models' probabilities per slide (the deployed "
            "prediction); fold models: each fold's model alone on the same slides."
            if evaluation.kind == "external"
            else "- Pooled: the test predictions of all folds together, each slide scored by "
            "its own fold's model."
        ),
        f"- {CI_LEVEL:.0%} CI: percentile bootstrap of the pooled value, {params['bootstrap']} "
        f"resamples of the {evaluation.num_patients} patients with replacement (seed "
        f"{params['seed']}); resamples where a metric is undefined are left out.",
        f"- {provenance_line(evaluation)}",
        "",
    ]


def per_class_markdown(evaluation: Evaluation, table: pd.DataFrame) -> str:
    lines = [f"# Per-class metrics: {evaluation.name}", "", *header_lines(evaluation), ""]
    for level in LEVELS:
        if level in evaluation.skipped:
            lines += [f"## {level}", "", f"Skipped: {evaluation.skipped[level]}.", ""]
            continue
        result = evaluation.levels[level]
        level_rows = table[table["level"] == level]
        pooled = level_rows[level_rows["fold"] == "pooled"].set_index("class")
        rows = []
        for c, name in enumerate(result.classes):
            row = pooled.loc[name]
            fold_aucs = [m.per_class["auc"][c] for m in result.per_fold.values()]
            mean, std, num_folds = fold_mean_std(fold_aucs)
            entry = {
                "Class": name,
                "Support (pooled)": int(row["support"]),
                "Precision": fmt(row["precision"]),
                "Recall": fmt(row["recall"]),
                "F1": fmt(row["f1"]),
                "Specificity": fmt(row["specificity"]),
                "AUC pooled": fmt(row["auc"]),
                f"AUC {CI_LEVEL:.0%} CI": ci_text(row["auc_ci_low"], row["auc_ci_high"]),
                "AUC mean ± SD (folds)": f"{mean_std_text(mean, std, num_folds)} ({num_folds})",
            }
            for fold, metrics in result.per_fold.items():
                entry[f"AUC fold {fold}"] = (
                    ABSENT if not metrics.present[c] else fmt(metrics.per_class["auc"][c])
                )
            if row["note"]:
                entry["Precision" if row["note"] == NEVER_PREDICTED else "AUC pooled"] = row["note"]
            rows.append(entry)
        lines += [
            f"## {level}",
            "",
            pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True),
            "",
        ]
    lines += [
        "Precision, recall, F1, specificity and AUC (one-vs-rest) are of the pooled test set; "
        "the fold columns give each fold's AUC. A class absent from a test set has no recall "
        "or AUC there (n/a), and the macro AUC of that set averages the classes present.",
        "",
        provenance_line(evaluation),
        "",
    ]
    return "\n".join(lines)


def summary_json(evaluation: Evaluation, rows: list[dict[str, Any]], table: pd.DataFrame) -> dict:
    headline: dict[str, dict[str, Any]] = {}
    for row in rows:
        values = {k: v for k, v in row.items() if k not in ("level", "metric")}
        headline.setdefault(row["level"], {})[row["metric"]] = values
    per_class: dict[str, dict[str, Any]] = {}
    pooled = table[table["fold"] == "pooled"]
    for level, result in evaluation.levels.items():
        level_rows = pooled[pooled["level"] == level].set_index("class")
        per_class[level] = {}
        for c, name in enumerate(result.classes):
            fold_aucs = [m.per_class["auc"][c] for m in result.per_fold.values()]
            mean, std, num_folds = fold_mean_std(fold_aucs)
            row = level_rows.loc[name]
            per_class[level][name] = {
                "support": int(row["support"]),
                **{m: float(row[m]) for m in PER_CLASS_METRICS},
                "auc_ci_low": float(row["auc_ci_low"]),
                "auc_ci_high": float(row["auc_ci_high"]),
                "auc_fold_mean": mean,
                "auc_fold_std": std,
                "auc_n_folds": num_folds,
                "note": row["note"],
            }
    return {
        "name": evaluation.name,
        "encoder": evaluation.encoder,
        "model": evaluation.model,
        "run_dirs": [str(fold.run_dir) for fold in evaluation.folds],
        "folds_used": [fold.fold for fold in evaluation.folds],
        "missing_folds": [
            {"fold": m.fold, "run_dir": str(m.run_dir), "reason": m.reason}
            for m in evaluation.missing
        ],
        "classes": {
            "fine": list(evaluation.classes.fine),
            "coarse": list(evaluation.classes.coarse),
        },
        "levels": list(evaluation.levels),
        "skipped_levels": evaluation.skipped,
        "n_slides": len(evaluation.oof),
        "n_patients": evaluation.num_patients,
        "headline": headline,
        "per_class": per_class,
        "conventions": {
            "auc": "macro one-vs-rest over the classes present in the test set",
            "std": "sample standard deviation over folds (ddof=1)",
            "ci": f"{CI_LEVEL:.0%} percentile bootstrap of the pooled value, patients resampled",
            "binary_positive_class": "the second class of the level",
        },
        "training_code_versions": sorted(
            {fold.train_code_version for fold in evaluation.folds if fold.train_code_version}
        ),
        "code_version": evaluation.version,
        "params": evaluation.params,
    }


def json_safe(value: Any) -> Any:
    """NaN → null and numpy scalars → Python, so the file is strict JSON."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
