"""The k fold models of one trained run (``models/{encoder}/{model}/fold{k}/model.pt``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hmil.data.hierarchy import Hierarchy
from hmil.models import create_model
from plumbing.checkpoint_files import UnreadableCheckpoint, load_checkpoint
from plumbing.errors import PipelineError

log = logging.getLogger("hmil.evaluation")


class FoldModelError(PipelineError):
    """The run's fold models cannot be used together (none left, or they disagree)."""


@dataclass
class FoldModel:
    """One fold's trained model, in eval mode, with what its checkpoint records."""

    fold: int
    run_dir: Path
    name: str  #: registry name (hmil, abmil, mhim_abmil, ...)
    module: nn.Module
    in_dim: int
    hierarchy: Hierarchy
    features: dict[str, Any]  #: how its training features were made (feature_record)
    code_version: str | None


@dataclass(frozen=True)
class UnusableFold:
    run_dir: Path
    reason: str

    def describe(self) -> str:
        return f"{self.run_dir} ({self.reason})"


def fold_number(run_dir: Path, checkpoint: dict[str, Any]) -> int:
    recorded = (checkpoint.get("config") or {}).get("fold")
    if isinstance(recorded, int):
        return recorded
    digits = run_dir.name.removeprefix("fold")
    return int(digits) if digits.isdigit() else -1


def load_fold_model(run_dir: Path, device: torch.device) -> FoldModel | UnusableFold:
    """The model of one fold directory, or why it cannot be used (missing, failed, foreign)."""
    path = run_dir / "model.pt"
    if not path.is_file():
        return UnusableFold(run_dir, f"{path} not found")
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError):
            metrics = {}
        if metrics.get("status") == "failed":
            return UnusableFold(run_dir, f"training failed: {metrics.get('reason', '?')}")
    try:
        checkpoint = load_checkpoint(path)
    except UnreadableCheckpoint as error:  # truncated, foreign, damaged or unsafe file
        return UnusableFold(run_dir, f"{path}: cannot read checkpoint ({error})")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        reason = checkpoint.get("reason") if isinstance(checkpoint, dict) else None
        return UnusableFold(run_dir, f"{path}: no trained weights ({reason or 'not a model.pt'})")
    hierarchy = Hierarchy.from_mapping(checkpoint["hierarchy"], source=str(path))
    module = create_model(
        checkpoint["model"],
        in_dim=int(checkpoint["in_dim"]),
        hierarchy=hierarchy,
        **checkpoint.get("model_kwargs", {}),
    )
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        return UnusableFold(run_dir, f"{path}: weights do not fit {checkpoint['model']} ({first})")
    return FoldModel(
        fold=fold_number(run_dir, checkpoint),
        run_dir=run_dir,
        name=str(checkpoint["model"]),
        module=module.to(device).eval(),
        in_dim=int(checkpoint["in_dim"]),
        hierarchy=hierarchy,
        features=dict(checkpoint.get("features") or {}),
        code_version=checkpoint.get("code_version"),
    )


def load_fold_models(
    run_dirs: list[Path], device: torch.device, strict: bool
) -> tuple[list[FoldModel], list[UnusableFold]]:
    """The usable fold models (sorted by fold) and the unusable folds with their reasons.

    An unusable fold is left out with a warning (strict: an error); the models left must
    agree on model, hierarchy and feature dimension, else their average means nothing.
    """
    models: list[FoldModel] = []
    unusable: list[UnusableFold] = []
    for run_dir in run_dirs:
        loaded = load_fold_model(Path(run_dir), device)
        if isinstance(loaded, UnusableFold):
            if strict:
                raise FoldModelError(f"{loaded.describe()} (strict: every fold must be usable)")
            log.warning("fold left out of the ensemble: %s", loaded.describe())
            unusable.append(loaded)
        else:
            models.append(loaded)
    if not models:
        listed = "; ".join(u.describe() for u in unusable)
        raise FoldModelError(f"no usable fold model: {listed}")
    first = models[0]
    for other in models[1:]:
        for what, mine, theirs in (
            ("model", first.name, other.name),
            ("feature dimension", first.in_dim, other.in_dim),
            ("hierarchy", first.hierarchy, other.hierarchy),
        ):
            if mine != theirs:
                raise FoldModelError(
                    f"{other.run_dir}: {what} {theirs} differs from {mine} of {first.run_dir}; "
                    "give the folds of one encoder × model"
                )
    folds = [m.fold for m in models]
    repeated = sorted({f for f in folds if folds.count(f) > 1})
    if repeated:
        raise FoldModelError(f"fold {repeated[0]} is given more than once")
    return sorted(models, key=lambda m: m.fold), unusable
