"""The per-fold trainer's core: seeding, one epoch, prediction, outputs.

The CLI (:mod:`hmil.train`) validates arguments, then calls these functions. B bags make
one optimiser step, and :class:`~hmil.training.losses.HMILLoss` averages its terms over the B bags.
In training a random fraction of each bag's instances may be dropped (``instance_dropout``,
a regulariser for cohorts of a few hundred slides); evaluation always sees whole bags.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from hmil.data.bags import BagDataset, collate_bags
from hmil.data.hierarchy import Hierarchy
from hmil.training.losses import HMILLoss, curriculum_weight
from hmil.training.selection_metrics import classification_metrics
from plumbing.atomic import buffered
from plumbing.errors import PipelineError


class TrainingError(PipelineError):
    """Bad training input (splits table, fold, model name, features); one-line message."""


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
    # MHIM runs only: the MHIM preset and the sha256 of the --teacher checkpoint
    mhim_preset: str | None = None
    teacher_sha256: str | None = None

    def as_dict(self) -> dict[str, Any]:
        # optional fields appear only when set, so runs of other models keep their config
        optional = ("mhim_preset", "teacher_sha256")
        return {
            key: value
            for key, value in asdict(self).items()
            if not (key in optional and value is None)
        }


# ---- seeding and RNG state -------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    # The legacy global NumPy RNG on purpose: it is the one third-party code draws from.
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, for a checkpoint."""
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])  # noqa: NPY002
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def epoch_loader(
    dataset: BagDataset,
    batch_bags: int,
    seed: int | None,
    epoch: int,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """Bags in batches of ``batch_bags``; shuffled with a generator seeded by (seed, epoch)
    when ``seed`` is given, so the order of epoch e does not depend on a resume.
    ``pin_memory`` (for CUDA) lets bags travel to the GPU while it computes."""
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return DataLoader(
        dataset,
        batch_size=batch_bags,
        shuffle=seed is not None,
        generator=generator,
        collate_fn=collate_bags,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


# ---- one epoch -------------------------------------------------------------------------------


def training_precision(device: torch.device) -> str:
    """bf16 autocast on CUDA (tensor cores, fp32 range); fp32 elsewhere (CPU bf16 is slower
    than fp32 on CPUs without AMX)."""
    return "bf16" if device.type == "cuda" else "fp32"


def autocast_context(device: torch.device):
    return torch.autocast(
        device_type=device.type,
        dtype=torch.bfloat16,
        enabled=training_precision(device) == "bf16",
    )


def device_record(device: torch.device) -> dict[str, str]:
    """Where and at which precision a run computed: results differ in the last bits between
    devices, so outputs say which made them."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": str(device),
        "device_name": name,
        "precision": training_precision(device),
        "torch": torch.__version__,
    }


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Asynchronous from pinned memory; kernels queued after it on the stream wait for it."""
    return tensor.to(device, non_blocking=tensor.is_pinned())


def drop_instances(bag: torch.Tensor, fraction: float) -> torch.Tensor:
    """The bag without a random ``fraction`` of its instances (each dropped independently,
    torch's global RNG, at least one kept): a bag seen twice in training is never the same
    bag, which keeps a few hundred slides from being memorised."""
    if fraction <= 0:
        return bag
    keep = torch.rand(bag.shape[0], device=bag.device) >= fraction
    if not bool(keep.any()):
        keep[torch.randint(bag.shape[0], (1,), device=bag.device)] = True
    return bag[keep]


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, floor: float) -> float:
    """lr multiplier at optimiser step ``step``: linear warm-up from ``floor`` to 1 over
    ``warmup_steps``, then cosine from 1 down to ``floor`` at ``total_steps``; never below
    the floor, so no step of the run trains at a collapsed lr."""
    if step < warmup_steps:
        return floor + (1.0 - floor) * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_epoch(
    model: nn.Module,
    loss_fn: HMILLoss,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    epoch: int,
    device: torch.device,
    step_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    instance_dropout: float = 0.0,
) -> dict[str, float]:
    """One pass over the training bags, one optimiser step per batch.

    Returns each loss term (and ``total``) averaged over bags (batch means weighted by
    batch size). ``step_scheduler`` (a schedule in optimiser steps) is stepped after each
    step; ``instance_dropout`` drops that fraction of each bag's instances.

    A model with training schedules of its own (MHIM's EMA teacher) may define
    ``set_training_progress(p)``, called before each step with the fraction p ∈ [0, 1) of
    the whole run done, and ``after_optimizer_step()``, called after each step.
    """
    model.train()
    sums: dict[str, float] = {}
    num_bags = 0
    num_steps = len(loader)
    for step, batch in enumerate(loader):
        if hasattr(model, "set_training_progress"):
            model.set_training_progress((epoch + step / num_steps) / loss_fn.num_epochs)
        with autocast_context(device):
            outputs = [
                model(drop_instances(to_device(features, device), instance_dropout))
                for features in batch.features
            ]
            terms = loss_fn(
                outputs,
                to_device(batch.fine_labels, device),
                epoch=epoch,
                coarse_labels=to_device(batch.coarse_labels, device),
            )
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        if step_scheduler is not None:
            step_scheduler.step()
        if hasattr(model, "after_optimizer_step"):
            model.after_optimizer_step()
        size = len(batch.features)
        num_bags += size
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach()) * size
    return {name: value / num_bags for name, value in sums.items()}


