"""A fold's slides: its split tables without the slides whose feature file is flagged, checked
against the settings, and their bags."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import pandas as pd

from hmil.data.bags import BagDataset, CacheBudget, drop_flagged_slides
from hmil.data.fold_tables import load_fold_tables
from hmil.data.hierarchy import Hierarchy
from hmil.training.config import RunOptions, TrainingError, TrainSettings, check_cohort
from hmil.training.memory import available_memory

log = logging.getLogger("hmil.train")  # the command's logger: its log lines name it

#: The share of the memory available at start that the features may fill when neither
#: ``--cache``/``--no-cache`` nor ``--cache-gib`` say (the default).
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
    feature_bytes = datasets["train"].feature_bytes + datasets["val"].feature_bytes
    limit = cache_budget(options, feature_bytes)
    if limit > 0:
        budget = CacheBudget(limit)
        datasets["train"].keep_in_memory(budget)
        datasets["val"].keep_in_memory(budget)
    return FoldData(tables, datasets, excluded)


def cache_budget(options: RunOptions, feature_bytes: int) -> float:
    """Bytes of train and val features to keep in memory after their first read (0: none):
    ``--cache-gib``, else all with ``--cache``, none with ``--no-cache`` or loader workers
    (a worker's copy dies with the epoch's loader), else up to a quarter of the available
    memory. Bags beyond the budget are read from their file every epoch, ahead of the
    model (:func:`hmil.training.loop.epoch_loader`), so a cohort of any size trains in
    bounded memory."""
    if options.cache is False or (options.num_workers > 0 and options.cache is not True):
        return 0.0
    if options.cache_gib is not None:
        limit = options.cache_gib * 2**30
    elif options.cache:
        limit = math.inf
    else:
        limit = CACHE_MEMORY_SHARE * available_memory()
    share = 1.0 if feature_bytes <= limit else limit / feature_bytes
    log.info(
        "keeping %.0f %% of the %.2f GiB of train and val features in memory "
        "(budget %s); the rest is read every epoch",
        100 * share, feature_bytes / 2**30,
        "none" if limit == math.inf else f"{limit / 2**30:.2f} GiB",
    )  # fmt: skip
    return limit
