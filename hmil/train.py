"""Train one MIL model on one fold of a DATA_SPLIT.csv and write its per-fold outputs.

    python -m hmil.train --features DIR --splits DATA_SPLIT.csv --fold K --model hmil \
        --hierarchy bracs --out models/uni/hmil/fold0 [--epochs 200] [--seed 0]

Outputs in --out, each written atomically: model.pt (best weights by validation fine
macro AUC), predictions.csv (val and test slides), metrics.json, attention.h5 (test
slides), log.csv (one row per epoch), and last.pt (the resume checkpoint, rewritten
every epoch). Rerunning the same command resumes from last.pt; a run whose outputs are
complete and were made with the same settings is not retrained. ``--stop-after N`` ends
this invocation after N epochs, leaving last.pt (for time-limited jobs and tests).

``--protocol`` picks the training settings that a flag does not give (:data:`PROTOCOLS`):
``default``, chosen on the benchmark grid (benchmarks/learning_check.py), learns on cohorts
of 100–1,000 slides; ``paper`` is the HMIL paper's code (Adam 1e-4, 64 bags per step,
ReduceLROnPlateau without a floor, no regularisation), whose lr collapses within a few
dozen epochs on such cohorts (config/README.md, "Training protocols").
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

import h5py
import pandas as pd
import torch
from tqdm import tqdm

from hmil.data.bags import BagDataset, BagError, drop_flagged_slides
from hmil.data.feature_record import cohort_feature_record
from hmil.data.fold_tables import load_fold_tables
from hmil.data.hierarchy import HierarchyError, hierarchy_as_dict, load_hierarchy
from hmil.models import create_model, list_models
from hmil.models.mhim import MHIM, TeacherError, load_teacher
from hmil.training.loop import (
    SlidePredictions,
    TrainConfig,
    TrainingError,
    device_record,
    epoch_loader,
    epoch_log_row,
    learning_warnings,
    predict,
    predictions_table,
    restore_rng_states,
    rng_states,
    seed_everything,
    selection_score,
    split_metrics,
    train_epoch,
    warmup_cosine_factor,
    write_attention,
    write_json,
)
from hmil.training.losses import TERMS, HMILLoss, LossConfig
from plumbing.atomic import atomic_outputs, buffered, output_errors
from plumbing.cli import run_cli, setup_logging
from plumbing.errors import PipelineError
from plumbing.provenance import code_version

log = logging.getLogger("hmil.train")

FINAL_OUTPUTS = ("model.pt", "predictions.csv", "metrics.json", "attention.h5", "log.csv")

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
    },
}
SCHEDULERS = ("warmup_cosine", "cosine", "plateau")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hmil.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--features", required=True, help="directory of <slide_id>.h5 files")
    parser.add_argument("--splits", required=True, help="DATA_SPLIT.csv")
    parser.add_argument("--fold", type=int, required=True, help="fold index k (column fold<k>)")
    parser.add_argument("--model", required=True, help=f"one of: {', '.join(list_models())}")
    parser.add_argument("--hierarchy", required=True, help="hierarchy YAML or preset name")
    parser.add_argument("--out", required=True, help="output directory of this fold")
    parser.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default="default",
        help="the settings of the options below that are not given (default: default)",
    )
    parser.add_argument("--epochs", type=int, help="E, also the length of HMIL's schedules")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds every random generator (recorded)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="torch device to train on"
    )
    parser.add_argument(
        "--batch-bags", type=int, help="bags per optimiser step (a number of bags, not scaled)"
    )
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--optimizer", choices=("adam", "adamw"), help="default: the protocol's")
    parser.add_argument("--weight-decay", type=float, help="adamw: decoupled; adam: L2")
    parser.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        help="warmup_cosine: per optimiser step, linear warm-up then cosine to the floor; "
        "cosine: per epoch to the floor; plateau: ÷10 after 5 epochs without a lower val "
        "fine CE, not below the floor",
    )
    parser.add_argument("--warmup-epochs", type=float, help="warmup_cosine: warm-up length")
    parser.add_argument(
        "--lr-floor", type=float, help="the lr never falls below this fraction of --lr"
    )
    parser.add_argument(
        "--patience", type=int, help="early stopping: epochs without a better val fine AUC"
    )
    parser.add_argument(
        "--min-epochs",
        help="early stopping cannot end the run before this many epochs; auto: E/2, and "
        "E/√2 for losses with schedules (HMIL's curriculum)",
    )
    parser.add_argument("--dropout", type=float, help="models' dropout (0: off)")
    parser.add_argument(
        "--instance-dropout",
        type=float,
        help="fraction of each training bag's instances dropped at random, every step",
    )
    parser.add_argument(
        "--loss-preset",
        default=None,
        help="preset of config/loss_presets.yaml (default: hmil; the model's own, e.g. clam, "
        "dsmil, or flat for models without a coarse head)",
    )
    parser.add_argument(
        "--teacher",
        default=None,
        help="mhim_* models: the model.pt of the same fold's baseline run (e.g. "
        "models/<encoder>/abmil/fold<k>/model.pt for mhim_abmil)",
    )
    parser.add_argument(
        "--mhim-preset",
        default=None,
        help="mhim_* models: preset of config/mhim_presets.yaml (default: <student>_c16)",
    )
    parser.add_argument(
        "--restart-if-changed",
        action="store_true",
        help="discard outputs and checkpoint of an earlier run in --out with other settings "
        "(default: refuse to touch them)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="fail on slides whose feature file is flagged empty/failed instead of leaving "
        "them out",
    )
    parser.add_argument(
        "--on-error",
        choices=("fail", "record"),
        default="fail",
        help="when training fails: exit 1 with one error line, or record the failure in "
        "every output (metrics.json status 'failed') and exit 0, so a cohort run goes on",
    )
    parser.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader processes reading bags"
    )
    parser.add_argument("--cache", action="store_true", help="keep features in memory")
    parser.add_argument(
        "--stop-after", type=int, default=None, help="end this invocation after N epochs"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    for name, value in PROTOCOLS[args.protocol].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("epochs", "batch_bags", "patience"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1")
    for name in ("dropout", "instance_dropout", "lr_floor"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1)")
    for name in ("weight_decay", "warmup_epochs"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 0")
    if args.min_epochs != "auto":
        try:
            args.min_epochs = int(args.min_epochs)
        except ValueError:
            parser.error(f"--min-epochs: expected a number or auto, not {args.min_epochs!r}")
        if args.min_epochs < 0:
            parser.error("--min-epochs must be ≥ 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        return train_fold(args)
    except Exception as error:
        if isinstance(error, (BagError, HierarchyError)):
            # ValueErrors of hmil (not PipelineErrors): bad input, one line.
            error = TrainingError(str(error))
        if args.on_error != "record":
            raise error  # run_cli prints a TrainingError as one line
        return record_failure(args, error)


def record_failure(args: argparse.Namespace, error: Exception) -> int:
    """Write every final output of the fold, each marked failed with the reason, so that
    a cohort run goes on: evaluation leaves the fold out, the comparison names the run,
    an MHIM student of this baseline fails naming it. Nothing looks like a trained model:
    model.pt holds no weights, predictions.csv no rows, attention.h5 no slide."""
    if isinstance(error, PipelineError):
        reason = str(error)
    else:  # a bug or a resource error (e.g. out of memory): keep the traceback in the log
        log.error("training failed", exc_info=error)
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
    out = Path(args.out)
    requested = {
        "model": args.model, "fold": args.fold, "epochs": args.epochs, "seed": args.seed,
        "batch_bags": args.batch_bags, "lr": args.lr, "optimizer": args.optimizer,
        "scheduler": args.scheduler, "patience": args.patience, "protocol": args.protocol,
        "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs,
        "lr_floor": args.lr_floor, "min_epochs": args.min_epochs, "dropout": args.dropout,
        "instance_dropout": args.instance_dropout,
    }  # fmt: skip
    failure = {"status": "failed", "reason": reason, "code_version": code_version()}
    history = out / "log.csv"
    with atomic_outputs(*(out / name for name in FINAL_OUTPUTS)) as temps:
        model_tmp, predictions_tmp, metrics_tmp, attention_tmp, log_tmp = temps
        with buffered(model_tmp) as buffer:
            torch.save({**failure, "model": args.model, "config": requested}, buffer)
        predictions_tmp.write_text("slide_id,patient_id,split,fine_label,coarse_label\n")
        write_json(metrics_tmp, {**failure, "config": requested, "seed": args.seed})
        with buffered(attention_tmp) as buffer, h5py.File(buffer, "w") as file:
            file.attrs.update({**failure, "model": args.model})
        if history.is_file():  # the epochs it got through, if any
            log_tmp.write_bytes(history.read_bytes())
        else:
            log_tmp.write_text("epoch\n")
    print(
        f"error: {reason} (recorded as a failed run in {out}; strict mode makes it fatal)",
        file=sys.stderr,
    )
    return 0


def train_fold(args: argparse.Namespace) -> int:
    out = Path(args.out)
    hierarchy = load_hierarchy(args.hierarchy)
    if args.model not in list_models():
        raise TrainingError(f"unknown model {args.model!r} (available: {', '.join(list_models())})")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    tables = load_fold_tables(args.splits, args.fold)
    excluded: dict[str, str] = {}
    for split, table in tables.items():
        tables[split], flagged = drop_flagged_slides(table, args.features)
        for slide_id, reason in flagged.items():
            if args.strict:
                raise TrainingError(f"slide {slide_id!r}: feature file flagged ({reason})")
            log.warning("slide %r (%s) left out: flagged features (%s)", slide_id, split, reason)
        excluded |= flagged
    for split in ("train", "val"):
        if tables[split].empty:
            raise TrainingError(f"fold {args.fold} has no usable {split!r} slides")
    check_cohort(args, tables)
    train_set = BagDataset(tables["train"], args.features, hierarchy, cache=args.cache)
    in_dim = train_set.feature_dim
    datasets = {"train": train_set}
    for split in ("val", "test"):
        datasets[split] = BagDataset(
            tables[split], args.features, hierarchy, cache=args.cache, feature_dim=in_dim
        )

    seed_everything(args.seed)
    model_kwargs = mhim_model_kwargs(args)
    if args.dropout > 0:  # every model takes dropout; 0 keeps each model's own default
        model_kwargs["dropout"] = args.dropout
    try:
        model = create_model(args.model, in_dim=in_dim, hierarchy=hierarchy, **model_kwargs)
    except ValueError as error:  # e.g. an unknown MHIM preset
        raise TrainingError(str(error)) from None
    model = model.to(device)
    loss_preset = args.loss_preset or default_loss_preset(model, in_dim)
    try:
        loss_config = LossConfig.preset(loss_preset)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    teacher_sha256 = None
    if isinstance(model, MHIM):
        # one source for the consistency weight: the MHIM preset's cl_alpha
        loss_config = dataclasses.replace(loss_config, consistency=model.config.cl_alpha)
        try:
            teacher_sha256 = load_teacher(
                model, args.teacher, in_dim, list(hierarchy.fine), args.fold
            )
        except TeacherError as error:
            raise TrainingError(f"--teacher {error}") from None
    min_epochs = resolve_min_epochs(args, loss_config)
    config = TrainConfig(
        model=args.model,
        fold=args.fold,
        epochs=args.epochs,
        seed=args.seed,
        batch_bags=args.batch_bags,
        lr=args.lr,
        optimizer=args.optimizer,
        scheduler=args.scheduler,
        patience=args.patience,
        loss_preset=loss_preset,
        hierarchy=hierarchy_as_dict(hierarchy),
        protocol=args.protocol,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        lr_floor=args.lr_floor,
        min_epochs=min_epochs,
        dropout=args.dropout,
        instance_dropout=args.instance_dropout,
        mhim_preset=model.preset if isinstance(model, MHIM) else None,
        teacher_sha256=teacher_sha256,
    )
    if args.restart_if_changed:
        discard_other_settings(out, config)
    if finished_run(out, config):
        log.info("%s: complete outputs of this run exist; not retraining", out)
        return 0

    membership = hierarchy.membership_tensor()
    loss_fn = HMILLoss(membership, num_epochs=args.epochs, config=loss_config).to(device)
    optimizer_class = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    # trainable parameters only: an MHIM teacher follows the student by EMA, not by gradient
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = optimizer_class(trainable, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / args.batch_bags)
    scheduler = make_scheduler(args, optimizer, steps_per_epoch)
    step_scheduler = scheduler if args.scheduler == "warmup_cosine" else None

    state: dict[str, Any] = {
        "epoch": 0,  # epochs completed
        "history": [],
        "best_score": None,
        "best_epoch": None,
        "best_state": None,
        "epochs_without_improvement": 0,
        "stopped_early": False,
    }
    last_path = out / "last.pt"
    inputs = input_fingerprint(args.splits, datasets)
    if last_path.is_file():
        resumed = resume(last_path, config, inputs, model, optimizer, scheduler)
        if resumed is None:
            log.warning("%s: the features or splits changed since; starting afresh", last_path)
            last_path.unlink()
        else:
            state = resumed
            log.info("resuming %s after epoch %d", last_path, state["epoch"] - 1)

    use_auc = True  # check_cohort refused a validation set of one fine class
    pin = device.type == "cuda"
    val_loader = epoch_loader(datasets["val"], args.batch_bags, None, 0, args.num_workers, pin)
    first_epoch = state["epoch"]
    tensorboard = optional_summary_writer(out / "tensorboard")
    progress = tqdm(
        range(state["epoch"], args.epochs),
        initial=state["epoch"],
        total=args.epochs,
        desc=f"{args.model} fold {args.fold}",
        disable=None,
    )
    for epoch in progress:
        if state["stopped_early"]:
            break
        started = time.perf_counter()
        train_loader = epoch_loader(
            train_set, args.batch_bags, args.seed, epoch, args.num_workers, pin
        )
        train_terms = train_epoch(
            model, loss_fn, optimizer, train_loader, epoch, device, step_scheduler,
            args.instance_dropout,
        )  # fmt: skip
        val = predict(model, val_loader, membership, device, loss_fn, epoch)
        lr = optimizer.param_groups[0]["lr"]
        if args.scheduler == "plateau":
            # Fine CE, not the total: HMIL's total grows by design as the contrastive weight
            # rises, which would cut the lr every few epochs whatever the model learns.
            scheduler.step(val.loss.get("fine_ce", val.loss["total"]))
        elif args.scheduler == "cosine":
            scheduler.step()
        row = epoch_log_row(epoch, loss_fn, lr, train_terms, val, time.perf_counter() - started)
        state["history"].append(row)
        if tensorboard is not None:
            with output_errors(out / "tensorboard"):
                for name, value in row.items():
                    if name != "epoch":
                        tensorboard.add_scalar(name, value, epoch)
                tensorboard.flush()
        score = selection_score(row, use_auc)
        if state["best_score"] is None or score > state["best_score"]:
            state["best_score"], state["best_epoch"] = score, epoch
            state["best_state"] = copy.deepcopy(model.state_dict())
            state["epochs_without_improvement"] = 0
        else:
            state["epochs_without_improvement"] += 1
        state["stopped_early"] = (
            state["epochs_without_improvement"] >= args.patience and epoch + 1 >= min_epochs
        )
        state["epoch"] = epoch + 1
        save_checkpoint(
            last_path, out / "log.csv", config, inputs, model, optimizer, scheduler, state
        )
        progress.set_postfix(loss=f"{row['train_loss']:.3f}", val_auc=f"{row['val_fine_auc']:.3f}")
        if state["stopped_early"]:
            log.info("early stop after epoch %d (best epoch %d)", epoch, state["best_epoch"])
            break
        if args.stop_after is not None and epoch + 1 - first_epoch >= args.stop_after:
            log.info("stopping after %d epochs as asked; rerun to resume", args.stop_after)
            return 0
    progress.close()

    model.load_state_dict(state["best_state"])
    state["excluded_slides"] = excluded
    state["learning_warnings"] = learning_warnings(state["history"], state["best_epoch"])
    if state["learning_warnings"]:
        log.warning("%s may not have learned: %s", out, "; ".join(state["learning_warnings"]))
    write_final_outputs(out, args, config, model, in_dim, hierarchy, datasets, tables, state)
    return 0


def check_cohort(args: argparse.Namespace, tables: dict[str, pd.DataFrame]) -> None:
    """One error line for a fold the settings cannot train: fewer training slides than bags
    per step, or a validation set of one fine class (no AUC to select a model by)."""
    num_train = len(tables["train"])
    if num_train < args.batch_bags:
        raise TrainingError(
            f"fold {args.fold} has {num_train} training slides, fewer than --batch-bags "
            f"{args.batch_bags} (training.batch_bags); use at most {num_train} bags per step"
        )
    val_classes = sorted(set(tables["val"]["label"].astype(str)))
    if len(val_classes) < 2:
        raise TrainingError(
            f"fold {args.fold}: the validation set has one fine class ({val_classes[0]!r}, "
            f"{len(tables['val'])} slides); model selection by validation fine macro-AUC needs "
            f"two or more (raise splits.val_fraction or add slides)"
        )


def resolve_min_epochs(args: argparse.Namespace, loss_config: LossConfig) -> int:
    """The epoch before which early stopping cannot end the run (see :data:`PROTOCOLS`)."""
    if args.min_epochs == "auto":
        scheduled = any(isinstance(getattr(loss_config, term), str) for term in TERMS) or (
            loss_config.temperature == "cosine" and loss_config.is_enabled("contrastive")
        )
        return math.ceil(args.epochs / math.sqrt(2) if scheduled else args.epochs / 2)
    if args.min_epochs > args.epochs:
        raise TrainingError(
            f"--epochs {args.epochs} is below --min-epochs {args.min_epochs}, the minimum for "
            f"early stopping (training.min_epochs); raise the epochs or lower the minimum"
        )
    return args.min_epochs


def make_scheduler(args: argparse.Namespace, optimizer, steps_per_epoch: int):
    """The lr schedule of ``--scheduler``; each keeps the lr at or above ``--lr-floor``·lr."""
    floor = args.lr_floor * args.lr
    if args.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.1, patience=5, min_lr=floor
        )
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=args.epochs, eta_min=floor
        )
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(args.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine_factor(step, total_steps, warmup_steps, args.lr_floor),
    )


def optional_summary_writer(log_dir: Path):
    """A TensorBoard SummaryWriter when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    default_hook = threading.excepthook

    def quiet_writer_errors(hook_args) -> None:
        # TensorBoard writes from a thread and re-raises its OSError in the next flush(),
        # where it becomes the one-line error; only the thread's own traceback is dropped.
        writer_thread = type(hook_args.thread).__name__ == "_AsyncWriterThread"
        if not (writer_thread and issubclass(hook_args.exc_type, OSError)):
            default_hook(hook_args)

    threading.excepthook = quiet_writer_errors
    with output_errors(log_dir):
        return SummaryWriter(log_dir=str(log_dir))


