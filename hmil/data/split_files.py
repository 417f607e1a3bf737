"""A DATA_SPLIT on disk: DATA_SPLIT.csv, its JSON sidecar and, optionally, CLAM's layout.

CLAM's layout is for tools that read CLAM's splits (CLAM's ``main.py`` and ``eval.py``; the
HMIL authors' ``make_dataset_pkls.py`` is pointed at such a folder): per fold
``splits_{k}.csv``, ``splits_{k}_bool.csv`` and ``splits_{k}_descriptor.csv`` as CLAM's
``create_splits_seq.py`` writes them (see :func:`clam_split_tables`). They come from the same
table as DATA_SPLIT.csv, in the same atomic write, so the two layouts cannot disagree.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hmil.data.hierarchy import Hierarchy, HierarchyError, load_hierarchy
from hmil.data.published_splits import (
    PublishedSplitError,
    check_against_sheet,
    excluded_counts,
    patients_across_parts,
    published_fold_table,
    read_published_splits,
)
from hmil.data.split_settings import SplitSettings
from hmil.data.splits import (
    PARTS,
    SplitError,
    check_labels,
    check_parameters,
    fold_columns,
    make_splits,
    normalised_slides,
)
from plumbing.atomic import atomic_outputs
from plumbing.provenance import code_version
from preprocessing.slides.sheet import read_slide_sheet

log = logging.getLogger("hmil.splits")


@dataclass(frozen=True, kw_only=True)
class SplitConfig(SplitSettings):
    """One DATA_SPLIT to make: the sheet, how it is split (the settings,
    :class:`~hmil.data.split_settings.SplitSettings`; ``folds`` is required), where the
    files go.

    Checked when made, so that parameters no sheet can be split with are refused before a
    file is read; like every error of a split, the message names the sheet.
    """

    sheet: Path
    out: Path  #: DATA_SPLIT.csv; the sidecar is the same path with .json
    hierarchy: str | None = None  #: YAML path or preset name; checks the labels
    clam_dir: Path | None = None  #: also write the folds in CLAM's layout here

    def __post_init__(self) -> None:
        if self.folds is None:
            raise SplitError(f"{self.sheet}: --folds is required")
        try:
            check_parameters(
                self.folds, self.seed, self.protocol, self.val_fraction, self.test_fraction
            )
        except SplitError as error:
            raise SplitError(f"{self.sheet}: {error}") from None

    def params(self, hierarchy: Hierarchy | None) -> dict[str, Any]:
        """The parameters recorded in the sidecar."""
        return {
            "sheet": str(self.sheet),
            "folds": self.folds,
            "protocol": self.protocol,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction if self.protocol == "repeated" else None,
            "allow_sparse_classes": self.allow_sparse_classes,
            "hierarchy": hierarchy.name if hierarchy else None,
            "clam_dir": str(self.clam_dir) if self.clam_dir else None,
        }


def _split_sheet(path: Path) -> pd.DataFrame:
    """The slide sheet, with the patient and label columns every split needs."""
    sheet = read_slide_sheet(path, require_labels=False)
    for column in ("patient_id", "label"):
        if column not in sheet.columns:
            raise SplitError(f"{path}: missing column {column!r}")
    return sheet


def write_splits(config: SplitConfig) -> pd.DataFrame:
    """Split the sheet and write DATA_SPLIT.csv, its sidecar and (``clam_dir``) CLAM's
    tables in one atomic write; returns the DATA_SPLIT table."""
    hierarchy = _hierarchy(config.hierarchy)
    sheet = _split_sheet(config.sheet)
    try:
        splits = make_splits(
            sheet,
            config.folds,
            seed=config.seed,
            hierarchy=hierarchy,
            protocol=config.protocol,
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            allow_sparse_classes=config.allow_sparse_classes,
        )
    except SplitError as error:
        raise SplitError(f"{config.sheet}: {error}") from None

    classes = list(hierarchy.fine) if hierarchy else sorted(splits["label"].unique())
    sidecar = {
        "seed": config.seed,
        "params": config.params(hierarchy),
        "code_version": code_version(),
        "n_slides": len(splits),
        "n_patients": int(splits["patient_id"].nunique()),
        "classes": classes,
        "counts": class_counts(splits, classes),
    }
    write_split_files(splits, sidecar, classes, config.out, config.clam_dir)
    return splits


@dataclass(frozen=True)
class PublishedSplitConfig:
    """The HMIL authors' published splits (``{train,val,test}_splits_{k}.pkl`` in
    ``from_hmil_pkls``) as a DATA_SPLIT of the sheet: one fold per published split."""

    sheet: Path
    out: Path  #: DATA_SPLIT.csv; the sidecar is the same path with .json
    from_hmil_pkls: Path  #: the folder of split pickles
    folds: int | None = None  #: when given, the number of published splits expected
    hierarchy: str | None = None  #: YAML path or preset name; checks the labels
    clam_dir: Path | None = None  #: also write the folds in CLAM's layout here

    def params(self, hierarchy: Hierarchy | None, folds: int) -> dict[str, Any]:
        """The parameters recorded in the sidecar."""
        return {
            "sheet": str(self.sheet),
            "folds": folds,
            "protocol": "published",
            "from_hmil_pkls": str(self.from_hmil_pkls),
            "hierarchy": hierarchy.name if hierarchy else None,
            "clam_dir": str(self.clam_dir) if self.clam_dir else None,
        }


def write_published_splits(config: PublishedSplitConfig) -> pd.DataFrame:
    """Read the published split pickles safely, check every row against the sheet and the
    hierarchy, and write DATA_SPLIT.csv (``fold{k}`` = published split k, exactly), its
    sidecar (source folder, each pickle's SHA-256, slides left out per fold) and
    (``clam_dir``) CLAM's tables in one atomic write; returns the DATA_SPLIT table.

    A slide of the sheet that split k does not list gets an empty ``fold{k}`` cell: it is
    left out of that fold (neither trained, validated nor tested on). Nothing is written
    when anything disagrees (PublishedSplitError or SplitError, one line).
    """
    hierarchy = _hierarchy(config.hierarchy)
    sheet = _split_sheet(config.sheet)
    try:
        slides = normalised_slides(sheet)
        classes = check_labels(slides, hierarchy)
    except SplitError as error:
        raise SplitError(f"{config.sheet}: {error}") from None
    published = read_published_splits(config.from_hmil_pkls)
    n_folds = len(published.parts)
    if config.folds is not None and config.folds != n_folds:
        raise PublishedSplitError(
            f"{config.from_hmil_pkls}: {n_folds} published splits, but --folds {config.folds}"
        )
    sheet_labels = dict(zip(slides["slide_id"], slides["label"], strict=True))
    check_against_sheet(published, sheet_labels, config.sheet, hierarchy)

    splits = published_fold_table(slides, published, hierarchy)
    folds = fold_columns(splits)
    excluded, across = _published_departures(splits, folds)
    sidecar = {
        "seed": None,
        "params": config.params(hierarchy, n_folds),
        "code_version": code_version(),
        "source": {
            "directory": str(Path(config.from_hmil_pkls).resolve()),
            "sha256": published.sha256,
        },
        "n_slides": len(splits),
        "n_patients": int(splits["patient_id"].nunique()),
        "classes": classes,
        "counts": class_counts(splits, classes),
        "excluded": excluded,
        "patients_in_several_parts": {c: len(p) for c, p in across.items()},
    }
    write_split_files(splits, sidecar, classes, config.out, config.clam_dir)
    return splits


def _published_departures(
    splits: pd.DataFrame, folds: list[str]
) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Slides left out of each fold and patients in several parts of it, each logged once."""
    excluded = excluded_counts(splits, folds)
    if any(excluded.values()):
        log.warning(
            "slides of the sheet that a published split does not list are left out of that "
            "fold: %s",
            ", ".join(f"{column} {n}" for column, n in excluded.items() if n),
        )
    across = patients_across_parts(splits, folds)
    if any(across.values()):
        column = next(c for c in folds if across[c])
        log.warning(
            "the published splits put slides of one patient in several parts (kept as "
            "published): %d patient(s) in %s, e.g. %s",
            len(across[column]),
            column,
            ", ".join(across[column][:3]),
        )
    return excluded, across


def write_split_files(
    splits: pd.DataFrame,
    sidecar: dict[str, Any],
    classes: Sequence[str],
    out: Path,
    clam_dir: Path | None,
) -> None:
    """DATA_SPLIT.csv, its sidecar (``out`` with .json) and (``clam_dir``) CLAM's tables, in
    one atomic write."""
    folds = fold_columns(splits)
    clam_paths = clam_split_paths(clam_dir, len(folds)) if clam_dir else []
    with atomic_outputs(out, out.with_suffix(".json"), *clam_paths) as temporaries:
        csv_tmp, json_tmp, *clam_tmps = temporaries
        splits.to_csv(csv_tmp, index=False, lineterminator="\n")
        json_tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
        for k, column in enumerate(folds if clam_paths else []):
            tables = clam_split_tables(splits, column, classes)
            for table, path in zip(tables, clam_tmps[3 * k : 3 * k + 3], strict=True):
                table.to_csv(path, lineterminator="\n")
    log.info("slides per fold, part and class:\n%s", counts_table(splits, classes))


def _hierarchy(spec: str | None) -> Hierarchy | None:
    try:
        return load_hierarchy(spec) if spec else None
    except HierarchyError as error:
        raise SplitError(str(error)) from None


# ---- what the files hold ---------------------------------------------------------------------


def class_counts(
    splits: pd.DataFrame, classes: Sequence[str]
) -> dict[str, dict[str, dict[str, int]]]:
    """Slides per fold, part and class: ``{"fold0": {"train": {"N": 12, ...}, ...}, ...}``."""
    return {
        column: {
            part: {str(c): int(n) for c, n in row.items()}
            for part, row in _part_counts(splits, column, classes).iterrows()
        }
        for column in fold_columns(splits)
    }


def counts_table(splits: pd.DataFrame, classes: Sequence[str]) -> str:
    """Text table of slide counts per fold and part (rows) and class (columns)."""
    frames = []
    for column in fold_columns(splits):
        table = _part_counts(splits, column, classes)
        table.index = [f"{column} {part}" for part in PARTS]
        frames.append(table)
    return pd.concat(frames).to_string()


def _part_counts(splits: pd.DataFrame, column: str, classes: Sequence[str]) -> pd.DataFrame:
    table = pd.crosstab(splits[column], splits["label"])
    return table.reindex(index=list(PARTS), columns=list(classes), fill_value=0)


def clam_split_tables(
    splits: pd.DataFrame, column: str, classes: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One fold of DATA_SPLIT in CLAM's three tables (``create_splits_seq.py`` → ``save_splits``).

    - ``splits_{k}.csv``: columns ``train, val, test``, each the slide ids of that part from
      the top, shorter columns padded with empty cells, under a 0…n-1 index (CLAM writes
      ``pd.concat(ids, axis=1).to_csv(path)``, index included). CLAM's reader
      (``return_splits(from_id=False, csv_path=...)``) takes each column's non-empty cells.
    - ``splits_{k}_bool.csv``: indexed by slide id (train slides, then val, then test),
      columns ``train, val, test`` of True/False, one True per row.
    - ``splits_{k}_descriptor.csv``: slides per class (rows, in class order) and part.

    Slides keep the sheet's order within a part, as CLAM keeps its csv's order.
    """
    ids = {part: splits.loc[splits[column] == part, "slide_id"].astype(str) for part in PARTS}
    columns = [ids[part].reset_index(drop=True).rename(part) for part in PARTS]
    by_column = pd.concat(columns, axis=1).reindex(columns=list(PARTS))
    ordered = pd.concat([ids[part] for part in PARTS], ignore_index=True)
    part_of = np.repeat(np.arange(len(PARTS)), [len(ids[part]) for part in PARTS])
    by_slide = pd.DataFrame(
        np.eye(len(PARTS), dtype=bool)[part_of], index=ordered.to_numpy(), columns=list(PARTS)
    )
    descriptor = _part_counts(splits, column, classes).T.reindex(columns=list(PARTS))
    descriptor.index.name = descriptor.columns.name = None  # CLAM's header: ",train,val,test"
    return by_column, by_slide, descriptor


def clam_split_paths(directory: Path, folds: int) -> list[Path]:
    """``splits_{k}.csv``, ``splits_{k}_bool.csv``, ``splits_{k}_descriptor.csv`` per fold."""
    return [
        directory / f"splits_{k}{suffix}.csv"
        for k in range(folds)
        for suffix in ("", "_bool", "_descriptor")
    ]
