"""The optimiser and its learning-rate schedule; each schedule keeps the lr at or above
``lr_floor``·lr, so no step of a run trains at a collapsed lr."""

from __future__ import annotations

import math

import torch
from torch import nn

from hmil.training.config import TrainConfig


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam (weight decay as L2) or AdamW (decoupled) over the trainable parameters only:
    an MHIM teacher follows the student by EMA, not by gradient."""
    optimizer_class = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return optimizer_class(trainable, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The lr schedule of ``config.scheduler``.

    warmup_cosine is stepped after every optimiser step (:func:`per_step_scheduler`), cosine
    and plateau after every epoch (:func:`step_after_epoch`).
    """
    floor = config.lr_floor * config.lr
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.1, patience=5, min_lr=floor
        )
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.epochs, eta_min=floor
        )
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(config.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine_factor(step, total_steps, warmup_steps, config.lr_floor),
    )


def per_step_scheduler(config: TrainConfig, scheduler):
    """The scheduler when it counts optimiser steps, else None (it counts epochs)."""
    return scheduler if config.scheduler == "warmup_cosine" else None


def step_after_epoch(config: TrainConfig, scheduler, val_loss: dict[str, float]) -> None:
    """An epoch's step of the per-epoch schedules."""
    if config.scheduler == "plateau":
        # Fine CE, not the total: HMIL's total grows by design as the contrastive weight
        # rises, which would cut the lr every few epochs whatever the model learns
        # (docs/method.md, "Departures").
        scheduler.step(val_loss.get("fine_ce", val_loss["total"]))
    elif config.scheduler == "cosine":
        scheduler.step()


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, floor: float) -> float:
    """lr multiplier at optimiser step ``step``: linear warm-up from ``floor`` to 1 over
    ``warmup_steps``, then cosine from 1 down to ``floor`` at ``total_steps``; never below
    the floor, so no step of the run trains at a collapsed lr."""
    if step < warmup_steps:
        return floor + (1.0 - floor) * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
