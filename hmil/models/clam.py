"""CLAM-SB and CLAM-MB (Lu et al., Nature BME 2021): gated attention plus instance clustering.

For one bag X [N, D]:

    H = ReLU(W X)                    [N, 512]   instance embedding
    A = gated_attention(H)           [R, N]     R = 1 (SB) or C_f (MB); softmax over instances
    SB: z = classifier(A H)                     one bag embedding [512] → C_f logits
    MB: z[c] = w_c · (A H)[c] + b_c             one bag embedding and one scorer per class

Instance clustering (k = 8): instance classifier c (512 → 2) scores the k most and the k
least attended instances of attention row c (SB: of the one row). Given the fine label y:

    c = y: top-k → positive (1), bottom-k → negative (0)
    c ≠ y: top-k → negative (0)   (CLAM's subtyping mode: what a bag attends to is not
                                   evidence of another class; every task here is subtyping)

    instance loss = (mean CE of class y's 2k + Σ_{c≠y} mean CE of class c's k) / C_f

With the ``clam`` loss preset the total is 0.7·CE(z, y) + 0.3·instance loss. Every class
is scored in one batched product; nothing loops over instances or classes. Bags with
fewer than k instances use k = N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hmil.models.layers import GatedAttention, check_bag, init_kaiming_
from hmil.models.output import MILOutput
from hmil.models.registry import register_model

IGNORE = -100  # cross_entropy's ignore_index: bottom-k of the classes other than y


class CLAM(nn.Module):
    """CLAM: bag [N, in_dim] → MILOutput (fine logits, attention [1 or C_f, N], instance loss).

    Args:
        in_dim: feature dimension D of the bags.
        num_fine: number of fine classes C_f.
        multi_branch: False for CLAM-SB (one attention row), True for CLAM-MB (one per class).
        hidden_dim: width of the instance embedding (512, CLAM's "small" size).
        attention_dim: hidden width of the gated attention (256).
        k_sample: instances per side (top/bottom) for the clustering loss (8).
        dropout: dropout after the embedding and in the attention gates; off by default.
    """

    loss_preset = "clam"  # the trainer's default loss preset (hmil/presets/loss_presets.yaml)

    def __init__(
        self,
        in_dim: int,
        num_fine: int,
        *,
        multi_branch: bool,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        k_sample: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if k_sample < 1:
            raise ValueError(f"k_sample must be ≥ 1, got {k_sample}")
        self.in_dim = in_dim
        self.num_fine = num_fine
        self.multi_branch = multi_branch
        self.k_sample = k_sample
        self.embedding = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout)
        )
        self.attention = GatedAttention(
            hidden_dim, attention_dim, num_fine if multi_branch else 1, dropout
        )
        # SB: an ordinary linear classifier. MB: row c of the weight scores bag embedding c.
        self.classifier = nn.Linear(hidden_dim, num_fine)
        # The C_f instance classifiers (hidden → 2) as one layer: rows 2c, 2c+1 are class c's.
        self.instance_classifiers = nn.Linear(hidden_dim, 2 * num_fine)
        init_kaiming_(self)

    def forward(self, bag: torch.Tensor) -> MILOutput:
        check_bag(bag, self.in_dim)
        instances = self.embedding(bag)  # [N, hidden]
        attention = self.attention(instances)  # [R, N]
        slots = attention @ instances  # [R, hidden]
        if self.multi_branch:
            logits = (slots * self.classifier.weight).sum(dim=-1) + self.classifier.bias
        else:
            logits = self.classifier(slots).squeeze(0)
        instance_logits = self.instance_logits(instances, attention)  # [C, 2k, 2]
        return MILOutput(
            fine_logits=logits,
            fine_attention=attention,
            embeddings=F.normalize(slots, dim=-1),
            bag_embedding=slots.flatten(),
            auxiliary={"instance": lambda label: self.instance_loss(instance_logits, label)},
        )

    def instance_logits(self, instances: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """[C, 2k, 2]: classifier c on the k top then the k bottom instances of row c."""
        k = min(self.k_sample, instances.shape[0])
        top = attention.topk(k, dim=1).indices  # [R, k]
        bottom = attention.topk(k, dim=1, largest=False).indices  # [R, k]
        chosen = torch.cat([top, bottom], dim=1).expand(self.num_fine, -1)  # [C, 2k]
        weight = self.instance_classifiers.weight.view(self.num_fine, 2, -1)  # [C, 2, hidden]
        bias = self.instance_classifiers.bias.view(self.num_fine, 1, 2)
        return torch.einsum("ckh,coh->cko", instances[chosen], weight) + bias

    @staticmethod
    def instance_loss(instance_logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The clustering loss of one bag from :meth:`instance_logits` and its fine label."""
        num_classes, two_k, _ = instance_logits.shape
        k = two_k // 2
        is_label = torch.arange(num_classes, device=instance_logits.device) == label  # [C]
        top_target = is_label.long().unsqueeze(1).expand(-1, k)  # 1 for y, 0 otherwise
        bottom_target = torch.where(is_label, 0, IGNORE).unsqueeze(1).expand(-1, k)
        targets = torch.cat([top_target, bottom_target], dim=1)  # [C, 2k]
        per_instance = F.cross_entropy(
            instance_logits.reshape(-1, 2), targets.reshape(-1), reduction="none"
        ).view(num_classes, two_k)  # 0 where ignored
        counted = (targets != IGNORE).sum(dim=1)  # 2k for y, k for the others
        return (per_instance.sum(dim=1) / counted).sum() / num_classes


@register_model
def clam_sb(in_dim: int, num_fine: int, num_coarse: int, **kwargs) -> CLAM:
    """CLAM single-branch on fine labels (coarse prediction derived from the fine one)."""
    del num_coarse
    return CLAM(in_dim, num_fine, multi_branch=False, **kwargs)


@register_model
def clam_mb(in_dim: int, num_fine: int, num_coarse: int, **kwargs) -> CLAM:
    """CLAM multi-branch: one attention row and one scorer per fine class."""
    del num_coarse
    return CLAM(in_dim, num_fine, multi_branch=True, **kwargs)
