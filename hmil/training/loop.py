"""One training epoch and what it runs on: seeding, the per-epoch bag loader, instance
dropping, the device and its precision.

B bags make one optimiser step, and :class:`~hmil.training.losses.HMILLoss` averages its
terms over the B bags. In training a random fraction of each bag's instances may be dropped
(``instance_dropout``, a regulariser for cohorts of a few hundred slides); evaluation always
sees whole bags.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from hmil.data.bags import BagDataset, collate_bags
from hmil.data.prefetch import read_ahead
from hmil.training.losses import HMILLoss


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    # The legacy global NumPy RNG on purpose: it is the one third-party code draws from.
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def epoch_loader(
    dataset: BagDataset,
    batch_bags: int,
    seed: int | None,
    epoch: int,
    num_workers: int,
    pin_memory: bool = False,
    balanced: bool = False,
) -> DataLoader:
    """Bags in batches of ``batch_bags``; shuffled with a generator seeded by (seed, epoch)
    when ``seed`` is given, so the order of epoch e does not depend on a resume.
    ``balanced`` (training only) draws len(dataset) bags with replacement, each fine class
    with the same probability, so rare classes weigh as much in the loss as common ones.
    ``pin_memory`` (for CUDA) lets bags travel to the GPU while it computes."""
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    sampler = None
    if balanced:
        sampler = WeightedRandomSampler(
            class_balanced_weights(dataset.fine_labels), len(dataset), generator=generator
        )
    loader = DataLoader(
        dataset,
        batch_size=batch_bags,
        shuffle=seed is not None and sampler is None,
        sampler=sampler,
        generator=generator,
        collate_fn=collate_bags,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    return loader


def class_balanced_weights(labels) -> torch.Tensor:
    """float64 [B]: 1 / (bags of the bag's class), so every present class sums to 1."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    counts = torch.bincount(labels)
    return 1.0 / counts[labels].double()


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
    for step, batch in enumerate(read_ahead(loader)):
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
