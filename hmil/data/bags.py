"""Slides as bags of patch features, for training and evaluating MIL models.

A features directory holds one file per slide: ``<slide_id>.h5`` (dataset ``features``
N×D, dataset ``coords`` N×2, attribute ``feature_dim``) or ``<slide_id>.pt`` (an N×D
tensor, the HMIL reference layout). ``.h5`` wins when both exist. Features made elsewhere
(`preprocessing.import_features`) arrive as thin h5 files: ``features``/``coords`` are
external links into the source files, or, for a ``.pt`` source, the attribute
``features_pt`` names the tensor file, which is read in its place.

Everything that can be checked without reading the features (the file exists, the label
is a class of the hierarchy, N > 0, every slide has the same D) is checked when the
dataset is built, so a bad cohort fails before training starts; NaN/Inf needs the values
and is checked when a bag is loaded.
"""

from __future__ import annotations

import math
import pickle
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from hmil.data.hierarchy import Hierarchy, HierarchyError

FEATURE_SUFFIXES = (".h5", ".pt")


class BagError(ValueError):
    """A slide whose features or label cannot be used; the message names slide and file."""


class Bag(NamedTuple):
    """One slide: features float32 [N, D], fine and coarse class index, slide id."""

    features: torch.Tensor
    fine_label: int
    coarse_label: int
    slide_id: str


class BagBatch(NamedTuple):
    """B bags of different sizes, kept whole (not padded): models take one bag at a time.

    features: B tensors [N_b, D]; fine_labels, coarse_labels: int64 [B]; slide_ids: B ids.
    """

    features: list[torch.Tensor]
    fine_labels: torch.Tensor
    coarse_labels: torch.Tensor
    slide_ids: list[str]


def collate_bags(bags: Sequence[Bag]) -> BagBatch:
    """DataLoader ``collate_fn``: a list of variable-length bags plus stacked labels."""
    return BagBatch(
        features=[bag.features for bag in bags],
        fine_labels=torch.tensor([bag.fine_label for bag in bags], dtype=torch.long),
        coarse_labels=torch.tensor([bag.coarse_label for bag in bags], dtype=torch.long),
        slide_ids=[bag.slide_id for bag in bags],
    )


def find_feature_file(features_dir: str | Path, slide_id: str) -> Path:
    """``<features_dir>/<slide_id>.h5`` or ``.pt``; BagError if neither exists."""
    features_dir = Path(features_dir)
    for suffix in FEATURE_SUFFIXES:
        path = features_dir / f"{slide_id}{suffix}"
        if path.is_file():
            return path
    raise BagError(
        f"slide {slide_id!r}: no feature file {features_dir / slide_id}.h5 (or .pt); "
        "run feature extraction for it or drop it from the table"
    )


def flagged_reason(path: str | Path) -> str | None:
    """Why a feature file says its slide is unusable (status ``empty``/``failed``), else None.

    Feature extraction writes such flagged files for slides without tissue or that could not
    be read, so a cohort run can report them instead of stopping.
    """
    path = Path(path)
    if path.suffix != ".h5":
        return None
    try:
        with h5py.File(path, "r") as file:
            status = file.attrs.get("status", "ok")
            reason = file.attrs.get("status_reason", "")
    except OSError:
        return None  # unreadable: reported as an error when the bag is built
    status = status.decode() if isinstance(status, bytes) else str(status)
    if status == "ok":
        return None
    reason = reason.decode() if isinstance(reason, bytes) else str(reason)
    return f"{status}: {reason}" if reason else status


def drop_flagged_slides(
    table: pd.DataFrame, features_dir: str | Path
) -> tuple[pd.DataFrame, dict[str, str]]:
    """The table without slides whose feature file is flagged, and {slide_id: reason} of those.

    Slides without a feature file stay in the table, so that they still raise a BagError.
    """
    reasons: dict[str, str] = {}
    for slide_id in table["slide_id"].astype(str):
        try:
            path = find_feature_file(features_dir, slide_id)
        except BagError:
            continue
        reason = flagged_reason(path)
        if reason is not None:
            reasons[slide_id] = reason
    keep = ~table["slide_id"].astype(str).isin(reasons)
    return table[keep].reset_index(drop=True), reasons


def read_bag_shape(path: str | Path, slide_id: str) -> tuple[int, int]:
    """(N, D) of a feature file without reading the features (h5 metadata, mmapped .pt)."""
    path = Path(path)
    if path.suffix == ".pt":
        features = _load_pt(path, slide_id, mmap=True)
        return int(features.shape[0]), int(features.shape[1])
    try:
        with h5py.File(path, "r") as file:
            tensor_file = _imported_tensor(file, path, slide_id)
            if tensor_file is None:
                if "features" not in file:
                    raise BagError(f"slide {slide_id!r} ({path}): no 'features' dataset")
                _check_link(file, "features", path, slide_id)
                shape = file["features"].shape
            declared_dim = file.attrs.get("feature_dim")
    except (OSError, KeyError) as error:
        raise unreadable(slide_id, path, error) from None
    if tensor_file is not None:
        shape = tuple(_load_pt(tensor_file, slide_id, mmap=True).shape)
    if len(shape) != 2:
        raise BagError(f"slide {slide_id!r} ({path}): 'features' has shape {shape}, expected N×D")
    if declared_dim is not None and int(declared_dim) != shape[1]:
        raise BagError(
            f"slide {slide_id!r} ({path}): attribute feature_dim={int(declared_dim)} "
            f"but 'features' has {shape[1]} columns"
        )
    return int(shape[0]), int(shape[1])


