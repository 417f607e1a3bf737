"""The slide sheet: one row per slide (`slide_id, path, patient_id, label[, mpp]`)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from plumbing.errors import SheetError

REQUIRED_COLUMNS = ("slide_id", "path", "patient_id", "label")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def read_slide_sheet(
    path: str | Path, require_labels: bool = True, require_paths: bool = True
) -> pd.DataFrame:
    """Read and check the sheet; return it indexed by `slide_id`, with absolute `path`s.

    Relative slide paths are taken relative to the sheet's folder, so a cohort folder can
    be moved as a whole. Raises `SheetError` with the sheet name and the offending rows.
    `require_paths=False` serves steps that read only features (deployment), whose users
    may hold features without the slides.
    """
    path = Path(path)
    if not path.is_file():
        raise SheetError(f"{path}: slide sheet not found")
    try:
        sheet = pd.read_csv(
            path, dtype={"slide_id": str, "patient_id": str, "label": str, "path": str}
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SheetError(f"{path}: not a readable CSV ({err})") from None
    required = REQUIRED_COLUMNS if require_labels else ("slide_id", "path")
    if not require_paths:
        required = tuple(column for column in required if column != "path")
    missing = [column for column in required if column not in sheet.columns]
    if missing:
        raise SheetError(
            f"{path}: missing column(s) {', '.join(missing)}; "
            f"expected {', '.join(REQUIRED_COLUMNS)} (+ optional mpp), "
            f"found {', '.join(sheet.columns)}"
        )
    if sheet.empty:
        raise SheetError(f"{path}: the sheet has no slides")
    for column in required:
        empty = sheet[column].isna() | (sheet[column].astype(str).str.strip() == "")
        if empty.any():
            rows = ", ".join(str(i + 2) for i in sheet.index[empty][:5])
            raise SheetError(f"{path}: empty `{column}` on line(s) {rows}")
    sheet["slide_id"] = sheet["slide_id"].str.strip()
    _check_slide_ids(path, sheet["slide_id"])
    if "mpp" in sheet.columns:
        sheet["mpp"] = _mpp_column(path, sheet)
    if "path" not in sheet.columns:
        return sheet.set_index("slide_id", drop=False)
    base = path.resolve().parent
    sheet["path"] = [
        str(p if Path(p).is_absolute() else base / p) for p in sheet["path"].str.strip()
    ]
    return sheet.set_index("slide_id", drop=False)


def _check_slide_ids(path: Path, slide_ids: pd.Series) -> None:
    """Slide ids name every output file: unique, and safe as file names."""
    duplicated = slide_ids[slide_ids.duplicated(keep=False)].unique()
    if len(duplicated):
        more = ", ..." if len(duplicated) > 5 else ""
        raise SheetError(
            f"{path}: {len(duplicated)} duplicate slide_id(s): {', '.join(duplicated[:5])}{more}"
        )
    unsafe = [s for s in slide_ids if not SAFE_ID.match(s)]
    if unsafe:
        raise SheetError(
            f"{path}: slide_id(s) not usable as file names: {', '.join(map(repr, unsafe[:5]))} "
            "(use letters, digits, '.', '_' and '-')"
        )


def _mpp_column(path: Path, sheet: pd.DataFrame) -> pd.Series:
    """The optional mpp override as numbers: empty means "read it from the slide"."""
    mpp = pd.to_numeric(sheet["mpp"], errors="coerce")
    bad = sheet["mpp"].notna() & ~(mpp > 0)
    if bad.any():
        raise SheetError(
            f"{path}: `mpp` must be a positive number (slide {sheet['slide_id'][bad].iloc[0]})"
        )
    return mpp
