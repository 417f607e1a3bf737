"""The slides of one fold of a DATA_SPLIT.csv (hmil.splits writes it, training reads it)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from plumbing.errors import PipelineError

SPLITS = ("train", "val", "test")
REQUIRED_SPLIT_COLUMNS = ("slide_id", "patient_id", "label")


class FoldTableError(PipelineError):
    """A splits table that cannot give a fold's slides; one-line message."""


def load_fold_tables(splits_path: str | Path, fold: int) -> dict[str, pd.DataFrame]:
    """The train, val and test slides of fold ``fold`` of a DATA_SPLIT.csv.

    Rows whose ``fold<k>`` value is not train/val/test (e.g. empty: excluded) are ignored.
    Raises FoldTableError for a missing file or column, or an empty train or val set.
    """
    splits_path = Path(splits_path)
    if not splits_path.is_file():
        raise FoldTableError(f"{splits_path}: splits file not found")
    try:
        table = pd.read_csv(splits_path, dtype={"slide_id": str, "patient_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
        raise FoldTableError(f"{splits_path}: cannot read splits table ({first_line})") from None
    missing = [column for column in REQUIRED_SPLIT_COLUMNS if column not in table.columns]
    if missing:
        raise FoldTableError(
            f"{splits_path}: missing column {missing[0]!r} "
            f"(need {', '.join(REQUIRED_SPLIT_COLUMNS)} and fold columns)"
        )
    fold_column = f"fold{fold}"
    if fold_column not in table.columns:
        folds = [c for c in table.columns if c.startswith("fold")]
        raise FoldTableError(
            f"{splits_path}: no column {fold_column!r} for --fold {fold} "
            f"(fold columns: {', '.join(folds) or 'none'})"
        )
    assignment = table[fold_column].astype(str).str.strip().str.lower()
    tables = {split: table[assignment == split].reset_index(drop=True) for split in SPLITS}
    for split in ("train", "val"):
        if tables[split].empty:
            raise FoldTableError(f"{splits_path}: fold {fold} has no {split!r} slides")
    return tables
