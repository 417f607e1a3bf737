"""Patient-grouped, label-stratified cross-validation splits of a slide sheet.

The split depends on the sheet only: slides that later fail preprocessing keep their
row (the trainer skips them), so adding an encoder or fixing a slide never reshuffles.

Protocols:

- ``kfold`` (default): K disjoint test folds covering every patient once; inside each
  fold a validation set of ``val_fraction`` of the fold's non-test patients.
- ``repeated`` (the HMIL paper's): K independent random train/val/test splits with
  ``val_fraction`` and ``test_fraction`` of the patients (80/10/10 by default); test sets
  of different repeats overlap.

Patients, not slides, are the unit: all slides of a patient land in one part. Each patient
is stratified by its label (the most frequent among its slides, ties → first in the
sheet). Test folds come from sklearn's ``StratifiedGroupKFold`` over slides (so slide
counts per class are balanced too); as that is greedy, the result is checked and, if a
class with enough patients misses a fold's test or val, replaced by ``StratifiedKFold``
over patients, which deals each class evenly. Validation patients are drawn per class
(round(fraction·n), at least one), so every class with two or more training patients is
validated in every fold.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pandas as pd

from hmil.data.hierarchy import Hierarchy, label_name
from hmil.data.split_settings import PROTOCOLS
from plumbing.errors import PipelineError

log = logging.getLogger("hmil.splits")

PARTS = ("train", "val", "test")
#: How to accept classes too small for every part of every fold, from the command line and
#: from the workflow (which cannot pass the flag itself).
SPARSE_HINT = (
    "to go on without, pass --allow-sparse-classes, or set splits.allow_sparse_classes: true "
    "in the workflow config"
)


class SplitError(PipelineError):
    """Splits cannot be made from this sheet (labels, class sizes, parameters)."""


def make_splits(
    table: pd.DataFrame,
    folds: int,
    seed: int = 0,
    hierarchy: Hierarchy | None = None,
    protocol: str = "kfold",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    allow_sparse_classes: bool = False,
) -> pd.DataFrame:
    """DATA_SPLIT table for ``table`` (columns ``slide_id, patient_id, label``).

    Returns one row per slide, in the order of ``table``: ``slide_id, patient_id, label,
    coarse_label, fold0 … fold{folds-1}``. Slides without a patient id become their own
    patient (their ``patient_id`` is set to the slide id). Without a hierarchy the classes
    are the labels found and ``coarse_label`` is empty. Deterministic in ``seed``.
    Raises SplitError for unknown labels or classes too small for the protocol (unless
    ``allow_sparse_classes``: then a warning, and some parts lack the class).
    """
    check_parameters(folds, seed, protocol, val_fraction, test_fraction)
    slides = normalised_slides(table)
    classes = check_labels(slides, hierarchy)
    patients = patient_labels(slides)
    counts = patients["label"].value_counts()
    minimum = folds if protocol == "kfold" else 3
    if len(patients) < minimum:
        raise SplitError(
            f"{len(patients)} patient(s) cannot make {protocol} splits (need at least {minimum})"
        )
    absent = [c for c in classes if c not in counts.index]
    if absent:
        log.warning("no slide of class(es) %s in the sheet", ", ".join(absent))
    needed = patients_needed(folds, protocol)
    sparse = {c: int(counts.get(c, 0)) for c in classes if 0 < counts.get(c, 0) < needed}
    if sparse:
        listing = ", ".join(f"{c!r} has {n} patient(s)" for c, n in sparse.items())
        message = (
            f"class(es) too small for {protocol} splits with {folds} folds: {listing}; "
            f"need at least {needed} patients per class so that every fold has the class "
            "in train, val and test"
        )
        if not allow_sparse_classes:
            raise SplitError(message + f" ({SPARSE_HINT})")
        log.warning("%s; going on (sparse classes allowed): some folds lack them", message)

    if protocol == "kfold":
        assignment = _kfold_assignment(patients, folds, seed, val_fraction, needed)
    else:
        assignment = _repeated_assignment(patients, folds, seed, val_fraction, test_fraction)

    out = slides[["slide_id", "patient_id", "label"]].copy()
    out["coarse_label"] = [hierarchy.coarse_of(x) for x in out["label"]] if hierarchy else ""
    parts = pd.DataFrame(
        assignment, index=patients.index, columns=[f"fold{k}" for k in range(folds)]
    )
    out = out.join(parts, on="patient_id")
    check_patient_disjoint(out)
    return out.reset_index(drop=True)


def patients_needed(folds: int, protocol: str) -> int:
    """Smallest patient count of a class that puts it in every fold's train, val and test.

    k-fold: one patient per test fold (n ≥ K), and the largest test share ⌈n/K⌉ must leave
    two patients (one train, one val). Repeated: one patient per part.
    """
    if protocol != "kfold":
        return 3
    n = max(folds, 1)
    while n - math.ceil(n / folds) < 2:
        n += 1
    return n


def patient_labels(slides: pd.DataFrame) -> pd.DataFrame:
    """One row per patient (index ``patient_id``, sorted): ``label`` (the most frequent of
    its slides, ties → first in the sheet) and ``n_slides``."""
    order = slides.assign(_row=np.arange(len(slides)))
    tally = order.groupby(["patient_id", "label"], sort=False).agg(
        n=("_row", "size"), first=("_row", "min")
    )
    tally = tally.reset_index().sort_values(
        ["patient_id", "n", "first"], ascending=[True, False, True]
    )
    labels = tally.drop_duplicates("patient_id").set_index("patient_id")["label"]
    mixed = tally["patient_id"].duplicated().groupby(tally["patient_id"]).any()
    if mixed.any():
        log.warning(
            "%d patient(s) have slides of several labels (e.g. %s); each is stratified by its "
            "most frequent label and all its slides stay together",
            int(mixed.sum()),
            ", ".join(mixed.index[mixed][:3]),
        )
    n_slides = slides.groupby("patient_id").size()
    return pd.DataFrame({"label": labels, "n_slides": n_slides}).sort_index()


def check_patient_disjoint(splits: pd.DataFrame) -> None:
    """Internal invariant: no patient appears in two parts of one fold."""
    for column in fold_columns(splits):
        parts_per_patient = splits.groupby("patient_id")[column].nunique(dropna=False)
        if (parts_per_patient > 1).any():
            patient = parts_per_patient.index[parts_per_patient > 1][0]
            raise AssertionError(f"{column}: patient {patient!r} is in several parts (a bug)")


def fold_columns(splits: pd.DataFrame) -> list[str]:
    return [c for c in splits.columns if c.startswith("fold") and c[4:].isdigit()]


# ---- protocol internals ----------------------------------------------------------------------


def _kfold_assignment(
    patients: pd.DataFrame, folds: int, seed: int, val_fraction: float, needed: int
) -> np.ndarray:
    """[P, K] object array of part names for the patients (rows in ``patients`` order)."""
    labels = patients["label"].to_numpy()
    assignment = np.full((len(patients), folds), "train", dtype=object)
    for fold, test in enumerate(_test_folds(patients, folds, seed, needed)):
        assignment[test, fold] = "test"
        rest = np.setdiff1d(np.arange(len(labels)), test)
        rng = np.random.default_rng([seed, fold])
        val = _stratified_draw(labels, rest, val_fraction, rng, keep=1)
        assignment[val, fold] = "val"
    return assignment


def _test_folds(patients: pd.DataFrame, folds: int, seed: int, needed: int) -> list[np.ndarray]:
    """Patient indices of each test fold.

    ``StratifiedGroupKFold`` over slides (label = the patient's label) balances slide
    counts, but it is greedy: if it leaves a class of ≥ ``needed`` patients out of a test
    fold, or with fewer than two patients outside it, fall back to ``StratifiedKFold`` over
    patients, which deals every class's patients evenly (⌊n/K⌋ or ⌈n/K⌉ per fold).
    """
    # Imported here: sklearn costs about a second, which published splits do not need.
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = patients["label"].to_numpy()
    slide_patient = np.repeat(np.arange(len(patients)), patients["n_slides"].to_numpy())
    with warnings.catch_warnings():
        # Classes smaller than K were reported (or refused) above with a clearer message.
        warnings.simplefilter("ignore", UserWarning)
        try:
            grouped = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            test_folds = [
                np.unique(slide_patient[test])
                for _, test in grouped.split(
                    slide_patient, labels[slide_patient], groups=slide_patient
                )
            ]
            if _covers_classes(labels, test_folds, needed):
                return test_folds
            log.info("slide-balanced folds miss a class; dealing patients per class instead")
            plain = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            return [test for _, test in plain.split(np.zeros(len(labels)), labels)]
        except ValueError as error:  # e.g. every class smaller than K
            raise SplitError(str(error)) from None


def _covers_classes(labels: np.ndarray, test_folds: list[np.ndarray], needed: int) -> bool:
    """Every class of ≥ needed patients has ≥ 1 test and ≥ 2 other patients in every fold."""
    names, totals = np.unique(labels, return_counts=True)
    large = names[totals >= needed]
    for test in test_folds:
        in_test = pd.Series(labels[test]).value_counts().reindex(names, fill_value=0)
        in_test = in_test.to_numpy()[np.isin(names, large)]
        if (in_test < 1).any() or (totals[np.isin(names, large)] - in_test < 2).any():
            return False
    return True


def _repeated_assignment(
    patients: pd.DataFrame, repeats: int, seed: int, val_fraction: float, test_fraction: float
) -> np.ndarray:
    labels = patients["label"].to_numpy()
    everyone = np.arange(len(labels))
    assignment = np.full((len(labels), repeats), "train", dtype=object)
    for repeat in range(repeats):
        rng = np.random.default_rng([seed, repeat])
        # Test first, keeping one training patient and one for val where the class allows.
        test = _stratified_draw(labels, everyone, test_fraction, rng, keep=2)
        rest = np.setdiff1d(everyone, test)
        scaled = val_fraction / (1 - test_fraction)  # a fraction of all patients, not of rest
        val = _stratified_draw(labels, rest, scaled, rng, keep=1)
        assignment[test, repeat] = "test"
        assignment[val, repeat] = "val"
    return assignment


def _stratified_draw(
    labels: np.ndarray, pool: np.ndarray, fraction: float, rng: np.random.Generator, keep: int
) -> np.ndarray:
    """Indices drawn from ``pool``: per class round(fraction·n), at least 1, leaving at least
    ``keep`` of the class behind (a class of ≤ keep patients gives none)."""
    chosen = []
    pool = np.sort(pool)
    for label in sorted(set(labels[pool])):  # one iteration per class, not per patient
        members = pool[labels[pool] == label]
        take = min(max(1, round(fraction * len(members))), len(members) - keep)
        if take > 0:
            chosen.append(rng.permutation(members)[:take])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


# ---- input checks ----------------------------------------------------------------------------


def check_parameters(
    folds: int, seed: int, protocol: str, val_fraction: float, test_fraction: float
) -> None:
    """SplitError for parameters no sheet can be split with (named as their options)."""
    if protocol not in PROTOCOLS:
        raise SplitError(f"unknown protocol {protocol!r} (expected one of: {', '.join(PROTOCOLS)})")
    if protocol == "kfold" and folds < 2:
        raise SplitError(f"--folds must be ≥ 2 for k-fold splits, got {folds}")
    if folds < 1:
        raise SplitError(f"--folds must be ≥ 1, got {folds}")
    if seed < 0:
        raise SplitError(f"--seed must be ≥ 0, got {seed}")
    if not 0 < val_fraction < 1:
        raise SplitError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if protocol == "repeated" and not (0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise SplitError(
            f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be positive "
            "and leave a training part (sum below 1)"
        )


def normalised_slides(table: pd.DataFrame) -> pd.DataFrame:
    """Labels as class names; slides without patient id become their own patient."""
    missing = [c for c in ("slide_id", "patient_id", "label") if c not in table.columns]
    if missing:
        raise SplitError(f"slide table lacks column(s) {', '.join(missing)}")
    slides = table.reset_index(drop=True)[["slide_id", "patient_id", "label"]].copy()
    slides["slide_id"] = slides["slide_id"].astype(str)
    no_label = slides["label"].isna() | (slides["label"].astype(str).str.strip() == "")
    if no_label.any():
        raise SplitError(
            f"{int(no_label.sum())} slide(s) without label: "
            f"{', '.join(slides['slide_id'][no_label][:5])}"
        )
    slides["label"] = [label_name(x) for x in slides["label"]]
    patient = slides["patient_id"].astype("string").str.strip()
    no_patient = patient.isna() | (patient == "")
    if no_patient.any():
        log.warning(
            "%d slide(s) without patient_id (e.g. %s): each is treated as its own patient",
            int(no_patient.sum()),
            ", ".join(slides["slide_id"][no_patient][:3]),
        )
    # A slide id equal to a real patient id merges the two: harmless (never a leak).
    slides["patient_id"] = patient.where(~no_patient, slides["slide_id"]).astype(str)
    return slides


def check_labels(slides: pd.DataFrame, hierarchy: Hierarchy | None) -> list[str]:
    """The class names in index order; SplitError naming the slides with unknown labels."""
    if hierarchy is None:
        return sorted(slides["label"].unique())
    unknown = ~slides["label"].isin(hierarchy.fine)
    if unknown.any():
        bad = slides[unknown].head(5)
        examples = ", ".join(
            f"{s} ({lab!r})" for s, lab in zip(bad["slide_id"], bad["label"], strict=True)
        )
        n_bad = int(unknown.sum())
        more = f" and {n_bad - 5} more" if n_bad > 5 else ""
        raise SplitError(
            f"{n_bad} slide(s) have a label not in hierarchy {hierarchy.name!r}: "
            f"{examples}{more}; known classes: {', '.join(hierarchy.fine)}"
        )
    return list(hierarchy.fine)
