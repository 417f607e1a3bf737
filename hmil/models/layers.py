"""Building blocks shared by the MIL models."""

from __future__ import annotations

import torch
from torch import nn


class GatedAttention(nn.Module):
    """Gated attention pooling weights (Ilse et al. 2018) with one attention row per class.

    Maps instance embeddings H [N, in_dim] to A [num_rows, N], each row a softmax over the
    N instances: S = (tanh(H U) ⊙ sigmoid(H V)) W, A = softmax(Sᵀ). The score projection W
    has no bias: a constant added to a row cancels in the softmax over instances, so such
    a bias would never receive a gradient (docs/method.md, "Departures").
    """

    def __init__(self, in_dim: int, attention_dim: int, num_rows: int, dropout: float = 0.0):
        super().__init__()
        self.tanh_branch = nn.Sequential(
            nn.Linear(in_dim, attention_dim), nn.Tanh(), nn.Dropout(dropout)
        )
        self.sigmoid_branch = nn.Sequential(
            nn.Linear(in_dim, attention_dim), nn.Sigmoid(), nn.Dropout(dropout)
        )
        self.score = nn.Linear(attention_dim, num_rows, bias=False)

    def forward(self, instances: torch.Tensor) -> torch.Tensor:
        scores = self.score(self.tanh_branch(instances) * self.sigmoid_branch(instances))
        return torch.softmax(scores.transpose(0, 1), dim=1)


def init_kaiming_(module: nn.Module) -> None:
    """Kaiming-normal weights and zero biases for every Linear layer in ``module``."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def check_bag(bag: torch.Tensor, in_dim: int) -> None:
    """Raise ValueError unless ``bag`` is one non-empty bag [N, in_dim]."""
    if bag.ndim != 2 or bag.shape[1] != in_dim:
        raise ValueError(f"expected one bag of shape [N, {in_dim}], got {tuple(bag.shape)}")
    if bag.shape[0] == 0:
        raise ValueError("empty bag (N = 0)")


#: Per-slide normalisations of the features (``slide_norm``), applied by every model alike.
SLIDE_NORMS = ("none", "center", "standardize")


class SlideNorm(nn.Module):
    """The bag [N, D] without its slide-level offset, before the model sees it.

    ``center`` subtracts each feature's median over the slide's instances, ``standardize``
    also divides by its SD (floored, so a constant feature stays finite).

    Why: stain, scanner and site move every instance of a slide by one shared offset, which
    attention pooling passes on to the bag embedding (attention weights sum to 1), as large
    as the class signal. Centring removes it, but it also removes what the class adds to
    the slide's centre (the median moves with the mean when the class shifts each feature
    by less than the noise), and that is the signal uniform attention sees early in
    training: centring costs fine AUC on cohorts without an offset (benchmarks/README.md
    "Learning check"). A learned centring strength per feature (from 0) was tried: it stayed near 0
    on shifted cohorts, where centring helps, so it is not offered. The training setting
    ``auto`` picks ``center`` or ``none`` per fold from the training slides
    (:mod:`hmil.training.slide_centres`); a model is only ever built with the mode picked.
    """

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in SLIDE_NORMS:
            raise ValueError(f"unknown slide_norm {mode!r} (one of: {', '.join(SLIDE_NORMS)})")
        self.mode = mode

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return bag
        centred = bag - bag.median(dim=0, keepdim=True).values
        if self.mode == "center":
            return centred
        return centred / bag.std(dim=0, unbiased=False, keepdim=True).clamp_min(1e-3)
