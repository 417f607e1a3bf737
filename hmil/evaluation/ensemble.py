"""The ensemble of a run's fold models on one bag: their mean probabilities and attention.

Averaging the k cross-validation models is how STAMP and CLAM users deploy: no model saw
more data than another, so none is preferred, and the mean is steadier than any one. The
coarse probabilities derived from the fine ones are linear in them, so the mean of the
folds' derived values equals the values derived from the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class BagEnsemble:
    """Per-fold outputs [K, ...] of one bag and their means over the K fold models.

    fold_fine [K, C_f]; fold_coarse [K, C_c] or None (flat models); fine_attention
    [rows, N] and coarse_attention [C_c, N] (or None): the folds' attention averaged per
    patch, rows as the model gives them (one per class, or one).
    """

    fold_fine: np.ndarray
    fold_coarse: np.ndarray | None
    fold_coarse_from_fine: np.ndarray
    fine_attention: np.ndarray
    coarse_attention: np.ndarray | None

    @property
    def fine(self) -> np.ndarray:
        return self.fold_fine.mean(axis=0)

    @property
    def coarse(self) -> np.ndarray | None:
        return None if self.fold_coarse is None else self.fold_coarse.mean(axis=0)

    @property
    def coarse_from_fine(self) -> np.ndarray:
        return self.fold_coarse_from_fine.mean(axis=0)


@torch.no_grad()
def ensemble_bag(
    modules: list[nn.Module], features: torch.Tensor, membership: torch.Tensor
) -> BagEnsemble:
    """Eval-mode outputs of every fold model on one bag [N, D] (models on its device)."""
    outputs = [module(features) for module in modules]
    fine = torch.stack([o.fine_probs().float() for o in outputs])
    has_coarse = all(o.coarse_logits is not None for o in outputs)
    coarse = torch.stack([o.coarse_probs().float() for o in outputs]) if has_coarse else None
    fine_attention = torch.stack([o.fine_attention.float() for o in outputs]).mean(dim=0)
    coarse_attention = None
    if all(o.coarse_attention is not None for o in outputs):
        coarse_attention = torch.stack([o.coarse_attention.float() for o in outputs]).mean(dim=0)
    return BagEnsemble(
        fold_fine=fine.cpu().numpy(),
        fold_coarse=None if coarse is None else coarse.cpu().numpy(),
        fold_coarse_from_fine=(fine @ membership.to(fine.device).float()).cpu().numpy(),
        fine_attention=fine_attention.cpu().numpy(),
        coarse_attention=None if coarse_attention is None else coarse_attention.cpu().numpy(),
    )
