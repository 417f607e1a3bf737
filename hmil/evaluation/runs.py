"""Reading trained runs: the test predictions, logs and records of each fold.

Every fold directory of ``models/{encoder}/{model}/fold{k}`` is read here once and checked
(classes against the recorded hierarchy, labels, empty probabilities), so the metric code
never sees a malformed table; a fold without predictions, or recorded as failed, becomes
a :class:`MissingFold` that the outputs name.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from plumbing.errors import PipelineError

log = logging.getLogger("hmil.evaluate")

LEVELS = ("fine", "coarse", "coarse_from_fine")
PROBABILITY_PREFIX = {
    "fine": "p_fine_",
    "coarse": "p_coarse_",
    "coarse_from_fine": "p_coarse_from_fine_",
}
REQUIRED_COLUMNS = ("slide_id", "patient_id", "split", "fine_label", "coarse_label")
FOLD_DIR = re.compile(r"fold(\d+)")


class EvaluationError(PipelineError):
    """Unusable evaluation input (missing folds with --strict, malformed predictions)."""


class NoFoldError(EvaluationError):
    """Not one fold could be evaluated (every run failed or is missing)."""


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
    classes = fold_classes(table, path, run_dir)
    split = table["split"].astype(str).str.strip().str.lower()
    test = table[split == "test"].reset_index(drop=True)
    if test.empty:
        return MissingFold(fold, run_dir, f"{path} has no test rows")
    coarse_empty = check_test_rows(test, classes, path)
    best_epoch = metrics.get("best_epoch")
    return Fold(
        fold=fold,
        run_dir=run_dir,
        test=test,
        classes=classes,
        has_coarse_head=not coarse_empty,
        log_table=read_log_table(run_dir, fold),
        best_epoch=best_epoch if isinstance(best_epoch, int) else None,
        train_code_version=metrics.get("code_version"),
    )


def fold_classes(table: pd.DataFrame, path: Path, run_dir: Path) -> Classes:
    """The classes of the probability columns, in the order of the hierarchy the run
    recorded (if it did, the two must name the same classes)."""
    classes = column_classes(list(table.columns), path)
    recorded = hierarchy_classes(run_dir)
    if recorded is None:
        return classes
    if set(recorded.fine) != set(classes.fine) or set(recorded.coarse) != set(classes.coarse):
        raise EvaluationError(
            f"{path}: probability columns (fine {', '.join(classes.fine)}; coarse "
            f"{', '.join(classes.coarse)}) do not match the hierarchy recorded in {run_dir}"
        )
    return recorded


def check_test_rows(test: pd.DataFrame, classes: Classes, path: Path) -> bool:
    """Clean the test rows in place (labels stripped, no patient id: own patient) and refuse
    unknown labels or empty probabilities. Returns whether the coarse head is empty (a flat
    model): then all its p_coarse_* are, never only some."""
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
    return bool(coarse_empty.all())


def read_log_table(run_dir: Path, fold: int) -> pd.DataFrame | None:
    """The fold's log.csv for the training curves; a bad one only costs its curve."""
    if not (run_dir / "log.csv").is_file():
        return None
    try:
        return pd.read_csv(run_dir / "log.csv")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        log.warning("%s: unreadable; fold %d left out of training_curves.png", run_dir, fold)
        return None


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
