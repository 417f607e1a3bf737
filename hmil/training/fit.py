"""Training one fold, step by step: its data, model and loss, the record of its settings,
resuming, the epochs with model selection and early stopping, then the final outputs."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from hmil.data.bags import BagDataset
from hmil.data.hierarchy import load_hierarchy
from hmil.training.checkpoints import (
    Checkpoint,
    discard_other_settings,
    finished_run,
    input_fingerprint,
)
from hmil.training.class_weights import fold_class_weights
from hmil.training.cohort import FoldData, load_fold
from hmil.training.config import RunOptions, TrainConfig, TrainingError, TrainSettings
from hmil.training.loop import epoch_loader, seed_everything, train_epoch
from hmil.training.losses import HMILLoss
from hmil.training.model_setup import build_model, check_model_name
from hmil.training.outputs import write_final_outputs
from hmil.training.prediction import predict
from hmil.training.schedule import (
    make_optimizer,
    make_scheduler,
    per_step_scheduler,
    step_after_epoch,
)
from hmil.training.selection import TrainingState, epoch_log_row, learning_warnings
from hmil.training.slide_centres import choose_slide_norm
from plumbing.atomic import output_errors

log = logging.getLogger("hmil.train")  # the command's logger: its log lines name it


@dataclass(frozen=True)
class Fitting:
    """What the epochs of a fold act on."""

    config: TrainConfig
    options: RunOptions
    model: nn.Module
    loss_fn: HMILLoss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    checkpoint: Checkpoint
    device: torch.device


def fit_fold(settings: TrainSettings, options: RunOptions) -> None:
    """Train one fold and write its outputs in ``options.out``. A run resumes from last.pt,
    and one whose outputs are complete with the same settings is not trained again."""
    out = options.out
    hierarchy = load_hierarchy(options.hierarchy)
    check_model_name(settings.model)
    if options.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: no CUDA device is available")
    device = torch.device(options.device)
    data = load_fold(settings, options, hierarchy)
    slide_norm = choose_slide_norm(
        settings.slide_norm, data.datasets["train"], data.tables["train"]["patient_id"].tolist()
    )
    seed_everything(settings.seed)
    built = build_model(settings, hierarchy, data.in_dim, device, slide_norm.mode)
    config = TrainConfig.of_run(
        settings, hierarchy, built.loss_config, built.loss_preset, built.mhim_preset,
        built.teacher_sha256,
    )  # fmt: skip
    if options.restart_if_changed:
        discard_other_settings(out, config)
    if finished_run(out, config):
        log.info("%s: complete outputs of this run exist; not retraining", out)
        return

    membership = hierarchy.membership_tensor()
    model = built.model
    weights = fold_class_weights(
        config.class_weights, data.datasets["train"].fine_labels, hierarchy.fine
    )
    loss_fn = HMILLoss(membership, config.epochs, built.loss_config, weights).to(device)
    optimizer = make_optimizer(config, model)
    steps_per_epoch = math.ceil(len(data.datasets["train"]) / config.batch_bags)
    scheduler = make_scheduler(config, optimizer, steps_per_epoch)
    inputs = input_fingerprint(options.splits, data.datasets)
    checkpoint = Checkpoint(out / "last.pt", config, inputs)
    state = checkpoint.resume_or_start(model, optimizer, scheduler)
    fitting = Fitting(config, options, model, loss_fn, optimizer, scheduler, checkpoint, device)
    if not run_epochs(fitting, data, membership, state):
        return  # stopped after --stop-after epochs; a rerun resumes

    model.load_state_dict(state.best_state)
    warnings = learning_warnings(state.history, state.best_epoch, data.datasets["val"].fine_labels)
    if warnings:
        log.warning("%s may not have learned: %s", out, "; ".join(warnings))
    write_final_outputs(
        out, config, model, data, hierarchy, state, warnings, options.num_workers, slide_norm
    )


def run_epochs(
    fitting: Fitting, data: FoldData, membership: torch.Tensor, state: TrainingState
) -> bool:
    """Train from ``state``'s next epoch to the last or an early stop (True), or until
    ``--stop-after`` epochs of this invocation (False), saving last.pt after each."""
    config, options = fitting.config, fitting.options
    pin = fitting.device.type == "cuda"
    val_loader = epoch_loader(
        data.datasets["val"], config.batch_bags, None, 0, options.num_workers, pin
    )
    first_epoch = state.epoch
    tensorboard = optional_summary_writer(options.out / "tensorboard")
    progress = tqdm(
        range(state.epoch, config.epochs),
        initial=state.epoch,
        total=config.epochs,
        desc=f"{config.model} fold {config.fold}",
        disable=None,
    )
    for epoch in progress:
        if state.stopped_early:
            break
        row = train_and_validate(fitting, data.datasets["train"], val_loader, membership, epoch)
        add_scalars(tensorboard, options.out / "tensorboard", row, epoch)
        state.record_epoch(
            epoch, row, fitting.model, config.patience, config.min_epochs, config.selection
        )
        fitting.checkpoint.save(fitting.model, fitting.optimizer, fitting.scheduler, state)
        progress.set_postfix(loss=f"{row['train_loss']:.3f}", val_auc=f"{row['val_fine_auc']:.3f}")
        if state.stopped_early:
            log.info("early stop after epoch %d (best epoch %d)", epoch, state.best_epoch)
            break
        if options.stop_after is not None and epoch + 1 - first_epoch >= options.stop_after:
            log.info("stopping after %d epochs as asked; rerun to resume", options.stop_after)
            return False
    progress.close()
    return True


def train_and_validate(
    fitting: Fitting,
    train_set: BagDataset,
    val_loader: DataLoader,
    membership: torch.Tensor,
    epoch: int,
) -> dict[str, float]:
    """Epoch ``epoch``: train, validate, step a per-epoch schedule; its log.csv row."""
    config, model, device = fitting.config, fitting.model, fitting.device
    started = time.perf_counter()
    train_loader = epoch_loader(
        train_set, config.batch_bags, config.seed, epoch, fitting.options.num_workers,
        device.type == "cuda", config.balanced_sampling,
    )  # fmt: skip
    train_terms = train_epoch(
        model, fitting.loss_fn, fitting.optimizer, train_loader, epoch, device,
        per_step_scheduler(config, fitting.scheduler), config.instance_dropout,
    )  # fmt: skip
    val = predict(model, val_loader, membership, device, fitting.loss_fn, epoch)
    lr = fitting.optimizer.param_groups[0]["lr"]
    step_after_epoch(config, fitting.scheduler, val.loss)
    seconds = time.perf_counter() - started
    return epoch_log_row(epoch, fitting.loss_fn, lr, train_terms, val, seconds)


def optional_summary_writer(log_dir: Path):
    """A TensorBoard SummaryWriter when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    default_hook = threading.excepthook

    def quiet_writer_errors(hook) -> None:
        # TensorBoard writes from a thread and re-raises its OSError in the next flush(),
        # where it becomes the one-line error; only the thread's own traceback is dropped.
        writer_thread = type(hook.thread).__name__ == "_AsyncWriterThread"
        if not (writer_thread and issubclass(hook.exc_type, OSError)):
            default_hook(hook)

    threading.excepthook = quiet_writer_errors
    with output_errors(log_dir):
        return SummaryWriter(log_dir=str(log_dir))


def add_scalars(tensorboard, log_dir: Path, row: dict[str, float], epoch: int) -> None:
    """An epoch's log row as TensorBoard scalars (nothing without TensorBoard)."""
    if tensorboard is None:
        return
    with output_errors(log_dir):
        for name, value in row.items():
            if name != "epoch":
                tensorboard.add_scalar(name, value, epoch)
        tensorboard.flush()