def load_bag_features(path: str | Path, slide_id: str) -> torch.Tensor:
    """float32 [N, D] features of one slide; BagError if empty or not finite."""
    path = Path(path)
    if path.suffix == ".pt":
        features = _load_pt(path, slide_id, mmap=False).to(torch.float32)
    else:
        try:
            with h5py.File(path, "r") as file:
                tensor_file = _imported_tensor(file, path, slide_id)
                if tensor_file is None:
                    _check_link(file, "features", path, slide_id)
                    array = np.asarray(file["features"][()], dtype=np.float32)
        except (OSError, KeyError) as error:
            raise unreadable(slide_id, path, error) from None
        if tensor_file is None:
            features = torch.from_numpy(array)
        else:
            features = _load_pt(tensor_file, slide_id, mmap=False).to(torch.float32)
    if features.ndim != 2:
        raise BagError(
            f"slide {slide_id!r} ({path}): features have shape {tuple(features.shape)}, "
            "expected N×D"
        )
    if features.shape[0] == 0:
        raise BagError(f"slide {slide_id!r} ({path}): empty bag (0 patches; no tissue found?)")
    # numpy, not torch: this runs in the reader thread beside the model's torch ops, and
    # torch's thread pool made the check 100× slower there (14 ms against 0.1 ms per bag)
    finite_rows = np.isfinite(features.detach().numpy()).all(axis=1)
    if not finite_rows.all():
        bad = int((~finite_rows).sum())
        raise BagError(
            f"slide {slide_id!r} ({path}): {bad} of {features.shape[0]} feature rows contain "
            f"NaN or Inf; {rebuild_hint(path)}"
        )
    return features


def _imported_tensor(file: h5py.File, path: Path, slide_id: str) -> Path | None:
    """The ``.pt`` file a thin (imported) features h5 stands for, or None for a plain h5."""
    if "features" in file or "features_pt" not in file.attrs:
        return None
    tensor_file = file.attrs["features_pt"]
    tensor_file = Path(tensor_file.decode() if isinstance(tensor_file, bytes) else tensor_file)
    if not tensor_file.is_file():
        raise BagError(
            f"slide {slide_id!r} ({path}): its features are {tensor_file}, which is missing; "
            "restore the features made elsewhere or re-run their import"
        )
    return tensor_file


def _check_link(file: h5py.File, name: str, path: Path, slide_id: str) -> None:
    """A dataset that links to a file made elsewhere must still find that file."""
    link = file.get(name, getlink=True)
    if isinstance(link, h5py.ExternalLink) and not Path(link.filename).is_file():
        raise BagError(
            f"slide {slide_id!r} ({path}): its {name!r} link to {link.filename} is broken "
            "(file missing); restore the features made elsewhere or re-run their import"
        )


def _load_pt(path: Path, slide_id: str, mmap: bool) -> torch.Tensor:
    try:
        features = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError:
        if not mmap:
            raise BagError(
                f"slide {slide_id!r} ({path}): cannot read feature tensor; {rebuild_hint(path)}"
            ) from None
        # Files written with the legacy (non-zip) serialisation cannot be memory-mapped.
        return _load_pt(path, slide_id, mmap=False)
    except (OSError, EOFError, pickle.UnpicklingError) as error:
        raise unreadable(slide_id, path, error) from None
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise BagError(f"slide {slide_id!r} ({path}): expected one N×D tensor")
    return features


def rebuild_hint(path: str | Path) -> str:
    """How to rebuild a damaged feature file, in the words of a BagError: force the
    workflow's shard record that lists it (`shards/shard<k>.csv` beside the file, written
    by the workflow's extraction), else the file itself."""
    target = shard_record_of(Path(path)) or path
    return (
        "rebuild it by re-running its feature extraction (workflow: the usual snakemake "
        f"command plus --forcerun {target})"
    )


def shard_record_of(path: Path) -> Path | None:
    """The workflow's shard record that lists the slide of features file `path`, if any."""
    for record in sorted((path.parent / "shards").glob("shard*.csv")):
        try:
            slides = pd.read_csv(record, usecols=["slide_id"], dtype=str)["slide_id"]
        except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
            continue
        if path.stem in set(slides):
            return record
    return None


def unreadable(slide_id: str, path: str | Path, error: BaseException) -> BagError:
    """BagError for a feature file that cannot be read: truncated, damaged, not HDF5."""
    return BagError(
        f"slide {slide_id!r} ({path}): cannot read feature file, damaged or incomplete "
        f"({_first_line(error)}); {rebuild_hint(path)}"
    )


def _first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an error message, so a BagError stays one line."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


