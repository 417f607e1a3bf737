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
from hmil.models.layers import SLIDE_NORMS
from hmil.training.losses import TERMS, LossConfig
from plumbing.errors import PipelineError


class TrainingError(PipelineError):
    """Bad training input (splits table, fold, model name, features); one-line message."""


#: Settings of each ``--protocol``; a flag given on the command line wins. ``min_epochs``
#: ``auto``: early stopping waits for half the run, and for a loss with schedules (HMIL's
#: α(e), τ(e)) until the fine terms outweigh the coarse CE, α(e) < 1/2, e ≥ E/√2.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "default": {
        "epochs": 50,
        "batch_bags": 8,
        "lr": 1e-3,
        "optimizer": "adamw",
        "weight_decay": 1e-4,
        "scheduler": "warmup_cosine",
        "warmup_epochs": 1.0,
        "lr_floor": 0.05,
        "patience": 15,
        "min_epochs": "auto",
        "dropout": 0.25,
        "instance_dropout": 0.25,
        "balanced_sampling": False,
        "slide_norm": "none",
    },
    "paper": {
        "epochs": 200,
        "batch_bags": 64,
        "lr": 1e-4,
        "optimizer": "adam",
        "weight_decay": 0.0,
        "scheduler": "plateau",
        "warmup_epochs": 0.0,
        "lr_floor": 0.0,
        "patience": 20,
        "min_epochs": 0,
        "dropout": 0.0,
        "instance_dropout": 0.0,
        "balanced_sampling": False,
        "slide_norm": "none",
    },
}
SCHEDULERS = ("warmup_cosine", "cosine", "plateau")
OPTIMIZERS = ("adam", "adamw")
DEVICES = ("cpu", "cuda")
ON_ERROR = ("fail", "record")
#: Settings recorded in TrainConfig only when they differ from these, so the records of
#: runs made before they existed still match.
NEW_SETTING_DEFAULTS = {"balanced_sampling": False, "slide_norm": "none"}


def parse_bool(value: bool | str) -> bool:
    """true/false (yes/no, 1/0) as the command line and YAML give them."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise ValueError(f"expected true or false, not {value!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """What a run of one fold asks for. ``min_epochs`` is a count or ``auto`` (resolved
    against the loss by :func:`resolve_min_epochs`); a number given as text (the command
    line's) is read as that number."""

    model: str
    fold: int
    seed: int = 0
    protocol: str = "default"
    epochs: int
    batch_bags: int
    lr: float
    optimizer: str
    weight_decay: float
    scheduler: str
    warmup_epochs: float
    lr_floor: float
    patience: int
    min_epochs: int | str
    dropout: float
    instance_dropout: float
    balanced_sampling: bool
    slide_norm: str
    loss_preset: str | None = None
    teacher: str | None = None
    mhim_preset: str | None = None

    @classmethod
    def for_protocol(cls, protocol: str, **given: Any) -> TrainSettings:
        """Settings of ``given``, each one that is None or absent taken from the protocol."""
        if protocol not in PROTOCOLS:
            raise TrainingError(f"unknown protocol {protocol!r} (one of: {', '.join(PROTOCOLS)})")
        for name, value in PROTOCOLS[protocol].items():
            if given.get(name) is None:
                given[name] = value
        return cls(protocol=protocol, **given)

    def __post_init__(self) -> None:
        # the order of the checks is the order their errors have always come in
        for name in ("epochs", "batch_bags", "patience"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{_flag(name)} must be ≥ 1")
        for name in ("dropout", "instance_dropout", "lr_floor"):
            if not 0 <= getattr(self, name) < 1:
                raise TrainingError(f"{_flag(name)} must be in [0, 1)")
        for name in ("weight_decay", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise TrainingError(f"{_flag(name)} must be ≥ 0")
        if self.min_epochs != "auto":
            try:
                object.__setattr__(self, "min_epochs", int(self.min_epochs))
            except ValueError:
                raise TrainingError(
                    f"--min-epochs: expected a number or auto, not {self.min_epochs!r}"
                ) from None
            if self.min_epochs < 0:
                raise TrainingError("--min-epochs must be ≥ 0")
        for name, choices in (
            ("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS), ("slide_norm", SLIDE_NORMS)
        ):  # fmt: skip
            if getattr(self, name) not in choices:
                raise TrainingError(f"{_flag(name)} must be one of: {', '.join(choices)}")
        try:
            object.__setattr__(self, "balanced_sampling", parse_bool(self.balanced_sampling))
        except ValueError as error:
            raise TrainingError(f"--balanced-sampling: {error}") from None


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
    cache: bool | None = None  # None: when the features fit in memory and num_workers is 0
    strict: bool = False  # fail on flagged feature files instead of leaving their slides out
    restart_if_changed: bool = False
    on_error: str = "fail"  # or record: a failure becomes the fold's outputs
    stop_after: int | None = None  # end this invocation after N epochs

    def __post_init__(self) -> None:
        for name in ("features", "splits", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        for name, choices in (("device", DEVICES), ("on_error", ON_ERROR)):
            if getattr(self, name) not in choices:
                raise TrainingError(f"{_flag(name)} must be one of: {', '.join(choices)}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (paths and devices excluded, so a
    moved features directory or another GPU still resumes the same run)."""

    model: str
    fold: int
    epochs: int
    seed: int
    batch_bags: int
    lr: float
    optimizer: str
    scheduler: str
    patience: int
    loss_preset: str
    hierarchy: dict[str, Any]
    protocol: str = "default"
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    lr_floor: float = 0.0
    min_epochs: int = 0  # early stopping cannot end the run before this many epochs
    dropout: float = 0.0
    instance_dropout: float = 0.0
    balanced_sampling: bool = False
    slide_norm: str = "none"
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
        # optional fields appear only when set, so runs of other models keep their config,
        # and newer settings only when not at their default, so earlier runs keep theirs
        optional = ("mhim_preset", "teacher_sha256")
        return {
            key: value
            for key, value in asdict(self).items()
            if not (key in optional and value is None)
            and not (key in NEW_SETTING_DEFAULTS and value == NEW_SETTING_DEFAULTS[key])
        }


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