def mhim_model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Model kwargs from the MHIM options; they belong to mhim_* models only."""
    if not args.model.startswith("mhim_"):
        for option in ("teacher", "mhim_preset"):
            if getattr(args, option) is not None:
                flag = "--" + option.replace("_", "-")
                raise TrainingError(f"{flag} applies to mhim_* models only, not {args.model!r}")
        return {}
    if args.teacher is None:
        student = args.model.removeprefix("mhim_")
        raise TrainingError(
            f"--model {args.model} needs --teacher PATH: the {student!r} model.pt of the same "
            f"fold (e.g. models/<encoder>/{student}/fold{args.fold}/model.pt)"
        )
    return {"mhim": args.mhim_preset} if args.mhim_preset is not None else {}


def default_loss_preset(model: torch.nn.Module, in_dim: int) -> str:
    """hmil for models with a coarse head, else the model's own (``loss_preset``
    attribute: clam, dsmil), else flat."""
    if has_coarse_head(model, in_dim):
        return "hmil"
    return getattr(model, "loss_preset", "flat")


def has_coarse_head(model: torch.nn.Module, in_dim: int) -> bool:
    """Whether the model returns coarse logits (one eval forward of a 2-instance zero bag)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        parameter = next(model.parameters())
        output = model(torch.zeros(2, in_dim, device=parameter.device))
    model.train(was_training)
    return output.coarse_logits is not None