@dataclass
class SlidePredictions:
    """Model outputs for the slides of one dataset, in dataset order.

    fine_probs [S, C_f]; coarse_probs [S, C_c] from the coarse head or None (flat model);
    coarse_from_fine [S, C_c]; fine_attention / coarse_attention: per slide [rows, N]
    (coarse None for flat models); loss: each term averaged over slides (or empty).
    """

    slide_ids: list[str]
    fine_labels: np.ndarray
    coarse_labels: np.ndarray
    fine_probs: np.ndarray
    coarse_probs: np.ndarray | None
    coarse_from_fine: np.ndarray
    fine_attention: list[np.ndarray]
    coarse_attention: list[np.ndarray] | None
    loss: dict[str, float]


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    membership: torch.Tensor,
    device: torch.device,
    loss_fn: HMILLoss | None = None,
    epoch: int = 0,
) -> SlidePredictions:
    """Eval-mode outputs for every bag of ``loader`` (unshuffled), plus the loss if given."""
    model.eval()
    membership = membership.to(device)
    slide_ids, fine_labels, coarse_labels = [], [], []
    fine_probs, coarse_probs, fine_attention, coarse_attention = [], [], [], []
    sums: dict[str, float] = {}
    for batch in loader:
        with autocast_context(device):
            outputs = [model(to_device(features, device)) for features in batch.features]
            if loss_fn is not None:
                terms = loss_fn(
                    outputs,
                    to_device(batch.fine_labels, device),
                    epoch=epoch,
                    coarse_labels=to_device(batch.coarse_labels, device),
                )
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * len(outputs)
        for output in outputs:
            fine_probs.append(output.fine_probs().float().cpu())
            fine_attention.append(output.fine_attention.float().cpu().numpy())
            if output.coarse_logits is not None:
                coarse_probs.append(output.coarse_probs().float().cpu())
            if output.coarse_attention is not None:
                coarse_attention.append(output.coarse_attention.float().cpu().numpy())
        slide_ids.extend(batch.slide_ids)
        fine_labels.extend(batch.fine_labels.tolist())
        coarse_labels.extend(batch.coarse_labels.tolist())
    fine = torch.stack(fine_probs)
    return SlidePredictions(
        slide_ids=slide_ids,
        fine_labels=np.asarray(fine_labels, dtype=np.int64),
        coarse_labels=np.asarray(coarse_labels, dtype=np.int64),
        fine_probs=fine.numpy(),
        coarse_probs=torch.stack(coarse_probs).numpy() if coarse_probs else None,
        coarse_from_fine=(fine @ membership.cpu()).numpy(),
        fine_attention=fine_attention,
        coarse_attention=coarse_attention or None,
        loss={name: value / len(slide_ids) for name, value in sums.items()},
    )


def split_metrics(predictions: SlidePredictions) -> dict[str, Any]:
    """Fine, coarse-head (None for flat models) and coarse-from-fine metrics of one split."""
    coarse = None
    if predictions.coarse_probs is not None:
        coarse = classification_metrics(predictions.coarse_labels, predictions.coarse_probs)
    return {
        "num_slides": len(predictions.slide_ids),
        "fine": classification_metrics(predictions.fine_labels, predictions.fine_probs),
        "coarse": coarse,
        "coarse_from_fine": classification_metrics(
            predictions.coarse_labels, predictions.coarse_from_fine
        ),
    }


def epoch_log_row(
    epoch: int,
    loss_fn: HMILLoss,
    lr: float,
    train_terms: dict[str, float],
    val: SlidePredictions,
    seconds: float,
) -> dict[str, float]:
    """One row of log.csv: schedules, every loss term (train and val), val metrics."""
    metrics = split_metrics(val)
    coarse = metrics["coarse"] or metrics["coarse_from_fine"]
    row: dict[str, float] = {
        "epoch": epoch,
        "alpha": curriculum_weight(epoch, loss_fn.num_epochs),
        "tau": loss_fn.temperature(epoch),
        "lr": lr,
    }
    row |= {f"train_{name}": value for name, value in train_terms.items() if name != "total"}
    row["train_loss"] = train_terms["total"]
    row |= {f"val_{name}": value for name, value in val.loss.items() if name != "total"}
    row["val_loss"] = val.loss["total"]
    row |= {
        "val_fine_auc": metrics["fine"]["auc"],
        "val_coarse_auc": coarse["auc"],
        "val_fine_accuracy": metrics["fine"]["accuracy"],
        "val_coarse_accuracy": coarse["accuracy"],
        "seconds": seconds,
    }
    return row


def selection_score(row: dict[str, float], use_auc: bool) -> float:
    """Higher is better: val fine macro AUC, or −val loss when val has < 2 fine classes."""
    if use_auc and not math.isnan(row["val_fine_auc"]):
        return row["val_fine_auc"]
    return -row["val_loss"]


