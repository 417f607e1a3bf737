"""DSMIL (Li et al., CVPR 2021): dual-stream MIL with a critical instance per class.

For one bag X [N, D]:

    S = X W_i + b_i                  [N, C]   instance classifier (stream 1)
    m_c = argmax_n S[n, c]                    critical instance of class c
    Q = q(X)                         [N, 128] query projection (Linear-ReLU-Linear-Tanh)
    A = softmax_n(Q Q[m]ᵀ / √128)    [N, C]   attention of every instance to each critical one
    B = Aᵀ v(X)                      [C, D]   class-wise bag embeddings (v: identity, or
                                              Linear-ReLU with ``value_projection=True``)
    z = Conv1d(C, C, kernel D)(B)    [C]      bag classifier (stream 2)

Loss with the ``dsmil`` preset: 0.5·CE(z, y) + 0.5·CE(max_n S[n], y). The critical
instances come from one argmax per class (no sort of the bag), so a forward is linear in N.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hmil.models.layers import check_bag
from hmil.models.output import MILOutput
from hmil.models.registry import register_model


class DSMIL(nn.Module):
    """DSMIL: bag [N, in_dim] → MILOutput (bag logits, attention [C_f, N], max-instance loss).

    Args:
        in_dim: feature dimension D of the bags.
        num_fine: number of fine classes C_f.
        query_dim: width of the query projection (128).
        value_projection: pass the values through Dropout-Linear(D, D)-ReLU (DSMIL's
            ``passing_v``); off by default, as in the original, where v is the identity.
        dropout: dropout before the value projection (only with ``value_projection``).
    """

    loss_preset = "dsmil"  # the trainer's default loss preset (hmil/presets/loss_presets.yaml)

    def __init__(
        self,
        in_dim: int,
        num_fine: int,
        *,
        query_dim: int = 128,
        value_projection: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.instance_classifier = nn.Linear(in_dim, num_fine)
        self.query = nn.Sequential(
            nn.Linear(in_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh()
        )
        self.value: nn.Module = (
            nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, in_dim), nn.ReLU())
            if value_projection
            else nn.Identity()
        )
        self.bag_classifier = nn.Conv1d(num_fine, num_fine, kernel_size=in_dim)

    def critical_instances(self, instance_logits: torch.Tensor) -> torch.Tensor:
        """[C] index of the highest-scoring instance of each class."""
        return instance_logits.detach().argmax(dim=0)

    def streams(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Instance logits S [N, C], attention A [N, C] and values v(X) [N, D']."""
        instance_logits = self.instance_classifier(bag)
        queries = self.query(bag)  # [N, q]
        critical_queries = queries[self.critical_instances(instance_logits)]  # [C, q]
        scores = queries @ critical_queries.transpose(0, 1) / math.sqrt(queries.shape[1])
        return instance_logits, torch.softmax(scores, dim=0), self.value(bag)

    def forward(self, bag: torch.Tensor) -> MILOutput:
        check_bag(bag, self.in_dim)
        instance_logits, attention, values = self.streams(bag)
        slots = attention.transpose(0, 1) @ values  # [C, D']
        logits = self.bag_classifier(slots.unsqueeze(0)).view(-1)  # [C]
        max_instance_logits = instance_logits.max(dim=0).values  # [C]
        return MILOutput(
            fine_logits=logits,
            fine_attention=attention.transpose(0, 1),
            embeddings=F.normalize(slots, dim=-1),
            bag_embedding=slots.flatten(),
            auxiliary={
                "instance": lambda label: F.cross_entropy(
                    max_instance_logits.unsqueeze(0), label.view(1)
                )
            },
        )

    @torch.no_grad()
    def class_aware_scores(self, bag: torch.Tensor) -> torch.Tensor:
        """[N] MHIM-v2 instance scores: the bag classifier applied to each instance's share
        of the bag embeddings (A[n, c]·v(x_n) for every class c), max class probability."""
        _, attention, values = self.streams(bag)
        weight = self.bag_classifier.weight  # [C_out, C_in, D']
        num_classes = weight.shape[0]
        # per-instance logits: Σ_c' A[n, c'] · (W[c, c'] · v_n) + b[c]
        projected = (values @ weight.reshape(num_classes * num_classes, -1).transpose(0, 1)).view(
            -1, num_classes, num_classes
        )  # [N, C_out, C_in]
        logits = torch.einsum("nk,nck->nc", attention, projected) + self.bag_classifier.bias
        return torch.softmax(logits, dim=-1).amax(dim=-1)


@register_model
def dsmil(in_dim: int, num_fine: int, num_coarse: int, **kwargs) -> DSMIL:
    """DSMIL on fine labels (coarse prediction derived from the fine one)."""
    del num_coarse
    return DSMIL(in_dim, num_fine, **kwargs)
