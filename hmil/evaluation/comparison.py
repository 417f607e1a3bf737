"""Comparing evaluated runs (encoder × model): the table, its Markdown and the AUC figure.

An evaluation that has no summary.json, an unreadable one, or a ``FAILED`` marker file (its
first line says why; see :func:`mark_failed`) becomes a row with status ``failed`` and the
reason, and the comparison is built from the others: one failed run must not hide the rest.
Rows are sorted by mean fine AUC over folds (best first), failed runs last; the Markdown
table bolds the best value of each column. A run with a fold whose trainer warned that it
may not have learned (``learning_warnings`` in the fold's metrics.json: best validation
epoch among the first few, or validation AUC never above chance) is marked in the Status
column and named in ``learning_warnings``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from hmil.evaluation import plots
from plumbing.atomic import atomic_outputs
from plumbing.provenance import code_version

log = logging.getLogger("hmil.compare")

FAILED_MARKER = "FAILED"
LEVELS = ("fine", "coarse", "coarse_from_fine")
LEVEL_TITLES = {"fine": "Fine", "coarse": "Coarse", "coarse_from_fine": "Coarse from fine"}
METRICS = ("auc", "balanced_accuracy", "accuracy", "f1")
MARKDOWN_METRICS = {"auc": "AUC", "balanced_accuracy": "bal. acc.", "f1": "F1"}
ID_COLUMNS = (
    "name", "encoder", "model", "status", "reason", "n_folds", "missing_folds", "n_slides",
    "eval_dir", "code_version", "learning_warnings",
)  # fmt: skip


def mark_failed(eval_dir: str | Path, reason: str) -> Path:
    """Write the FAILED marker of an evaluation that could not be made (for workflow
    failure handlers); the comparison then names the run and ``reason``."""
    path = Path(eval_dir) / FAILED_MARKER
    with atomic_outputs(path) as (temp,):
        temp.write_text(reason.strip().splitlines()[0] + "\n" if reason.strip() else "failed\n")
    return path


def metric_columns() -> list[str]:
    columns = []
    for level in LEVELS:
        for metric in METRICS:
            columns += [f"{level}_{metric}_mean", f"{level}_{metric}_std"]
        columns += [f"{level}_auc_pooled", f"{level}_auc_ci_low", f"{level}_auc_ci_high"]
    return columns


def failed_row(eval_dir: Path, reason: str) -> dict[str, Any]:
    directory = eval_dir.absolute()
    encoder, model = directory.parent.name, directory.name
    return {
        "name": f"{encoder}/{model}",
        "encoder": encoder,
        "model": model,
        "status": "failed",
        "reason": reason,
        "eval_dir": str(eval_dir),
    }


def read_eval_dir(eval_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(row of the comparison table, summary.json payload or None when the run failed)."""
    marker = eval_dir / FAILED_MARKER
    summary_path = eval_dir / "summary.json"
    if marker.is_file():
        lines = [line.strip() for line in marker.read_text(errors="replace").splitlines()]
        reason = next((line for line in lines if line), "marked failed")
        return failed_row(eval_dir, f"{marker}: {reason}"), None
    if not eval_dir.is_dir():
        return failed_row(eval_dir, f"{eval_dir}: directory not found"), None
    if not summary_path.is_file():
        return failed_row(eval_dir, f"{summary_path} not found (evaluation missing)"), None
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return failed_row(eval_dir, f"{summary_path}: unreadable ({error})"), None
    if not isinstance(summary, dict) or not isinstance(summary.get("headline"), dict):
        return failed_row(eval_dir, f"{summary_path}: no headline metrics"), None
    missing = summary.get("missing_folds") or []
    row: dict[str, Any] = {
        "name": summary.get("name") or failed_row(eval_dir, "")["name"],
        "encoder": summary.get("encoder"),
        "model": summary.get("model"),
        "status": "ok",
        "reason": "",
        "n_folds": len(summary.get("folds_used") or []),
        "missing_folds": " ".join(str(m.get("fold")) for m in missing),
        "n_slides": summary.get("n_slides"),
        "eval_dir": str(eval_dir),
        "code_version": summary.get("code_version"),
    }
    if missing:
        row["reason"] = "missing folds: " + "; ".join(str(m.get("reason")) for m in missing)
    row["learning_warnings"] = fold_learning_warnings(summary)
    for level in LEVELS:
        values = summary["headline"].get(level) or {}
        for metric in METRICS:
            entry = values.get(metric) or {}
            row[f"{level}_{metric}_mean"] = number(entry.get("mean"))
            row[f"{level}_{metric}_std"] = number(entry.get("std"))
        auc = values.get("auc") or {}
        row[f"{level}_auc_pooled"] = number(auc.get("pooled"))
        row[f"{level}_auc_ci_low"] = number(auc.get("ci_low"))
        row[f"{level}_auc_ci_high"] = number(auc.get("ci_high"))
    return row, summary


