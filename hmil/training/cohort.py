"""A fold's slides: its split tables without the slides whose feature file is flagged, checked
against the settings, and their bags."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd

from hmil.data.bags import BagDataset, drop_flagged_slides
from hmil.data.fold_tables import load_fold_tables
from hmil.data.hierarchy import Hierarchy
from hmil.training.config import RunOptions, TrainingError, TrainSettings, check_cohort
from hmil.training.memory import available_memory

log = logging.getLogger("hmil.train")  # the command's logger: its log lines name it

#: The share of the memory available at start that the features may fill when ``--cache``
#: is left to decide (the default).
CACHE_MEMORY_SHARE = 0.25


@dataclass(frozen=True)
class FoldData:
    """The train, val and test tables and bag datasets of a fold, and the slides left out
    (slide id → why its feature file is flagged)."""

    tables: dict[str, pd.DataFrame]
    datasets: dict[str, BagDataset]
    excluded: dict[str, str]

    @property
    def in_dim(self) -> int:
        return self.datasets["train"].feature_dim


def load_fold(settings: TrainSettings, options: RunOptions, hierarchy: Hierarchy) -> FoldData:
    """The fold's data; TrainingError when it cannot be trained (``options.strict``: also
    for a flagged feature file, which is otherwise left out with a warning)."""
    tables = load_fold_tables(options.splits, settings.fold)
    excluded: dict[str, str] = {}
    for split, table in tables.items():
        tables[split], flagged = drop_flagged_slides(table, options.features)
        for slide_id, reason in flagged.items():
            if options.strict:
                raise TrainingError(f"slide {slide_id!r}: feature file flagged ({reason})")
            log.warning("slide %r (%s) left out: flagged features (%s)", slide_id, split, reason)
        excluded |= flagged
    for split in ("train", "val"):
        if tables[split].empty:
            raise TrainingError(f"fold {settings.fold} has no usable {split!r} slides")
    check_cohort(settings, tables, hierarchy)
    train_set = BagDataset(tables["train"], options.features, hierarchy)
    datasets = {"train": train_set}
    for split in ("val", "test"):
        datasets[split] = BagDataset(
            tables[split], options.features, hierarchy, feature_dim=train_set.feature_dim
        )
    # train and val are read every epoch; test once, at the end, so it is never kept
    if use_cache(options, datasets["train"].feature_bytes + datasets["val"].feature_bytes):
        datasets["train"].keep_in_memory()
        datasets["val"].keep_in_memory()
    return FoldData(tables, datasets, excluded)


def use_cache(options: RunOptions, feature_bytes: int) -> bool:
    """Whether to keep the features read every epoch in memory: as ``--cache``/``--no-cache`` say,
    else when they fit a quarter of the available memory and no loader workers run (a
    worker's copy dies with the epoch's loader). Every epoch then reads no file."""
    if options.cache is not None:
        return options.cache
    if options.num_workers > 0:
        return False
    available = available_memory()
    cache = feature_bytes <= CACHE_MEMORY_SHARE * available
    log.info(
        "%s features in memory (%.2f GiB; %.1f GiB available)",
        "keeping" if cache else "not keeping (over a quarter of the memory)",
        feature_bytes / 2**30, available / 2**30,
    )  # fmt: skip
    return cache
