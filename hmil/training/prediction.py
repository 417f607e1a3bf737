"""What a model predicts for a split's slides: eval-mode outputs, their metrics, and
predictions.csv's rows.

Training selects its model on these outputs and writes them at the end; every split is
predicted the same way, whole bags in dataset order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from hmil.data.hierarchy import Hierarchy
from hmil.data.prefetch import read_ahead
from hmil.training.loop import autocast_context, to_device
from hmil.training.losses import HMILLoss
from hmil.training.selection_metrics import classification_metrics


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
    for batch in read_ahead(loader):
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
