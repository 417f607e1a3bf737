"""Training settings, typed and checked once.

:class:`TrainSettings` is what a run asks for (an unset option takes its ``--protocol``'s
value), :class:`RunOptions` where it reads and writes and how it runs, and
:class:`TrainConfig` the record of what decided the weights (checkpoints and metrics.json
hold it; a run resumes or is skipped only when it matches). Bad values fail at construction
with one line naming the option.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd

from hmil.data.hierarchy import Hierarchy, hierarchy_as_dict
from hmil.training.losses import TERMS, LossConfig
from hmil.training.settings import (
    PROTOCOLS,
    TrainingError,
    TrainingSettings,
    flag,
    recorded,
)

__all__ = ["PROTOCOLS", "RunOptions", "TrainConfig", "TrainSettings", "TrainingError"]


DEVICES = ("cpu", "cuda")
ON_ERROR = ("fail", "record")


@dataclass(frozen=True, kw_only=True)
class TrainSettings(TrainingSettings):
    """What a run of one fold asks for: the model and fold, the seed, the training
    settings (:class:`~hmil.training.settings.TrainingSettings`; None takes the protocol's
    value) and the loss, teacher and MHIM presets."""

    model: str
    fold: int
    seed: int = 0
    loss_preset: str | None = None
    teacher: str | None = None
    mhim_preset: str | None = None

    @classmethod
    def for_protocol(cls, protocol: str, **given: Any) -> TrainSettings:
        """Settings of ``given``, each one that is None or absent taken from the protocol."""
        return cls(protocol=protocol, **given)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Where a fold's run reads and writes and how it runs. None of it decides the weights,
    so a moved features directory or another device still resumes the same run."""

    features: Path
    splits: Path
    hierarchy: str  # a hierarchy YAML or a preset name
    out: Path
    device: str = "cpu"
    num_workers: int = 0
    cache: bool | None = None  # None: up to the budget below, when num_workers is 0
    cache_gib: float | None = None  # None: a quarter of the available memory
    strict: bool = False  # fail on flagged feature files instead of leaving their slides out
    restart_if_changed: bool = False
    on_error: str = "fail"  # or record: a failure becomes the fold's outputs
    stop_after: int | None = None  # end this invocation after N epochs

    def __post_init__(self) -> None:
        for name in ("features", "splits", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        for name, choices in (("device", DEVICES), ("on_error", ON_ERROR)):
            if getattr(self, name) not in choices:
                raise TrainingError(f"{flag(name)} must be one of: {', '.join(choices)}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainingSettings):
    """Everything that decides the trained weights (paths and devices excluded, so a
    moved features directory or another GPU still resumes the same run): the training
    settings as resolved (``min_epochs`` a count), the model, fold, seed, loss preset and
    hierarchy."""

    model: str
    fold: int
    seed: int
    loss_preset: str
    hierarchy: dict[str, Any]
    # MHIM runs only: the MHIM preset and the sha256 of the --teacher checkpoint
    mhim_preset: str | None = None
    teacher_sha256: str | None = None

    @classmethod
    def of_run(
        cls,
        settings: TrainSettings,
        hierarchy: Hierarchy,
        loss_config: LossConfig,
        loss_preset: str,
        mhim_preset: str | None = None,
        teacher_sha256: str | None = None,
    ) -> TrainConfig:
        """The record of a run of ``settings`` once its model and loss are built: the
        settings' own fields, with the loss preset, MHIM preset and minimum epochs as
        resolved."""
        taken = {
            f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)
        }
        return cls(
            **taken
            | {
                "loss_preset": loss_preset,
                "hierarchy": hierarchy_as_dict(hierarchy),
                "min_epochs": resolve_min_epochs(settings, loss_config),
                "mhim_preset": mhim_preset,
                "teacher_sha256": teacher_sha256,
            }
        )

    def as_dict(self) -> dict[str, Any]:
        """The record (metrics.json, model.pt, last.pt): optional fields only when set, so
        runs of other models keep their config, and new settings only when not at their
        default, so earlier runs keep theirs (:func:`~hmil.training.settings.recorded`)."""
        optional = ("mhim_preset", "teacher_sha256")
        values = asdict(self)
        return recorded({k: v for k, v in values.items() if not (k in optional and v is None)})


def check_cohort(
    settings: TrainSettings, tables: dict[str, pd.DataFrame], hierarchy: Hierarchy
) -> None:
    """One error line for a fold the settings cannot train: fewer training slides than bags
    per step, a validation set of one fine class (no AUC to select a model by), or
    class-balanced sampling with a fine class that has no training slide."""
    num_train = len(tables["train"])
    if num_train < settings.batch_bags:
        raise TrainingError(
            f"fold {settings.fold} has {num_train} training slides, fewer than --batch-bags "
            f"{settings.batch_bags} (training.batch_bags); use at most {num_train} bags per step"
        )
    val_classes = sorted(set(tables["val"]["label"].astype(str)))
    if len(val_classes) < 2:
        raise TrainingError(
            f"fold {settings.fold}: the validation set has one fine class ({val_classes[0]!r}, "
            f"{len(tables['val'])} slides); model selection by validation fine macro-AUC needs "
            f"two or more (raise splits.val_fraction or add slides)"
        )
    if settings.balanced_sampling:
        missing = sorted(set(hierarchy.fine) - set(tables["train"]["label"].astype(str)))
        if missing:
            raise TrainingError(
                f"fold {settings.fold}: fine class(es) {', '.join(map(repr, missing))} have no "
                f"training slide; class-balanced sampling (--balanced-sampling, "
                f"training.balanced_sampling) draws every class equally, so each needs one "
                f"(turn it off, or add slides of these classes)"
            )


def resolve_min_epochs(settings: TrainSettings, loss_config: LossConfig) -> int:
    """The epoch before which early stopping cannot end the run (see :data:`PROTOCOLS`)."""
    epochs, min_epochs = settings.epochs, settings.min_epochs
    if min_epochs == "auto":
        scheduled = any(isinstance(getattr(loss_config, term), str) for term in TERMS) or (
            loss_config.temperature == "cosine" and loss_config.is_enabled("contrastive")
        )
        return math.ceil(epochs / math.sqrt(2) if scheduled else epochs / 2)
    if min_epochs > epochs:
        raise TrainingError(
            f"--epochs {epochs} is below --min-epochs {min_epochs}, the minimum for "
            f"early stopping (training.min_epochs); raise the epochs or lower the minimum"
        )
    return min_epochs
