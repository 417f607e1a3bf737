"""Writing an evaluation's files, all renamed into place together (atomic as a set)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.image import imsave

from hmil.evaluation import plots
from hmil.evaluation.comparison import mark_failed
from hmil.evaluation.report import (
    json_safe,
    per_class_markdown,
    summary_json,
    summary_markdown,
)
from hmil.evaluation.runs import REQUIRED_COLUMNS
from hmil.evaluation.summary import (
    Evaluation,
    confusion_table,
    metrics_per_fold_table,
    per_class_table,
    summary_rows,
)
from plumbing.atomic import atomic_outputs
from plumbing.provenance import code_version
from preprocessing.slides.qc import render_failure

# ---- writing ---------------------------------------------------------------------------------


def write_outputs(evaluation: Evaluation, out: Path) -> list[dict[str, Any]]:
    """Every table, JSON and figure, renamed into ``out`` together once all are written.
    Returns the summary rows (level, metric, mean, std, pooled, CI)."""
    rows = summary_rows(evaluation)
    per_class = per_class_table(evaluation)
    metadata = {
        "Software": f"hmil-pipeline {evaluation.version}",
        "Description": json.dumps({"run": evaluation.name, **evaluation.params}),
    }
    texts: dict[str, str] = {
        "summary.md": summary_markdown(evaluation, rows),
        "per_class.md": per_class_markdown(evaluation, per_class),
        "summary.json": json.dumps(json_safe(summary_json(evaluation, rows, per_class)), indent=2)
        + "\n",
    }
    tables: dict[str, tuple[pd.DataFrame, bool]] = {
        "metrics_per_fold.csv": (metrics_per_fold_table(evaluation), False),
        "summary.csv": (pd.DataFrame(rows), False),
        "per_class.csv": (per_class, False),
        "oof_predictions.csv": (evaluation.oof, False),
    }
    for level, result in evaluation.levels.items():
        tables[f"confusion_{level}.csv"] = (confusion_table(result), True)
    figures = ["training_curves.png"]
    for level in evaluation.levels:
        figures += [f"roc_{level}.png", f"confusion_{level}.png"]
    names = [*texts, *tables, *figures]
    paths = [out / name for name in names]
    with atomic_outputs(*paths) as temps:
        temp_of = dict(zip(names, temps, strict=True))
        for name, text in texts.items():
            temp_of[name].write_text(text)
        for name, (table, keep_index) in tables.items():
            table.to_csv(temp_of[name], index=keep_index)
        draw_figures(evaluation, rows, temp_of, metadata)
    return rows


def draw_figures(
    evaluation: Evaluation,
    rows: list[dict[str, Any]],
    temp_of: dict[str, Path],
    metadata: dict[str, str],
) -> None:
    """ROC and confusion per level, and the training curves, into their temporary paths."""
    for level, result in evaluation.levels.items():
        title = f"{evaluation.name}: {level}"
        summary_of = {row["metric"]: row for row in rows if row["level"] == level}
        plots.plot_roc(
            temp_of[f"roc_{level}.png"],
            result.pooled_labels,
            result.pooled_probs,
            result.classes,
            result.pooled.per_class["auc"],
            summary_of["auc"]["pooled"],
            f"{title} — pooled out-of-fold ROC (one-vs-rest)",
            metadata,
        )
        plots.plot_confusion(
            temp_of[f"confusion_{level}.png"],
            result.pooled.confusion,
            result.classes,
            f"{title} — pooled confusion (count, row %)",
            metadata,
        )
    logs = {f"fold {f.fold}": f.log_table for f in evaluation.folds if f.log_table is not None}
    best = {f"fold {f.fold}": f.best_epoch for f in evaluation.folds}
    plots.plot_training_curves(
        temp_of["training_curves.png"], logs, best, f"{evaluation.name}: training", metadata
    )


def write_failed_outputs(out: Path, name: str, reason: str, figures: list[str]) -> None:
    """The outputs of an evaluation that could not be made, each saying so (the workflow
    expects every file; the FAILED marker makes the comparison name the run)."""
    failure = {"name": name, "status": "failed", "reason": reason, "code_version": code_version()}
    texts = {
        "summary.json": json.dumps(failure, indent=2) + "\n",
        "summary.md": f"# {name}: evaluation failed\n\n{reason}\n",
        "per_class.md": f"# {name}: evaluation failed\n\n{reason}\n",
    }
    tables = {
        "summary.csv": pd.DataFrame([{"level": "", "metric": "", "status": "failed",
                                      "reason": reason}]),
        "per_class.csv": pd.DataFrame(columns=["level", "class", "status"]),
        "metrics_per_fold.csv": pd.DataFrame(columns=["fold", "level"]),
        "oof_predictions.csv": pd.DataFrame(columns=list(REQUIRED_COLUMNS)),
    }  # fmt: skip
    card = render_failure(name, reason)
    paths = [out / n for n in (*texts, *tables, *figures)]
    with atomic_outputs(*paths) as temps:
        temp_of = dict(zip([p.name for p in paths], temps, strict=True))
        for file_name, text in texts.items():
            temp_of[file_name].write_text(text)
        for file_name, table in tables.items():
            table.to_csv(temp_of[file_name], index=False)
        for figure in figures:
            imsave(temp_of[figure], card, format="png", metadata={"Description": reason})
    mark_failed(out, reason)
