"""A fold's final outputs, written together once training ends: model.pt (the best weights
and how they were made), predictions.csv, metrics.json, attention.h5 and log.csv."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from torch import nn

from hmil.data.bags import BagDataset
from hmil.data.feature_record import cohort_feature_record
from hmil.data.hierarchy import Hierarchy, hierarchy_as_dict
from hmil.models.mhim import MHIM
from hmil.training.cohort import FoldData
from hmil.training.config import TrainConfig
from hmil.training.loop import device_record, epoch_loader
from hmil.training.prediction import SlidePredictions, predict, predictions_table, split_metrics
from hmil.training.selection import TrainingState
from hmil.training.slide_centres import SlideNormChoice
from plumbing.atomic import atomic_outputs, buffered
from plumbing.provenance import code_version

log = logging.getLogger("hmil.train")  # the command's logger: its log lines name it

FINAL_OUTPUTS = ("model.pt", "predictions.csv", "metrics.json", "attention.h5", "log.csv")


def write_final_outputs(
    out: Path,
    config: TrainConfig,
    model: nn.Module,
    data: FoldData,
    hierarchy: Hierarchy,
    state: TrainingState,
    learning_warnings: list[str],
    num_workers: int,
    slide_norm: SlideNormChoice,
) -> None:
    """Predict the test and val slides with the weights in ``model`` and write every final
    output of the fold, atomically together: a run has all of them or none."""
    device = next(model.parameters()).device
    split_predictions = final_predictions(model, data, hierarchy, config.batch_bags, num_workers)
    made = {  # how the weights were made: model.pt and metrics.json both say it
        "code_version": code_version(),
        "in_dim": data.in_dim,
        "features": cohort_feature_record(data.datasets["train"].paths),
    }
    metrics = {
        split: split_metrics(predictions) for split, predictions in split_predictions.items()
    }
    metrics |= {
        "config": config.as_dict(),
        "seed": config.seed,
        "code_version": made["code_version"],
        "best_epoch": state.best_epoch,
        "epochs_trained": state.epoch,
        "stopped_early": state.stopped_early,
        "learning_warnings": learning_warnings,
        "in_dim": made["in_dim"],
        "features": made["features"],
        "excluded_slides": data.excluded,
        "slide_norm": slide_norm.record(),
        "runtime": device_record(device),
    }
    with atomic_outputs(*(out / name for name in FINAL_OUTPUTS)) as temps:
        model_tmp, predictions_tmp, metrics_tmp, attention_tmp, log_tmp = temps
        with buffered(model_tmp) as buffer:
            torch.save(model_record(config, model, hierarchy, state, made), buffer)
        predictions_table(split_predictions, data.tables, hierarchy).to_csv(
            predictions_tmp, index=False
        )
        write_json(metrics_tmp, metrics)
        write_test_attention(
            attention_tmp, split_predictions.get("test"), data.datasets["test"], hierarchy, config
        )
        pd.DataFrame(state.history).to_csv(log_tmp, index=False)
    log.info("wrote %s (best epoch %s)", out, state.best_epoch)


def final_predictions(
    model: nn.Module, data: FoldData, hierarchy: Hierarchy, batch_bags: int, num_workers: int
) -> dict[str, SlidePredictions]:
    """Predictions of the test and val splits (test first), leaving out an empty split."""
    device = next(model.parameters()).device
    membership = hierarchy.membership_tensor()
    split_predictions = {}
    for split in ("test", "val"):
        if len(data.datasets[split]) == 0:
            continue
        loader = epoch_loader(
            data.datasets[split], batch_bags, None, 0, num_workers, device.type == "cuda"
        )
        split_predictions[split] = predict(model, loader, membership, device)
    return split_predictions


def model_record(
    config: TrainConfig,
    model: nn.Module,
    hierarchy: Hierarchy,
    state: TrainingState,
    made: dict[str, Any],
) -> dict[str, Any]:
    """model.pt: the weights on the CPU, and what evaluation and deployment check them by."""
    return {
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "model": config.model,
        "model_kwargs": model_kwargs(model),
        "in_dim": made["in_dim"],
        # how the training features were made: deployment refuses other features
        "features": made["features"],
        "hierarchy": hierarchy_as_dict(hierarchy),
        "config": config.as_dict(),
        "code_version": made["code_version"],
        "seed": config.seed,
        "best_epoch": state.best_epoch,
    }


def model_kwargs(model: nn.Module) -> dict[str, Any]:
    """What rebuilds the model beside its weights: the MHIM preset, the slide norm."""
    kwargs: dict[str, Any] = {}
    if isinstance(model, MHIM):
        kwargs["mhim"] = model.preset or dataclasses.asdict(model.config)
    if getattr(model, "slide_norm", "none") != "none":
        kwargs["slide_norm"] = model.slide_norm
    return kwargs


def write_test_attention(
    path: Path,
    predictions: SlidePredictions | None,
    dataset: BagDataset,
    hierarchy: Hierarchy,
    config: TrainConfig,
) -> None:
    """attention.h5 of the test slides; without test slides an empty file still marks the
    run complete."""
    if predictions is None:
        write_attention(path, [], [], [], None, hierarchy, config.model)
        return
    path_of = dict(zip(dataset.slide_ids, dataset.paths, strict=True))
    write_attention(
        path,
        predictions.slide_ids,
        [path_of[slide_id] for slide_id in predictions.slide_ids],
        predictions.fine_attention,
        predictions.coarse_attention,
        hierarchy,
        config.model,
    )


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
