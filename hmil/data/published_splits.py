"""The HMIL authors' published splits, read without running code from them.

The authors publish their folds as pickles, ``{train,val,test}_splits_{k}.pkl`` for
k = 0…K-1 in one folder (``src/datasets/{BRACS,PANDA,CCC}/`` of their repository), each a
list of ``[slide_id, fine_label, feature_path]`` rows. Loading a pickle can run any code it
names, so these are read with :class:`PlainDataUnpickler`, which builds lists, tuples,
strings and numbers and refuses everything else (a class, a function such as
``os.system``, a numpy scalar) before it is called: the refusal happens where the pickle
asks for the object by name, and no object is ever called without being named first.

The feature path of each row is not used: features come from the workflow's own
``features/{encoder}/`` (e.g. imported from the authors' ``<slide_id>.pt`` folder).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from hmil.data.hierarchy import Hierarchy, label_name
from plumbing.errors import PipelineError

PARTS = ("train", "val", "test")
SPLIT_FILE = re.compile(r"^(train|val|test)_splits_(\d+)\.pkl$")
ROW_SHAPE = "[slide_id, fine_label, feature_path]"
EXAMPLES = 5  #: ids an error message names before "and N more"


class PublishedSplitError(PipelineError):
    """Published split pickles that cannot be read, are unsafe, or disagree with the sheet."""


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickles lists, tuples, dicts, sets, strings, bytes, numbers, booleans and None only.

    These are built by the pickle opcodes themselves. Anything else (classes, functions,
    numpy scalars and arrays) has to be looked up by name through :meth:`find_class` before
    it can be called or instantiated, and is refused there, so a pickle made to run a
    command stops before the command exists in the unpickler. Persistent ids
    (``persistent_load``), out-of-band buffers and ``copyreg`` extension codes (none is
    registered; a registered one would go through :meth:`find_class`) are refused too.
    """

    def __init__(self, file: io.BufferedIOBase, source: str | Path):
        super().__init__(file)
        self.source = str(source)

    def find_class(self, module: str, name: str):
        kind = "a numpy object" if module.split(".")[0] == "numpy" else "an object"
        raise PublishedSplitError(
            f"{self.source}: refused: the pickle asks for {kind}, {module}.{name}; only "
            "lists, tuples, strings and numbers are read from split pickles (nothing was run)"
        )

    def persistent_load(self, pid):
        raise PublishedSplitError(
            f"{self.source}: refused: the pickle refers to an external object (persistent id); "
            "only lists, tuples, strings and numbers are read from split pickles"
        )


def load_plain_pickle(data: bytes, source: str | Path) -> object:
    """The object pickled in ``data`` if it is made of plain data only (see
    :class:`PlainDataUnpickler`); PublishedSplitError naming ``source`` otherwise."""
    try:
        return PlainDataUnpickler(io.BytesIO(data), source).load()
    except PublishedSplitError:
        raise
    except Exception as error:  # truncated, not a pickle, unknown protocol: all "unreadable"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PublishedSplitError(f"{source}: not a readable pickle ({first})") from None


# ---- one pickle ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedPart:
    """One pickle: the slides of one part of one split, in the published order."""

    path: Path
    sha256: str
    slide_ids: list[str]
    labels: list[str]  #: fine class names, as :func:`label_name` writes them


