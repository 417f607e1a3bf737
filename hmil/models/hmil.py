"""HMIL (Jin et al., IEEE TMI 2025): dual-branch MIL with class-wise gated attention.

See docs/method.md ("Model"). For one bag X [N, D]:

    H_c = W2 ReLU(W1 X)            [N, D]     coarse instance embedding (D → 256 → D)
    H_f = W3 H_c                   [N, 256]   fine instance embedding
    A_c = gated_attention(H_c)     [C_c, N]   one attention row per coarse class
    A_f = gated_attention(H_f)     [C_f, N]   one attention row per fine class
    B_c = A_c H_c, B_f = A_f H_f              class-wise bag embeddings (class slots)
    z_c[k] = w_c · B_c[k], z_f[k] = w_f · B_f[k]   one shared linear scorer per branch
    embeddings = B_f / ‖B_f‖ (row-wise)       C_f views per bag for the contrastive loss

Cost is linear in N: attention is a softmax over instances, never an N×N product.

The method text writes the scorers with a bias (+ b_c, + b_f). One scalar added to every
class's logit cancels in every softmax the losses and predictions take, so it would get
zero gradient and stay at its zero init; it is left out so every parameter trains
(docs/method.md, "Departures").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hmil.models.layers import GatedAttention, check_bag, init_kaiming_
from hmil.models.output import MILOutput
from hmil.models.registry import register_model


class HMIL(nn.Module):
    """Hierarchical MIL: bag [N, in_dim] → MILOutput with fine and coarse logits/attention.

    Args:
        in_dim: feature dimension D of the bags.
        num_fine, num_coarse: C_f and C_c of the hierarchy.
        hidden_dim: width of the coarse embedding's hidden layer (256).
        fine_dim: width of the fine embedding and of the class-slot embeddings (256).
        coarse_attention_dim: hidden width of the coarse gated attention (256).
        fine_attention_dim: hidden width of the fine gated attention (64).
        dropout: dropout after the hidden ReLU and in the attention gates (paper: 0.25
            when enabled); 0 (off) by default.
    """

    def __init__(
        self,
        in_dim: int,
        num_fine: int,
        num_coarse: int,
        *,
        hidden_dim: int = 256,
        fine_dim: int = 256,
        coarse_attention_dim: int = 256,
        fine_attention_dim: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.coarse_embedding = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, in_dim),
        )
        self.fine_embedding = nn.Linear(in_dim, fine_dim)
        self.coarse_attention = GatedAttention(in_dim, coarse_attention_dim, num_coarse, dropout)
        self.fine_attention = GatedAttention(fine_dim, fine_attention_dim, num_fine, dropout)
        self.coarse_scorer = nn.Linear(in_dim, 1, bias=False)
        self.fine_scorer = nn.Linear(fine_dim, 1, bias=False)
        init_kaiming_(self)

    def forward(self, bag: torch.Tensor) -> MILOutput:
        check_bag(bag, self.in_dim)
        coarse_instances = self.coarse_embedding(bag)  # [N, D]
        fine_instances = self.fine_embedding(coarse_instances)  # [N, fine_dim]
        coarse_attention = self.coarse_attention(coarse_instances)  # [C_c, N]
        fine_attention = self.fine_attention(fine_instances)  # [C_f, N]
        coarse_slots = coarse_attention @ coarse_instances  # [C_c, D]
        fine_slots = fine_attention @ fine_instances  # [C_f, fine_dim]
        return MILOutput(
            fine_logits=self.fine_scorer(fine_slots).squeeze(-1),
            fine_attention=fine_attention,
            coarse_logits=self.coarse_scorer(coarse_slots).squeeze(-1),
            coarse_attention=coarse_attention,
            embeddings=F.normalize(fine_slots, dim=-1),
        )


#: The share of training over which hmil_mb's readouts move from the slots to the slots
#: less their mean (docs/method.md, "Variant: a scorer per class row").
CENTRING_RAMP = 0.5


class ClassRowScorer(nn.Module):
    """One weight vector and one bias per class row, each reading its slot less a share c of
    the mean slot: logits[k] = w[k] · (slots[k] − c · mean_j slots[j]) + b[k].

    Unlike HMIL's shared scorer, a row's bias does not cancel (it is the class's own), so
    it trains. Kaiming-normal weights (fan-in = slot width) and zero biases, as
    :func:`init_kaiming_` gives every Linear layer. c (``centring``) is a buffer, saved with
    the weights, that :meth:`HMILMB.set_training_progress` sets; 0 reads the slots as they are.
    """

    def __init__(self, num_rows: int, slot_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_rows, slot_dim))
        self.bias = nn.Parameter(torch.zeros(num_rows))
        self.register_buffer("centring", torch.zeros(()))
        nn.init.kaiming_normal_(self.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a model saved before the centring existed read its slots as they are: c = 0
        state_dict.setdefault(prefix + "centring", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        slots = slots - self.centring * slots.mean(dim=-2, keepdim=True)
        # [num_rows, 1], the shape of a shared Linear(slot_dim, 1)'s output, so that
        # HMIL.forward reads both scorers alike
        return ((slots * self.weight).sum(-1) + self.bias).unsqueeze(-1)


class HMILMB(HMIL):
    """HMIL with a scorer per class row in both branches (named as CLAM-MB names its
    one-classifier-per-class variant) whose readouts learn to see each class slot less the
    mean slot; embeddings, class-wise attention and curriculum are HMIL's, and its loss is
    HMIL's less the contrastive term (:attr:`loss_preset`).

    Why a scorer per row: HMIL's shared scorer gives one score direction for every class's
    slot, so one instance embedding must rank each class's key instances above the
    background; within the default protocol's 50 epochs it does not (true-row attention on
    key instances at chance, benchmarks/README.md "Learning check"), and HMIL trails ABMIL.
    A scorer per row lets each class's attention row and readout specialise.

    Why less the mean slot: an offset shared by every instance of a slide (stain, scanner,
    site) reaches every slot whole, since each attention row sums to 1; a shared scorer adds
    the same to every logit (it cancels in the softmax), a scorer per row a different
    amount per class, and per-row readouts fell to chance under such offsets. Read less the
    mean slot, the offset cancels. The mean is taken out over the first half of training
    (:data:`CENTRING_RAMP`): from the first epoch on, the rows would see nothing until
    their attention differs, and with 256-wide features they never started to.

    Why no contrastive term: it pulls a bag's class slots together (each slot's positives
    include the bag's other slots), which leaves less for a readout less the mean slot;
    without it hmil_mb scored +0.013 balanced accuracy over 54 paired learning-check runs.
    See docs/method.md, "Variant: a scorer per class row".
    """

    #: the trainer's default loss preset: the method's loss without L_con, which pulls a
    #: bag's class slots together (hmil/presets/loss_presets.yaml, ``hmil_mb``)
    loss_preset = "hmil_mb"

    def __init__(self, in_dim: int, num_fine: int, num_coarse: int, **kwargs) -> None:
        super().__init__(in_dim, num_fine, num_coarse, **kwargs)
        fine_dim = self.fine_embedding.out_features
        self.coarse_scorer = ClassRowScorer(num_coarse, in_dim)
        self.fine_scorer = ClassRowScorer(num_fine, fine_dim)

    def set_training_progress(self, progress: float) -> None:
        """The trainer's call before each step, with the share of training done."""
        centring = min(1.0, progress / CENTRING_RAMP)
        self.coarse_scorer.centring.fill_(centring)
        self.fine_scorer.centring.fill_(centring)


@register_model
def hmil(in_dim: int, num_fine: int, num_coarse: int, **kwargs) -> HMIL:
    """HMIL with the method's defaults (256/64 widths, no dropout)."""
    return HMIL(in_dim, num_fine, num_coarse, **kwargs)


@register_model
def hmil_mb(in_dim: int, num_fine: int, num_coarse: int, **kwargs) -> HMILMB:
    """HMIL with one scorer per class row (fine and coarse), the method's other defaults."""
    return HMILMB(in_dim, num_fine, num_coarse, **kwargs)
