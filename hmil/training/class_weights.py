"""``class_weights: balanced``: each training bag's classification losses weighed by how rare
its fine class is among the fold's training slides.

Why: on imbalanced cohorts the rare sibling of a common class is taken for it (BRACS's N,
43 slides, called PB, 147, in the learning check), which costs balanced accuracy and F1
but hardly AUC. Unlike class-balanced sampling, every bag is still seen once per epoch.
The weights multiply each bag's term and the mean stays over the B bags of a step: a
weighted mean over Σw would cancel them in a step whose bags share one class. The same
weights reach the validation CE that selects the epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

log = logging.getLogger("hmil.train")  # the command's logger: its log lines name it


def balanced_class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> torch.Tensor:
    """float32 [num_classes]: n / (C n_c) for the C classes present in ``labels`` (their mean
    over the labels is 1; 1 for every class of a balanced set), 0 for the absent ones."""
    counts = torch.bincount(torch.as_tensor(np.asarray(labels), dtype=torch.long),
                            minlength=num_classes).double()  # fmt: skip
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = counts.sum() / (int(present.sum()) * counts[present])
    return weights.float()


def fold_class_weights(
    setting: str, fine_labels: Sequence[int] | np.ndarray, fine_classes: Sequence[str]
) -> torch.Tensor | None:
    """The weights ``setting`` gives the fold's training slides (None for ``none``), logged."""
    if setting == "none":
        return None
    weights = balanced_class_weights(fine_labels, len(fine_classes))
    named = zip(fine_classes, weights.tolist(), strict=True)
    log.info("class weights (balanced): %s", ", ".join(f"{n} {w:.2f}" for n, w in named))
    return weights