def read_published_part(path: Path) -> PublishedPart:
    """Read one ``{part}_splits_{k}.pkl``: a list of ``[slide_id, fine_label, feature_path]``
    rows (lists or tuples; ids and labels strings or whole numbers, the path a string).

    The SHA-256 is of the bytes that were unpickled. Raises PublishedSplitError for a file
    that cannot be read, asks for any object, or has another shape (one line, the file and
    the first bad row).
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PublishedSplitError(f"{path}: cannot read ({error.strerror or error})") from None
    rows = load_plain_pickle(data, path)
    if not isinstance(rows, list | tuple):
        raise PublishedSplitError(
            f"{path}: not a published split: expected a list of {ROW_SHAPE} rows, "
            f"got a {type(rows).__name__}"
        )
    slide_ids, labels = [], []
    for index, row in enumerate(rows):
        if not (
            isinstance(row, list | tuple)
            and len(row) == 3
            and _is_name(row[0])
            and (_is_name(row[1]) or _is_whole(row[1]))
            and isinstance(row[2], str)
        ):
            raise PublishedSplitError(
                f"{path}: row {index} is {_short(row)}; expected {ROW_SHAPE} "
                "(id and label strings or whole numbers, the path a string)"
            )
        slide_ids.append(str(row[0]).strip())
        labels.append(label_name(row[1]))
    return PublishedPart(path, hashlib.sha256(data).hexdigest(), slide_ids, labels)


def _is_name(value: object) -> bool:
    return (isinstance(value, str) and value.strip() != "") or (
        isinstance(value, int) and not isinstance(value, bool)
    )


def _is_whole(value: object) -> bool:
    return isinstance(value, float) and value.is_integer()


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- a folder of them ------------------------------------------------------------------------


def published_split_files(directory: str | Path) -> list[dict[str, Path]]:
    """The pickles of every published split in ``directory``: ``[{"train": path, "val":
    path, "test": path}, ...]`` for k = 0…K-1 (nothing is read).

    Raises PublishedSplitError for a missing folder, a folder without split pickles, a
    split that lacks a part, or a gap in the numbering.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PublishedSplitError(f"{directory}: folder of published splits not found")
    found: dict[int, dict[str, Path]] = {}
    for path in directory.iterdir():
        match = SPLIT_FILE.match(path.name)
        if match:
            found.setdefault(int(match.group(2)), {})[match.group(1)] = path
    if not found:
        raise PublishedSplitError(
            f"{directory}: no published splits ({{train,val,test}}_splits_{{k}}.pkl) in it"
        )
    incomplete = {k: [p for p in PARTS if p not in parts] for k, parts in found.items()}
    incomplete = {k: missing for k, missing in sorted(incomplete.items()) if missing}
    if incomplete:
        k, missing = next(iter(incomplete.items()))
        raise PublishedSplitError(
            f"{directory}: split {k} lacks {', '.join(f'{p}_splits_{k}.pkl' for p in missing)}"
            + (f" ({len(incomplete)} splits are incomplete)" if len(incomplete) > 1 else "")
        )
    gaps = sorted(set(range(max(found) + 1)) - set(found))
    if gaps:
        raise PublishedSplitError(
            f"{directory}: splits are numbered 0…{max(found)} but split(s) "
            f"{', '.join(map(str, gaps[:EXAMPLES]))} are missing"
        )
    return [{part: found[k][part] for part in PARTS} for k in range(len(found))]


@dataclass(frozen=True)
class PublishedSplits:
    """Every split of a published folder, checked for shape and for slides listed twice."""

    directory: Path
    parts: list[dict[str, PublishedPart]]  #: per split k, per part

    @property
    def sha256(self) -> dict[str, str]:
        """File name → SHA-256 of every pickle read, in split and part order."""
        return {part.path.name: part.sha256 for split in self.parts for part in split.values()}

    def assignment(self, k: int) -> dict[str, str]:
        """Slide id → part (``train``/``val``/``test``) of split ``k``."""
        return {
            slide: part
            for part, published in self.parts[k].items()
            for slide in published.slide_ids
        }

    def rows(self) -> Iterable[tuple[str, str, Path]]:
        """Every published row as (slide id, label, pickle), in split and part order."""
        for split in self.parts:
            for published in split.values():
                for slide, label in zip(published.slide_ids, published.labels, strict=True):
                    yield slide, label, published.path


def read_published_splits(directory: str | Path) -> PublishedSplits:
    """Read and check every split pickle of ``directory`` (see :func:`read_published_part`).

    Raises PublishedSplitError for an empty train or val part, or a slide listed twice in
    one split (in two parts, or twice in one), with the count and the first few slides.
    """
    files = published_split_files(directory)
    splits = [{part: read_published_part(path) for part, path in k.items()} for k in files]
    for split in splits:
        for part in ("train", "val"):
            if not split[part].slide_ids:
                raise PublishedSplitError(f"{split[part].path}: no slides in the {part} part")
    twice = []
    for k, split in enumerate(splits):
        parts_of: dict[str, list[str]] = {}
        for part, published in split.items():
            for slide in published.slide_ids:
                parts_of.setdefault(slide, []).append(part)
        twice += [(k, s, parts) for s, parts in parts_of.items() if len(parts) > 1]
    if twice:
        examples = ", ".join(
            f"{slide} (split {k}: {' and '.join(parts)})" for k, slide, parts in twice[:EXAMPLES]
        )
        raise PublishedSplitError(
            f"{directory}: {len(twice)} slide(s) listed more than once in one split: "
            f"{examples}{_more(len(twice))}"
        )
    return PublishedSplits(Path(directory), splits)


