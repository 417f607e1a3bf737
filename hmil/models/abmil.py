"""ABMIL (Ilse et al. 2018), gated-attention variant: a flat baseline on fine labels.

For one bag X [N, D]: H = ReLU(W X) [N, 256], one gated attention row a [1, N],
bag embedding a H [1, 256], fine logits from a linear classifier. It has no coarse head;
its coarse prediction is ``coarse_probs_from_fine(softmax(fine_logits), M)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hmil.models.layers import GatedAttention, check_bag, init_kaiming_
from hmil.models.output import MILOutput
from hmil.models.registry import register_model


class ABMIL(nn.Module):
    """Gated-attention MIL: bag [N, in_dim] → MILOutput (fine logits, attention [1, N]).

    Args:
        in_dim: feature dimension D of the bags.
        num_fine: number of fine classes C_f.
        hidden_dim: width of the instance embedding (256).
        attention_dim: hidden width of the gated attention (128).
        dropout: dropout after the embedding and in the attention gates; off by default.
    """

    def __init__(
        self,
        in_dim: int,
        num_fine: int,
        *,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.embedding = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout)
        )
        self.attention = GatedAttention(hidden_dim, attention_dim, 1, dropout)
        self.classifier = nn.Linear(hidden_dim, num_fine)
        init_kaiming_(self)

    def forward(self, bag: torch.Tensor) -> MILOutput:
        check_bag(bag, self.in_dim)
        instances = self.embedding(bag)  # [N, hidden]
        attention = self.attention(instances)  # [1, N]
        bag_embedding = attention @ instances  # [1, hidden]
        return MILOutput(
            fine_logits=self.classifier(bag_embedding).squeeze(0),
            fine_attention=attention,
            embeddings=F.normalize(bag_embedding, dim=-1),
            bag_embedding=bag_embedding.squeeze(0),
        )


@register_model
def abmil(in_dim: int, num_fine: int, num_coarse: int, **kwargs) -> ABMIL:
    """ABMIL on fine labels; ``num_coarse`` is accepted for the common signature and unused."""
    del num_coarse
    return ABMIL(in_dim, num_fine, **kwargs)
