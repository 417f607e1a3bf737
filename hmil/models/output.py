"""The one output every MIL model returns, and the fine → coarse probability map."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

# A model-specific loss term of one bag, given the bag's fine label (a 0-d int64 tensor).
AuxiliaryLoss = Callable[[torch.Tensor], torch.Tensor]


def coarse_probs_from_fine(fine_probs: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """Coarse probabilities [..., C_c] = fine probabilities [..., C_f] @ M [C_f, C_c].

    Each coarse class gets the summed probability of its fine classes, so any model with a
    fine head (flat baselines included) has a coarse prediction that sums to 1.
    """
    return fine_probs @ membership.to(dtype=fine_probs.dtype, device=fine_probs.device)


@dataclass(frozen=True)
class MILOutput:
    """What a MIL model returns for one bag of N instances.

    Attributes:
        fine_logits: [C_f] fine class logits.
        fine_attention: [C_f, N] class-wise attention (rows sum to 1 over the instances),
            or [1, N] for single-attention models.
        coarse_logits: [C_c] logits of a coarse head; None for flat models (use
            :meth:`coarse_probs_from_fine` for their coarse prediction).
        coarse_attention: [C_c, N] class-wise coarse attention, or None.
        embeddings: [K, d] L2-normalised bag embeddings for the contrastive loss (K = C_f
            class slots for ``hmil``, 1 for single-attention models), or None.
        bag_embedding: [d] the raw bag representation the fine classifier reads (class
            slots flattened), for MHIM's teacher–student consistency loss; or None.
        auxiliary: model-specific loss terms of this bag by name (``instance``: CLAM's
            instance clustering loss, DSMIL's max-instance loss; ``consistency``: MHIM's
            teacher–student loss), each a function of the fine label. ``HMILLoss`` weights
            them with the ``LossConfig`` weight of the same name. Empty for most models.
    """

    fine_logits: torch.Tensor
    fine_attention: torch.Tensor
    coarse_logits: torch.Tensor | None = None
    coarse_attention: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    bag_embedding: torch.Tensor | None = None
    auxiliary: Mapping[str, AuxiliaryLoss] | None = None

    def fine_probs(self) -> torch.Tensor:
        """[C_f] softmax of the fine logits."""
        return torch.softmax(self.fine_logits, dim=-1)

    def coarse_probs(self) -> torch.Tensor | None:
        """[C_c] softmax of the coarse head's logits; None when the model has no coarse head."""
        if self.coarse_logits is None:
            return None
        return torch.softmax(self.coarse_logits, dim=-1)

    def coarse_probs_from_fine(self, membership: torch.Tensor) -> torch.Tensor:
        """[C_c] coarse probabilities derived from the fine ones through M [C_f, C_c]."""
        return coarse_probs_from_fine(self.fine_probs(), membership)
