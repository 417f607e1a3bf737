"""Evaluate the folds of one encoder × model: metrics per fold and pooled, CIs, tables, plots.

    python -m hmil.evaluate models/uni/hmil/fold0 ... models/uni/hmil/fold4 \
        --out eval/uni/hmil [--bootstrap 1000] [--seed 0] [--strict] [--name uni/hmil]

Reads the test rows of each fold's predictions.csv (and log.csv, metrics.json) and writes,
atomically, into --out: metrics_per_fold.csv, summary.csv/.md/.json, per_class.csv/.md,
confusion_<level>.csv/.png, roc_<level>.png, training_curves.png and oof_predictions.csv.
Levels: ``fine``, ``coarse`` (the coarse head; skipped for flat models, whose p_coarse
columns are empty) and ``coarse_from_fine`` (fine probabilities summed per coarse class).

A fold without predictions.csv, or whose training failed (its metrics.json says
``"status": "failed"``), is left out with a warning and named in summary.md/.json
(``--strict``: an error). When no fold is left, ``--on-error record`` (what the workflow
uses outside strict mode) writes the same files as a failed evaluation: a ``FAILED`` marker
(:func:`hmil.compare.mark_failed`), summary.json with the reason, and cards in place of the
figures, so that the comparison still builds and names the failed run.

Metric conventions are those of :mod:`hmil.eval_metrics`:
AUC is the macro one-vs-rest AUC over the classes present; ± is the sample std over folds
(ddof = 1); the 95% CI is a percentile bootstrap of the pooled out-of-fold value that
resamples patients with replacement.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.image import imsave

from hmil import plots
from hmil.compare import mark_failed
from hmil.eval_metrics import (
    CI_LEVEL,
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
from preprocessing.atomic import atomic_outputs
from preprocessing.cli import non_negative_int, run_cli, setup_logging
from preprocessing.errors import PipelineError
from preprocessing.provenance import code_version
from preprocessing.qc import render_failure

log = logging.getLogger("hmil.evaluate")

LEVELS = ("fine", "coarse", "coarse_from_fine")
PROBABILITY_PREFIX = {
    "fine": "p_fine_",
    "coarse": "p_coarse_",
    "coarse_from_fine": "p_coarse_from_fine_",
}
REQUIRED_COLUMNS = ("slide_id", "patient_id", "split", "fine_label", "coarse_label")
FOLD_DIR = re.compile(r"fold(\d+)")
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


class EvaluationError(PipelineError):
    """Unusable evaluation input (missing folds with --strict, malformed predictions)."""


class NoFoldError(EvaluationError):
    """Not one fold could be evaluated (every run failed or is missing)."""


# ---- reading the folds -----------------------------------------------------------------------


@dataclass(frozen=True)
class Classes:
    """Ordered class names of the two levels (the order of the hierarchy)."""

    fine: tuple[str, ...]
    coarse: tuple[str, ...]

    def of(self, level: str) -> tuple[str, ...]:
        return self.fine if level == "fine" else self.coarse


@dataclass
class Fold:
    """The test predictions of one fold and what else its run directory says."""

    fold: int
    run_dir: Path
    test: pd.DataFrame
    classes: Classes
    has_coarse_head: bool
    log_table: pd.DataFrame | None = None
    best_epoch: int | None = None
    train_code_version: str | None = None

    def labels(self, level: str) -> np.ndarray:
        column, names = ("fine_label", self.classes.fine)
        if level != "fine":
            column, names = ("coarse_label", self.classes.coarse)
        index = {name: i for i, name in enumerate(names)}
        return self.test[column].map(index).to_numpy(dtype=np.int64)

    def probs(self, level: str) -> np.ndarray:
        prefix = PROBABILITY_PREFIX[level]
        columns = [f"{prefix}{name}" for name in self.classes.of(level)]
        return self.test[columns].to_numpy(dtype=np.float64)


@dataclass(frozen=True)
class MissingFold:
    fold: int | None
    run_dir: Path
    reason: str

    def describe(self) -> str:
        which = f"fold {self.fold}" if self.fold is not None else str(self.run_dir)
        return f"{which} ({self.reason})"


def fold_number_from_path(run_dir: Path) -> int | None:
    match = FOLD_DIR.fullmatch(run_dir.name)
    return int(match.group(1)) if match else None


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None when the file is absent or unreadable (optional inputs)."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def hierarchy_classes(run_dir: Path) -> Classes | None:
    """Class order from metrics.json's config (or model.pt's hierarchy), if recorded."""
    metrics = read_json(run_dir / "metrics.json") or {}
    spec = (metrics.get("config") or {}).get("hierarchy")
    if spec is None and (run_dir / "model.pt").is_file():
        try:
            import torch  # only for runs whose metrics.json lacks the hierarchy

            spec = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True).get(
                "hierarchy"
            )
        except Exception as error:  # a foreign or unreadable file: fall back to the columns
            log.debug("%s: no hierarchy (%s)", run_dir / "model.pt", error)
    if not isinstance(spec, dict) or not isinstance(spec.get("fine"), dict):
        return None
    return Classes(
        fine=tuple(str(name) for name in spec["fine"]),
        coarse=tuple(str(name) for name in spec.get("coarse", [])),
    )


def column_classes(columns: list[str], path: Path) -> Classes:
    """Class names from the probability columns, in column order."""
    from_fine_prefix = PROBABILITY_PREFIX["coarse_from_fine"]
    fine = [c.removeprefix("p_fine_") for c in columns if c.startswith("p_fine_")]
    from_fine = [
        c.removeprefix(from_fine_prefix) for c in columns if c.startswith(from_fine_prefix)
    ]
    coarse = [
        c.removeprefix("p_coarse_")
        for c in columns
        if c.startswith("p_coarse_") and not c.startswith(from_fine_prefix)
    ]
    if len(fine) < 2:
        raise EvaluationError(f"{path}: needs p_fine_<class> columns for at least 2 classes")
    if not coarse or coarse != from_fine:
        raise EvaluationError(
            f"{path}: p_coarse_<class> columns ({', '.join(coarse) or 'none'}) and "
            f"p_coarse_from_fine_<class> columns ({', '.join(from_fine) or 'none'}) differ"
        )
    return Classes(tuple(fine), tuple(coarse))


def read_predictions(path: Path) -> pd.DataFrame:
    try:
        # Labels stay strings (a class may be called "NA"); only empty cells are missing.
        table = pd.read_csv(
            path,
            dtype={c: str for c in REQUIRED_COLUMNS},
            keep_default_na=False,
            na_values=[""],
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "empty"
        raise EvaluationError(f"{path}: cannot read predictions ({first_line})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise EvaluationError(
            f"{path}: missing column {missing[0]!r} (need {', '.join(REQUIRED_COLUMNS)})"
        )
    return table


def read_fold(run_dir: Path, position: int) -> Fold | MissingFold:
    """One fold's test predictions; MissingFold when it has none; EvaluationError when its
    files are malformed."""
    path = run_dir / "predictions.csv"
    fold = fold_number_from_path(run_dir)
    if not path.is_file():
        return MissingFold(fold, run_dir, f"{path} not found")
    metrics = read_json(run_dir / "metrics.json") or {}
    if metrics.get("status") == "failed":
        return MissingFold(fold, run_dir, f"training failed: {metrics.get('reason', '?')}")
    if fold is None:
        recorded = (metrics.get("config") or {}).get("fold")
        fold = int(recorded) if isinstance(recorded, int) else position
    table = read_predictions(path)
    classes = column_classes(list(table.columns), path)
    recorded_classes = hierarchy_classes(run_dir)
    if recorded_classes is not None:
        if set(recorded_classes.fine) != set(classes.fine) or set(recorded_classes.coarse) != set(
            classes.coarse
        ):
            raise EvaluationError(
                f"{path}: probability columns (fine {', '.join(classes.fine)}; coarse "
                f"{', '.join(classes.coarse)}) do not match the hierarchy recorded in {run_dir}"
            )
        classes = recorded_classes
    split = table["split"].astype(str).str.strip().str.lower()
    test = table[split == "test"].reset_index(drop=True)
    if test.empty:
        return MissingFold(fold, run_dir, f"{path} has no test rows")
    for column, names in (("fine_label", classes.fine), ("coarse_label", classes.coarse)):
        test[column] = test[column].astype(str).str.strip()
        unknown = sorted(set(test[column]) - set(names))
        if unknown:
            raise EvaluationError(
                f"{path}: {column} {unknown[0]!r} is not a class of the probability columns "
                f"({', '.join(names)})"
            )
    test["patient_id"] = test["patient_id"].fillna(test["slide_id"])  # no id: own patient
    for level in ("fine", "coarse_from_fine"):
        columns = [f"{PROBABILITY_PREFIX[level]}{name}" for name in classes.of(level)]
        if test[columns].isna().to_numpy().any():
            raise EvaluationError(f"{path}: empty {PROBABILITY_PREFIX[level]}* values in test rows")
    coarse_empty = test[[f"p_coarse_{name}" for name in classes.coarse]].isna().to_numpy()
    if coarse_empty.any() and not coarse_empty.all():
        raise EvaluationError(f"{path}: p_coarse_* columns are partly empty in test rows")
    log_table = None
    if (run_dir / "log.csv").is_file():
        try:
            log_table = pd.read_csv(run_dir / "log.csv")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            log.warning("%s: unreadable; fold %d left out of training_curves.png", run_dir, fold)
    best_epoch = metrics.get("best_epoch")
    return Fold(
        fold=fold,
        run_dir=run_dir,
        test=test,
        classes=classes,
        has_coarse_head=not coarse_empty.all(),
        log_table=log_table,
        best_epoch=best_epoch if isinstance(best_epoch, int) else None,
        train_code_version=metrics.get("code_version"),
    )


def load_folds(run_dirs: list[Path], strict: bool) -> tuple[list[Fold], list[MissingFold]]:
    """The readable folds and the missing ones; raises for --strict, no fold at all, class
    columns that differ between folds, or a fold given twice."""
    folds: list[Fold] = []
    missing: list[MissingFold] = []
    for position, run_dir in enumerate(run_dirs):
        result = read_fold(run_dir, position)
        if isinstance(result, MissingFold):
            if strict:
                raise EvaluationError(f"{result.reason} (--strict: every fold must be evaluated)")
            log.warning("%s; fold left out of the evaluation", result.reason)
            missing.append(result)
        else:
            folds.append(result)
    if not folds:
        raise NoFoldError("no fold to evaluate: " + "; ".join(m.describe() for m in missing))
    first = folds[0]
    for fold in folds[1:]:
        if fold.classes != first.classes:
            raise EvaluationError(
                f"{fold.run_dir / 'predictions.csv'}: classes (fine {', '.join(fold.classes.fine)};"
                f" coarse {', '.join(fold.classes.coarse)}) differ from those of "
                f"{first.run_dir / 'predictions.csv'} (fine {', '.join(first.classes.fine)}; "
                f"coarse {', '.join(first.classes.coarse)})"
            )
    numbers = [fold.fold for fold in folds]
    duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
    if duplicates:
        raise EvaluationError(f"fold {duplicates[0]} is given more than once")
    return sorted(folds, key=lambda f: f.fold), missing


def run_identity(run_dirs: list[Path], name: str | None) -> tuple[str, str]:
    """(encoder, model) from ``--name ENCODER/MODEL`` or the paths
    ``models/{encoder}/{model}/fold{k}``."""
    if name is not None:
        encoder, _, model = name.partition("/")
        return encoder, model
    identities = set()
    for run_dir in run_dirs:
        parent = run_dir.absolute().parent
        identities.add((parent.parent.name or "unknown", parent.name or "unknown"))
    if len(identities) > 1:
        listed = ", ".join(sorted(f"{e}/{m}" for e, m in identities))
        raise EvaluationError(
            f"RUN_DIRs belong to different runs ({listed}); evaluate one encoder × model at a "
            "time or pass --name ENCODER/MODEL"
        )
    return identities.pop()


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


def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def mean_std_text(mean: float, std: float, num_folds: int) -> str:
    if num_folds == 0:
        return "n/a"
    return fmt(mean) if num_folds == 1 else f"{fmt(mean)} ± {fmt(std)}"


def ci_text(low: float, high: float) -> str:
    return "n/a" if math.isnan(low) else f"[{fmt(low)}, {fmt(high)}]"


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
    spread, pooled = ("Fold models: mean ± SD", "Ensemble") if external else (
        "Mean ± SD over folds", "Pooled")  # fmt: skip
    lines = [f"# {title}: {evaluation.name}", "", *header_lines(evaluation), ""]
    for level in LEVELS:
        if level in evaluation.skipped:
            lines += [f"## {level}", "", f"Skipped: {evaluation.skipped[level]}.", ""]
            continue
        result = evaluation.levels[level]
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
                if row["level"] == level
            ]
        )
        lines += [
            f"## {level} ({len(result.classes)} classes)",
            "",
            table.to_markdown(index=False, disable_numparse=True),
        ]
        lines.append("")
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
    params = evaluation.params
    lines += [
        "## Notes",
        "",
        "- AUC: macro one-vs-rest AUC over the classes present in the test set; a class "
        "absent from a fold's test set has no AUC or recall (n/a, see per_class.md).",
        "- Mean ± SD: over the folds where the metric is defined; SD is the sample standard "
        "deviation (ddof = 1).",
        (
            "- Ensemble: the mean of the fold models' probabilities per slide (the deployed "
            "prediction); fold models: each fold's model alone on the same slides."
            if external
            else "- Pooled: the test predictions of all folds together, each slide scored by "
            "its own fold's model."
        ),
        f"- {CI_LEVEL:.0%} CI: percentile bootstrap of the pooled value, {params['bootstrap']} "
        f"resamples of the {evaluation.num_patients} patients with replacement (seed "
        f"{params['seed']}); resamples where a metric is undefined are left out.",
        f"- {provenance_line(evaluation)}",
        "",
    ]
    return "\n".join(lines)


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
    return rows


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


# ---- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hmil.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="fold directories of one run"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=1000,
        help="bootstrap resamples of patients (0: no CI)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument(
        "--strict", action="store_true", help="a fold without predictions.csv is an error"
    )
    parser.add_argument(
        "--on-error",
        choices=("fail", "record"),
        default="fail",
        help="no fold to evaluate: fail (exit 1), or record a failed evaluation (exit 0)",
    )
    parser.add_argument(
        "--name", help="ENCODER/MODEL (default: from the paths models/{encoder}/{model}/fold{k})"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.name is not None and not re.fullmatch(r"[^/\s]+/[^/\s]+", args.name):
        parser.error(f"--name must be ENCODER/MODEL, got {args.name!r}")
    setup_logging(args.verbose)
    identity = run_identity(args.run_dirs, args.name)
    try:
        folds, missing = load_folds(args.run_dirs, args.strict)
    except NoFoldError as error:
        if args.on_error == "fail" or args.strict:
            raise
        name = "/".join(identity)
        figures = ["training_curves.png"] + [
            f"{kind}_{level}.png" for level in ("fine", "coarse_from_fine")
            for kind in ("roc", "confusion")
        ]  # fmt: skip
        write_failed_outputs(args.out, name, str(error), figures)
        print(f"error: {name}: {error}; recorded as a failed evaluation in {args.out}")
        return 0
    params = {"bootstrap": args.bootstrap, "seed": args.seed, "strict": args.strict}
    evaluation = evaluate(folds, missing, identity, params)
    rows = write_outputs(evaluation, args.out)
    fine = {row["metric"]: row for row in rows if row["level"] == "fine"}
    auc = fine["auc"]
    missing_text = ", ".join(m.describe() for m in missing) or "none"
    print(
        f"{evaluation.name}: {len(folds)} folds evaluated (missing: {missing_text}); fine AUC "
        f"{mean_std_text(auc['mean'], auc['std'], auc['n_folds'])} over folds, pooled "
        f"{fmt(auc['pooled'])} {ci_text(auc['ci_low'], auc['ci_high'])} → {args.out}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