def check_against_sheet(
    published: PublishedSplits,
    sheet_labels: Mapping[str, str],
    sheet: str | Path,
    hierarchy: Hierarchy | None,
) -> None:
    """Every published slide is in the sheet (``sheet_labels``: slide id → class name),
    with a label the hierarchy knows and the same label as the sheet's.

    Raises PublishedSplitError for the first kind of disagreement found, in that order,
    naming its count and first few slides.
    """
    unknown: dict[str, Path] = {}
    foreign: dict[str, str] = {}
    differ: dict[str, tuple[str, str]] = {}
    known = set(hierarchy.fine) if hierarchy else None
    for slide, label, path in published.rows():
        expected = sheet_labels.get(slide)
        if expected is None:
            unknown.setdefault(slide, path)
        elif known is not None and label not in known:
            foreign.setdefault(slide, label)
        elif label != expected:
            differ.setdefault(slide, (label, expected))
    if unknown:
        examples = ", ".join(f"{s} ({p.name})" for s, p in list(unknown.items())[:EXAMPLES])
        raise PublishedSplitError(
            f"{published.directory}: {len(unknown)} slide(s) of the published splits are "
            f"not in the sheet {sheet}: {examples}{_more(len(unknown))}"
        )
    if foreign:
        examples = ", ".join(f"{s} ({lab!r})" for s, lab in list(foreign.items())[:EXAMPLES])
        raise PublishedSplitError(
            f"{published.directory}: {len(foreign)} slide(s) of the published splits have a "
            f"label not in hierarchy {hierarchy.name!r}: {examples}{_more(len(foreign))}; "
            f"known classes: {', '.join(hierarchy.fine)}"
        )
    if differ:
        examples = ", ".join(
            f"{s} ({pub!r} published, {own!r} in the sheet)"
            for s, (pub, own) in list(differ.items())[:EXAMPLES]
        )
        raise PublishedSplitError(
            f"{published.directory}: {len(differ)} slide(s) have another label in the "
            f"published splits than in the sheet {sheet}: {examples}{_more(len(differ))}"
        )


def _more(count: int) -> str:
    return f" and {count - EXAMPLES} more" if count > EXAMPLES else ""


# ---- as a DATA_SPLIT table -------------------------------------------------------------------

#: The value of a slide of the sheet that a published split does not list: it is excluded
#: from that fold (an empty cell; the trainer reads only train, val and test).
EXCLUDED = ""


def published_fold_table(
    slides: pd.DataFrame, published: PublishedSplits, hierarchy: Hierarchy | None
) -> pd.DataFrame:
    """The DATA_SPLIT table of the published splits: one row per slide of ``slides``
    (columns ``slide_id, patient_id, label``, in their order), ``coarse_label`` (empty
    without a hierarchy) and ``fold{k}`` = the part of the slide in published split k, or
    :data:`EXCLUDED` where split k does not list it."""
    table = slides[["slide_id", "patient_id", "label"]].reset_index(drop=True)
    table["coarse_label"] = [hierarchy.coarse_of(x) for x in table["label"]] if hierarchy else ""
    folds = {
        f"fold{k}": table["slide_id"].map(published.assignment(k)).fillna(EXCLUDED)
        for k in range(len(published.parts))
    }
    return pd.concat([table, pd.DataFrame(folds)], axis=1)


def excluded_counts(table: pd.DataFrame, folds: list[str]) -> dict[str, int]:
    """Slides of the table left out of each fold (listed in no part of it)."""
    return {column: int((table[column] == EXCLUDED).sum()) for column in folds}


def patients_across_parts(table: pd.DataFrame, folds: list[str]) -> dict[str, list[str]]:
    """Per fold, the patients whose slides the published split put in more than one part
    (the authors' splits need not be patient-grouped; they are kept as published)."""
    found = {}
    for column in folds:
        listed = table[table[column] != EXCLUDED]
        parts = listed.groupby("patient_id")[column].nunique()
        found[column] = sorted(parts.index[parts > 1])
    return found