def fold_learning_warnings(summary: dict[str, Any]) -> str:
    """The trainer's learning warnings of the run's folds, ``fold k: ...; fold j: ...``
    (empty when none warned or the folds' metrics.json cannot be read)."""
    warned = []
    for position, run_dir in enumerate(summary.get("run_dirs") or []):
        try:
            metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        warnings = metrics.get("learning_warnings") if isinstance(metrics, dict) else None
        if warnings:
            fold = (summary.get("folds_used") or [])[position : position + 1] or [position]
            warned.append(f"fold {fold[0]}: " + ", ".join(map(str, warnings)))
    return "; ".join(warned)


def number(value: Any) -> float:
    """A JSON number (null: undefined) as float."""
    return math.nan if value is None else float(value)


def comparison_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows sorted: successful runs by mean fine AUC (best first, undefined last), then
    failed runs; ties by name."""
    table = pd.DataFrame(rows).reindex(columns=[*ID_COLUMNS, *metric_columns()])
    table["_failed"] = table["status"] != "ok"
    table["_key"] = -table["fine_auc_mean"].fillna(-math.inf)
    table = table.sort_values(["_failed", "_key", "name"], kind="stable")
    table = table.drop(columns=["_failed", "_key"]).reset_index(drop=True)
    for column in ("n_folds", "n_slides"):  # counts stay integers beside failed rows' blanks
        table[column] = table[column].astype("Int64")
    return table


def fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def bold_best(texts: list[str], values: pd.Series) -> list[str]:
    """Bold the cells holding the column's maximum (all of them on a tie)."""
    if values.isna().all():
        return texts
    best = values.max()
    return [f"**{t}**" if v == best else t for t, v in zip(texts, values, strict=True)]


def comparison_markdown(
    table: pd.DataFrame, params: dict[str, Any], external: pd.DataFrame | None = None
) -> str:
    """The cross-validation table, then (deployments with labels) the external one."""
    lines = ["# Model comparison", "", runs_markdown(table), ""]
    lines.append(
        "Mean ± SD over folds (sample SD); pooled: all folds' test predictions together, "
        "with the 95% percentile bootstrap CI over patients. AUC: macro one-vs-rest over "
        "the classes present. Bold: best in the column. –: not available (a flat model has "
        "no coarse head; a failed run has no metrics)."
    )
    if external is not None and not external.empty:
        lines += [
            "",
            "## External validation",
            "",
            runs_markdown(external, pooled_title="ensemble"),
            "",
            "Each run's fold models applied to a deployed cohort (hmil.deploy): mean ± SD "
            "over the fold models alone; ensemble: the mean of their probabilities, the "
            "deployed prediction, with its 95% patient-bootstrap CI.",
        ]
    lines += ["", f"code_version `{code_version()}`; parameters `{json.dumps(params)}`", ""]
    return "\n".join(lines)