class CacheBudget:
    """Bytes of features that the bag datasets sharing it may keep in memory: bags are kept
    in the order they are first read until the budget is spent; later ones are read from
    their file every time. One budget for train and val bounds the run's memory however
    large the cohort; the bags kept stay fixed, so an epoch reads the same files each time.
    """

    def __init__(self, limit_bytes: float = math.inf) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they fit (one thread reads bags at a time: no lock)."""
        if self.used_bytes + nbytes > self.limit_bytes:
            return False
        self.used_bytes += nbytes
        return True


class BagDataset(Dataset):
    """The slides of a table as bags: item i is a :class:`Bag` (features [N, D], labels, id).

    Args:
        table: at least columns ``slide_id`` and ``label`` (a fine class name).
        features_dir: directory of ``<slide_id>.h5`` / ``.pt`` feature files.
        hierarchy: maps labels to fine and coarse class indices.
        cache: keep loaded features in memory (per process: each DataLoader worker has
            its own copy, so use it with ``num_workers=0`` or small cohorts), as
            :meth:`keep_in_memory` does after construction, without a limit.
        feature_dim: expected D (e.g. the training set's, when building a test set);
            None means "whatever all slides agree on".

    Raises:
        BagError: missing column or file, unknown label, duplicate slide id, empty bag,
            or feature dimensions that differ between slides (or from ``feature_dim``).
    """

    def __init__(
        self,
        table: pd.DataFrame,
        features_dir: str | Path,
        hierarchy: Hierarchy,
        *,
        cache: bool = False,
        feature_dim: int | None = None,
    ) -> None:
        missing = [column for column in ("slide_id", "label") if column not in table.columns]
        if missing:
            raise BagError(f"slide table is missing column {missing[0]!r} (need slide_id, label)")
        self.hierarchy = hierarchy
        self.slide_ids = [str(slide_id) for slide_id in table["slide_id"]]
        duplicated = [s for s, count in Counter(self.slide_ids).items() if count > 1]
        if duplicated:
            raise BagError(f"slide {duplicated[0]!r} appears more than once in the slide table")

        fine_labels = []
        for slide_id, label in zip(self.slide_ids, table["label"], strict=True):
            try:
                fine_labels.append(hierarchy.fine_index(label))
            except HierarchyError as error:
                raise BagError(f"slide {slide_id!r}: {error}") from None
        self.fine_labels = np.asarray(fine_labels, dtype=np.int64)
        self.coarse_labels = hierarchy.fine_to_coarse[self.fine_labels]

        self.paths = [find_feature_file(features_dir, s) for s in self.slide_ids]
        shapes = [read_bag_shape(p, s) for p, s in zip(self.paths, self.slide_ids, strict=True)]
        for (num_patches, _), path, slide_id in zip(
            shapes, self.paths, self.slide_ids, strict=True
        ):
            if num_patches == 0:
                raise BagError(
                    f"slide {slide_id!r} ({path}): empty bag (0 patches; no tissue found?)"
                )
        self.num_patches = np.asarray([n for n, _ in shapes], dtype=np.int64)
        self.feature_dim = self._common_feature_dim([d for _, d in shapes], feature_dim)
        self._cache: dict[int, torch.Tensor] | None = None
        self._budget = CacheBudget()
        if cache:
            self.keep_in_memory()

    def _common_feature_dim(self, dims: list[int], expected: int | None) -> int:
        if not dims:
            if expected is None:
                raise BagError("slide table is empty")
            return expected
        reference = expected if expected is not None else Counter(dims).most_common(1)[0][0]
        for dim, path, slide_id in zip(dims, self.paths, self.slide_ids, strict=True):
            if dim != reference:
                origin = "expected" if expected is not None else "of most slides"
                raise BagError(
                    f"slide {slide_id!r} ({path}): feature dimension {dim} differs from "
                    f"{reference} {origin}; features of different encoders in one directory?"
                )
        return reference

    @property
    def feature_bytes(self) -> int:
        """Memory the float32 features of all slides take once loaded."""
        return int(self.num_patches.sum()) * self.feature_dim * 4

    def keep_in_memory(self, budget: CacheBudget | None = None) -> None:
        """From now on keep each bag's features after its first read, as long as ``budget``
        (default: none) has room."""
        if self._cache is None:
            self._cache = {}
        if budget is not None:
            self._budget = budget

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, index: int) -> Bag:
        features = self._cache.get(index) if self._cache is not None else None
        if features is None:
            features = load_bag_features(self.paths[index], self.slide_ids[index])
            if features.shape[1] != self.feature_dim:  # the file changed since construction
                raise BagError(
                    f"slide {self.slide_ids[index]!r} ({self.paths[index]}): feature dimension "
                    f"{features.shape[1]}, expected {self.feature_dim}"
                )
            if self._cache is not None and self._budget.take(features.nbytes):
                self._cache[index] = features
        return Bag(
            features=features,
            fine_label=int(self.fine_labels[index]),
            coarse_label=int(self.coarse_labels[index]),
            slide_id=self.slide_ids[index],
        )