def finished_run(out: Path, config: TrainConfig) -> bool:
    """True when every final output exists and metrics.json records this config (a
    recorded failure is not finished: it is trained again)."""
    if not all((out / name).is_file() for name in FINAL_OUTPUTS):
        return False
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if metrics.get("status") == "failed":
        return False
    if metrics.get("config") != config.as_dict():
        raise TrainingError(
            f"{out}: holds outputs of a run with other settings; use another --out or delete them"
        )
    return True


def discard_other_settings(out: Path, config: TrainConfig) -> None:
    """Delete outputs and checkpoint of an earlier run of ``out`` made with other settings.

    The workflow reruns a fold when its settings change; it should then start afresh
    rather than stop at the mismatch that protects hand-made runs.
    """
    recorded = []
    metrics_path, last_path = out / "metrics.json", out / "last.pt"
    if metrics_path.is_file():
        try:
            recorded.append(json.loads(metrics_path.read_text()).get("config"))
        except (OSError, json.JSONDecodeError):
            recorded.append(None)
    if last_path.is_file():
        try:
            recorded.append(torch.load(last_path, map_location="cpu", weights_only=False)["config"])
        except Exception:  # unreadable or foreign: not resumable either
            recorded.append(None)
    if all(settings == config.as_dict() for settings in recorded):
        return
    log.warning("%s: outputs of a run with other settings; starting afresh", out)
    for name in (*FINAL_OUTPUTS, "last.pt"):
        (out / name).unlink(missing_ok=True)