#: A best epoch below this (or below E/4 for short runs) is an early best: the saved model
#: is the initialisation or close to it.
EARLY_BEST_EPOCHS = 5
#: Validation fine macro-AUC that a run must exceed at some epoch to have left chance (0.5);
#: the margin absorbs the noise of a validation set of 20–60 slides.
CHANCE_AUC_MARGIN = 0.05


def learning_warnings(history: list[dict[str, float]], best_epoch: int | None) -> list[str]:
    """Why a finished run's model may not have learned: its best validation epoch is one of
    the first few, or its validation fine AUC never left chance. Empty when neither."""
    warnings = []
    early = max(1, min(EARLY_BEST_EPOCHS, len(history) // 4))
    if best_epoch is not None and best_epoch < early and len(history) > early:
        warnings.append(
            f"best validation epoch is {best_epoch} of {len(history)} (the saved model is "
            f"the initialisation or close to it)"
        )
    aucs = [row["val_fine_auc"] for row in history if not math.isnan(row["val_fine_auc"])]
    if aucs and max(aucs) <= 0.5 + CHANCE_AUC_MARGIN:
        warnings.append(
            f"validation fine macro-AUC never left chance (best {max(aucs):.3f} ≤ "
            f"{0.5 + CHANCE_AUC_MARGIN:.2f})"
        )
    return warnings


# ---- outputs ---------------------------------------------------------------------------------


def predictions_table(
    split_predictions: dict[str, SlidePredictions],
    tables: dict[str, pd.DataFrame],
    hierarchy: Hierarchy,
) -> pd.DataFrame:
    """predictions.csv: one row per slide of each given split (test first, then val)."""
    frames = []
    for split, predictions in split_predictions.items():
        patient_of = dict(
            zip(tables[split]["slide_id"].astype(str), tables[split]["patient_id"], strict=True)
        )
        frame = pd.DataFrame(
            {
                "slide_id": predictions.slide_ids,
                "patient_id": [patient_of[s] for s in predictions.slide_ids],
                "split": split,
                "fine_label": [hierarchy.fine[i] for i in predictions.fine_labels],
                "coarse_label": [hierarchy.coarse[i] for i in predictions.coarse_labels],
            }
        )
        for index, name in enumerate(hierarchy.fine):
            frame[f"p_fine_{name}"] = predictions.fine_probs[:, index]
        for index, name in enumerate(hierarchy.coarse):
            frame[f"p_coarse_{name}"] = (
                predictions.coarse_probs[:, index]
                if predictions.coarse_probs is not None
                else math.nan
            )
        for index, name in enumerate(hierarchy.coarse):
            frame[f"p_coarse_from_fine_{name}"] = predictions.coarse_from_fine[:, index]
        coarse_source = (
            predictions.coarse_probs
            if predictions.coarse_probs is not None
            else predictions.coarse_from_fine
        )
        frame["pred_fine"] = [hierarchy.fine[i] for i in predictions.fine_probs.argmax(axis=1)]
        frame["pred_coarse"] = [hierarchy.coarse[i] for i in coarse_source.argmax(axis=1)]
        frame["pred_coarse_from_fine"] = [
            hierarchy.coarse[i] for i in predictions.coarse_from_fine.argmax(axis=1)
        ]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def write_attention(
    path: Path,
    slide_ids: Sequence[str],
    feature_paths: Sequence[Path],
    fine_attention: Sequence[np.ndarray],
    coarse_attention: Sequence[np.ndarray] | None,
    hierarchy: Hierarchy,
    model_name: str,
) -> None:
    """attention.h5 (a fold's or a deployed ensemble's): a group per slide with ``coords``
    (from its feature file ``feature_paths[i]``, when an h5 has them), ``fine_attention``
    [C_f or 1, N] and, for hierarchical models, ``coarse_attention`` [C_c, N]. Root
    attributes name the classes and the model (and, with slides, the fine rows' kind)."""
    with buffered(path) as buffer, h5py.File(buffer, "w") as file:
        file.attrs["fine_classes"] = list(hierarchy.fine)
        file.attrs["coarse_classes"] = list(hierarchy.coarse)
        file.attrs["model"] = model_name
        if slide_ids:
            file.attrs["fine_attention_rows"] = (
                "class" if fine_attention[0].shape[0] == hierarchy.num_fine else "single"
            )
        for index, slide_id in enumerate(slide_ids):
            group = file.create_group(slide_id)
            feature_path = Path(feature_paths[index])
            if feature_path.suffix == ".h5":
                with h5py.File(feature_path, "r") as features:
                    if "coords" in features:
                        group.create_dataset("coords", data=features["coords"][()])
            group.create_dataset("fine_attention", data=fine_attention[index])
            if coarse_attention is not None:
                group.create_dataset("coarse_attention", data=coarse_attention[index])


def write_json(path: Path, payload: dict[str, Any]) -> None:
    # NaN (an AUC of a one-class split) is written as null so the file is strict JSON.
    path.write_text(json.dumps(_nan_to_none(payload), indent=2) + "\n")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(item) for item in value]
    return value