def runs_markdown(table: pd.DataFrame, pooled_title: str = "pooled") -> str:
    """One Markdown table of runs: mean ± SD and pooled AUC with CI per level, status."""
    ok = table["status"] == "ok"
    columns: dict[str, list[str]] = {
        "Run": table["name"].tolist(),
        "Folds": [
            f"{int(n)}" + (f" (missing {m})" if isinstance(m, str) and m else "") if s else "–"
            for n, m, s in zip(table["n_folds"], table["missing_folds"], ok, strict=True)
        ],
    }
    for level in LEVELS:
        title = LEVEL_TITLES[level]
        for metric, short in MARKDOWN_METRICS.items():
            means = table[f"{level}_{metric}_mean"].where(ok)
            stds = table[f"{level}_{metric}_std"]
            texts = [
                "–" if math.isnan(m) else (fmt(m) if math.isnan(s) else f"{fmt(m)} ± {fmt(s)}")
                for m, s in zip(means, stds, strict=True)
            ]
            columns[f"{title} {short}"] = bold_best(texts, means)
        pooled = table[f"{level}_auc_pooled"].where(ok)
        texts = []
        for value, low, high in zip(
            pooled, table[f"{level}_auc_ci_low"], table[f"{level}_auc_ci_high"], strict=True
        ):
            interval = "" if math.isnan(low) else f" [{fmt(low)}, {fmt(high)}]"
            texts.append("–" if math.isnan(value) else f"{fmt(value)}{interval}")
        columns[f"{title} {pooled_title} AUC [95% CI]"] = bold_best(texts, pooled)
    columns["Status"] = [
        (f"ok; **may not have learned**: {w}" if isinstance(w, str) and w else "ok")
        if s
        else f"**FAILED**: {r}"
        for s, r, w in zip(ok, table["reason"], table["learning_warnings"], strict=True)
    ]
    return pd.DataFrame(columns).to_markdown(index=False, disable_numparse=True)


def class_auc_of(summaries: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, dict]]:
    """Fine class names (union, in order of first appearance) and, per run, class →
    (pooled AUC, CI low, CI high)."""
    class_names: list[str] = []
    runs: dict[str, dict[str, tuple[float, float, float]]] = {}
    for name, summary in summaries.items():
        per_class = (summary.get("per_class") or {}).get("fine") or {}
        runs[name] = {}
        for class_name, values in per_class.items():
            if class_name not in class_names:
                class_names.append(class_name)
            runs[name][class_name] = (
                number(values.get("auc")),
                number(values.get("auc_ci_low")),
                number(values.get("auc_ci_high")),
            )
    return class_names, runs


@dataclass(frozen=True)
class ComparisonConfig:
    """The evaluations to compare and the files to write; built once from the command line."""

    eval_dirs: tuple[Path, ...]  #: outputs of hmil.evaluate
    out: Path  #: comparison CSV
    markdown: Path | None = None
    external: tuple[Path, ...] = ()  #: outputs of hmil.deploy on labelled cohorts
    plot: Path | None = None  #: PNG of the fine class AUC per run

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"eval_dirs": [str(d) for d in self.eval_dirs]}
        if self.external:
            params["external"] = [str(d) for d in self.external]
        return params


def write_comparison(config: ComparisonConfig) -> pd.DataFrame:
    """Read every evaluation and write the CSV (and the Markdown and the figure, if asked
    for) in one atomic write; returns the comparison table."""
    rows, summaries = [], {}
    for eval_dir in config.eval_dirs:
        row, summary = read_eval_dir(eval_dir)
        rows.append(row)
        if summary is None:
            log.warning("%s: left out of the comparison (%s)", row["name"], row["reason"])
        else:
            summaries[row["name"]] = summary
    table = comparison_table(rows)
    params = config.params()
    external = None
    if config.external:
        external = comparison_table([read_eval_dir(d)[0] for d in config.external])
    outputs = (config.out, config.markdown, config.plot)
    with atomic_outputs(*outputs) as (out_tmp, md_tmp, plot_tmp):
        table.to_csv(out_tmp, index=False)
        if md_tmp is not None:
            md_tmp.write_text(comparison_markdown(table, params, external))
        if plot_tmp is not None:
            # Successful runs in table order, so the bars follow the ranking.
            ordered = {n: summaries[n] for n in table["name"] if n in summaries}
            class_names, runs = class_auc_of(ordered)
            plots.plot_class_auc_bars(
                plot_tmp,
                class_names,
                runs,
                "Fine class AUC (pooled out-of-fold, 95% CI)",
                {"Software": f"hmil-pipeline {code_version()}", "Description": json.dumps(params)},
            )
    return table