def input_fingerprint(splits: str | Path, datasets: dict[str, BagDataset]) -> str:
    """Identity of the run's inputs: the splits file's bytes and each feature file's name,
    size and modification time. A checkpoint of other inputs (a feature file rebuilt or
    re-extracted since, as the workflow does before re-running a fold) is not resumed."""
    digest = hashlib.sha256(Path(splits).read_bytes())
    for split, dataset in sorted(datasets.items()):
        for slide_id, path in zip(dataset.slide_ids, dataset.paths, strict=True):
            status = path.stat()
            digest.update(
                f"{split}/{slide_id}/{path}/{status.st_size}/{status.st_mtime_ns}\n".encode()
            )
    return digest.hexdigest()


def resume(
    path: Path, config: TrainConfig, inputs: str, model, optimizer, scheduler
) -> dict[str, Any] | None:
    """The training state of checkpoint `path`, loaded into model, optimizer and scheduler;
    None when it was made from other inputs (then nothing is loaded)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated file cannot happen (atomic), a foreign one can
        raise TrainingError(f"{path}: cannot read checkpoint ({error})") from None
    if checkpoint.get("config") != config.as_dict():
        raise TrainingError(
            f"{path}: checkpoint of a run with other settings; delete it to start over"
        )
    if checkpoint.get("inputs") != inputs:
        return None
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    restore_rng_states(checkpoint["rng"])
    return checkpoint["state"]


def save_checkpoint(
    last_path: Path,
    log_path: Path,
    config: TrainConfig,
    inputs: str,
    model,
    optimizer,
    scheduler,
    state,
) -> None:
    with atomic_outputs(last_path, log_path) as (last_tmp, log_tmp), buffered(last_tmp) as buffer:
        torch.save(
            {
                "config": config.as_dict(),
                "inputs": inputs,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_states(),
                "state": state,
            },
            buffer,
        )
        pd.DataFrame(state["history"]).to_csv(log_tmp, index=False)


def write_final_outputs(
    out: Path, args, config: TrainConfig, model, in_dim, hierarchy, datasets, tables, state
) -> None:
    device = next(model.parameters()).device
    membership = hierarchy.membership_tensor()
    split_predictions = {}
    for split in ("test", "val"):
        if len(datasets[split]) == 0:
            continue
        loader = epoch_loader(
            datasets[split], args.batch_bags, None, 0, args.num_workers, device.type == "cuda"
        )
        split_predictions[split] = predict(model, loader, membership, device)
    version = code_version()
    features_record = cohort_feature_record(datasets["train"].paths)
    metrics = {
        split: split_metrics(predictions) for split, predictions in split_predictions.items()
    }
    metrics |= {
        "config": config.as_dict(),
        "seed": args.seed,
        "code_version": version,
        "best_epoch": state["best_epoch"],
        "epochs_trained": state["epoch"],
        "stopped_early": state["stopped_early"],
        "learning_warnings": state.get("learning_warnings", []),
        "in_dim": in_dim,
        "features": features_record,
        "excluded_slides": state.get("excluded_slides", {}),
        "runtime": device_record(device),
    }
    checkpoint = {
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "model": args.model,
        "model_kwargs": (
            {"mhim": model.preset or dataclasses.asdict(model.config)}
            if isinstance(model, MHIM)
            else {}
        ),
        "in_dim": in_dim,
        # how the training features were made: deployment refuses other features
        "features": features_record,
        "hierarchy": hierarchy_as_dict(hierarchy),
        "config": config.as_dict(),
        "code_version": version,
        "seed": args.seed,
        "best_epoch": state["best_epoch"],
    }
    with atomic_outputs(*(out / name for name in FINAL_OUTPUTS)) as temps:
        model_tmp, predictions_tmp, metrics_tmp, attention_tmp, log_tmp = temps
        with buffered(model_tmp) as buffer:
            torch.save(checkpoint, buffer)
        predictions_table(split_predictions, tables, hierarchy).to_csv(predictions_tmp, index=False)
        write_json(metrics_tmp, metrics)
        write_test_attention(
            attention_tmp, split_predictions.get("test"), datasets["test"], hierarchy, args.model
        )
        pd.DataFrame(state["history"]).to_csv(log_tmp, index=False)
    log.info("wrote %s (best epoch %s)", out, state["best_epoch"])


def write_test_attention(
    path: Path,
    predictions: SlidePredictions | None,
    dataset: BagDataset,
    hierarchy,
    model_name: str,
) -> None:
    """attention.h5 of the test slides; without test slides an empty file still marks the
    run complete."""
    if predictions is None:
        write_attention(path, [], [], [], None, hierarchy, model_name)
        return
    path_of = dict(zip(dataset.slide_ids, dataset.paths, strict=True))
    write_attention(
        path,
        predictions.slide_ids,
        [path_of[slide_id] for slide_id in predictions.slide_ids],
        predictions.fine_attention,
        predictions.coarse_attention,
        hierarchy,
        model_name,
    )


if __name__ == "__main__":
    run_cli(main)
