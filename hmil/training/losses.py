"""HMIL's loss terms, their schedules, and their weighted sum (docs/method.md, "Losses").

Each term is a small pure function on tensors. :class:`HMILLoss` combines them with the
weights and schedules of a :class:`LossConfig`; the default is the method's total

    L = α(e)·L_ce^c + L_ce^f + L_ba + L_ia + (1 − α(e))·L_con,

and every ablation of the paper is a preset in ``hmil/presets/loss_presets.yaml``.

Decisions where the method leaves a choice (documented defaults, each behind a switch;
docs/method.md, "Departures"):
- L_ba uses the intended form NLL(log Mᵀ softmax(z_f), y_c); ``bag_alignment_form =
  "reference"`` gives the reference code's cross-entropy over the probabilities q.
- L_con is *not* divided by the batch size B (standard SupCon, so its weight does not
  change with B); ``contrastive_divide_by_batch = True`` gives the reference code's /B.
- L_con (hmil/training/contrastive.py) averages over anchors that have at least one
  positive; with no positive at all it is 0 (never NaN). With C_f ≥ 2 class slots per bag
  every anchor has a positive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hmil.models.output import MILOutput, coarse_probs_from_fine
from hmil.training.contrastive import supervised_contrastive_loss
from plumbing.presets import PresetFile, PresetSettings

#: The shipped presets (package data); users pass their own file as ``path``.
LOSS_PRESETS_PATH = resources.files("hmil.presets") / "loss_presets.yaml"

TERMS = (
    "coarse_ce", "fine_ce", "bag_alignment", "instance_alignment", "contrastive", "instance",
    "consistency",
)  # fmt: skip
# Terms a model computes itself (MILOutput.auxiliary): CLAM's instance clustering loss,
# DSMIL's max-instance loss (``instance``), MHIM's teacher–student loss (``consistency``).
AUXILIARY_TERMS = ("instance", "consistency")

# ---- schedules -------------------------------------------------------------------------------


def curriculum_weight(epoch: int, num_epochs: int) -> float:
    """α(e) = 1 − (e/E)²: 1 at the start (coarse first), falling towards 0 (then fine)."""
    _check_epochs(epoch, num_epochs)
    return 1.0 - (epoch / num_epochs) ** 2


def temperature_schedule(epoch: int, num_epochs: int, low: float = 0.1, high: float = 1.0) -> float:
    """τ(e) = low + (high − low)·(1 + cos(2πe/E))/2: high at e = 0, low at E/2, back up."""
    _check_epochs(epoch, num_epochs)
    return low + (high - low) * (1.0 + math.cos(2.0 * math.pi * epoch / num_epochs)) / 2.0


def _check_epochs(epoch: int, num_epochs: int) -> None:
    if num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive, got {num_epochs}")
    if not 0 <= epoch < num_epochs:
        # Past E the curriculum weight turns negative: fail rather than train on it.
        raise ValueError(f"epoch must be in 0..{num_epochs - 1}, got {epoch}")


WEIGHT_SCHEDULES = {
    "curriculum": curriculum_weight,
    "anti_curriculum": lambda epoch, num_epochs: 1.0 - curriculum_weight(epoch, num_epochs),
}

# ---- terms -----------------------------------------------------------------------------------


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, bag_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of logits [B, C] against class indices [B] (L_ce^c or L_ce^f), each
    bag's weighed by ``bag_weights`` [B] if given (a mean over B, not Σw: see class_weights)."""
    if bag_weights is None:
        return F.cross_entropy(logits, labels)
    return (F.cross_entropy(logits, labels, reduction="none") * bag_weights).mean()


def bag_alignment_loss(
    fine_logits: torch.Tensor,
    coarse_labels: torch.Tensor,
    membership: torch.Tensor,
    form: Literal["nll", "reference"] = "nll",
) -> torch.Tensor:
    """L_ba: the fine prediction, summed inside each coarse group, must match the coarse label.

    q = Mᵀ softmax(z_f) per bag ([B, C_c]).
    - ``"nll"`` (intended, default): mean of −log q[y_c], computed in log space
      (logsumexp of the fine log-probabilities inside the group) so it stays finite.
    - ``"reference"``: the reference code's cross-entropy applied to q itself,
      mean of −q[y_c] + log Σ_k exp q[k]. It is bounded and weaker; use it to reproduce.

    Args:
        fine_logits: [B, C_f]. coarse_labels: [B] int64. membership: M [C_f, C_c].
    """
    membership = membership.to(fine_logits.device)
    if form == "nll":
        fine_log_probs = torch.log_softmax(fine_logits, dim=-1)  # [B, C_f]
        in_group = membership.bool().unsqueeze(0)  # [1, C_f, C_c]
        masked = fine_log_probs.unsqueeze(-1).masked_fill(~in_group, float("-inf"))
        coarse_log_probs = torch.logsumexp(masked, dim=1)  # [B, C_c] = log q
        return F.nll_loss(coarse_log_probs, coarse_labels)
    if form == "reference":
        coarse_probs = coarse_probs_from_fine(torch.softmax(fine_logits, dim=-1), membership)
        return F.cross_entropy(coarse_probs, coarse_labels)
    raise ValueError(f"bag_alignment_form must be 'nll' or 'reference', got {form!r}")


def instance_alignment_loss(
    coarse_attention: Sequence[torch.Tensor],
    fine_attention: Sequence[torch.Tensor],
    membership: torch.Tensor,
) -> torch.Tensor:
    """L_ia: each instance's coarse attention should point where its grouped fine attention does.

    For bag b with A_c [C_c, N_b] and A_f [C_f, N_b], Â = Mᵀ A_f [C_c, N_b];
    loss_b = mean over instances n of 1 − cos(A_c[:, n], Â[:, n]); L_ia = mean over bags.
    Bags are concatenated along N and reduced per bag with an index sum (no Python loop
    over instances or classes).
    """
    if len(coarse_attention) != len(fine_attention) or not coarse_attention:
        raise ValueError("need one coarse and one fine attention map per bag (at least one bag)")
    num_fine, num_coarse = membership.shape
    for coarse, fine in zip(coarse_attention, fine_attention, strict=True):
        if coarse.shape[0] != num_coarse or fine.shape[0] != num_fine:
            raise ValueError(
                f"instance alignment needs attention [C_c={num_coarse}, N] and "
                f"[C_f={num_fine}, N], got {tuple(coarse.shape)} and {tuple(fine.shape)}"
            )
        if coarse.shape[1] != fine.shape[1]:
            raise ValueError(
                f"attention maps of one bag differ in N: {coarse.shape[1]} vs {fine.shape[1]}"
            )
    coarse_all = torch.cat(list(coarse_attention), dim=1)  # [C_c, ΣN]
    fine_all = torch.cat(list(fine_attention), dim=1)  # [C_f, ΣN]
    grouped_fine = membership.to(fine_all).transpose(0, 1) @ fine_all  # [C_c, ΣN]
    per_instance = 1.0 - F.cosine_similarity(coarse_all, grouped_fine, dim=0)  # [ΣN]
    bag_sizes = torch.tensor([a.shape[1] for a in coarse_attention], device=per_instance.device)
    bag_of_instance = torch.repeat_interleave(bag_sizes, output_size=len(per_instance))
    per_bag = torch.zeros(len(bag_sizes), dtype=per_instance.dtype, device=per_instance.device)
    per_bag = per_bag.index_add(0, bag_of_instance, per_instance) / bag_sizes
    return per_bag.mean()


# ---- configuration ---------------------------------------------------------------------------

Weight = float | str  # a constant, or the name of a WEIGHT_SCHEDULES entry


@dataclass(frozen=True)
class LossConfig(PresetSettings):
    """Weights and schedules of every loss term. Defaults are the method's total loss.

    A weight is a number (constant) or a schedule name: ``curriculum`` (α(e)) or
    ``anti_curriculum`` (1 − α(e)). A weight of 0 switches its term off (not computed).
    ``instance`` and ``consistency`` weight the model's own auxiliary terms (off by default).
    ``temperature`` is a number (constant τ) or ``cosine`` (:func:`temperature_schedule`).
    """

    coarse_ce: Weight = "curriculum"
    fine_ce: Weight = 1.0
    bag_alignment: Weight = 1.0
    instance_alignment: Weight = 1.0
    contrastive: Weight = "anti_curriculum"
    instance: Weight = 0.0
    consistency: Weight = 0.0
    temperature: float | str = "cosine"
    base_temperature: float = 0.1
    bag_alignment_form: Literal["nll", "reference"] = "nll"
    contrastive_divide_by_batch: bool = False

    PRESETS: ClassVar[PresetFile] = LOSS_PRESETS_PATH
    KIND: ClassVar[str] = "loss"

    def __post_init__(self) -> None:
        for term in TERMS:
            weight = getattr(self, term)
            if isinstance(weight, bool) or not isinstance(weight, int | float | str):
                raise ValueError(
                    f"loss weight {term}: expected a number or schedule, got {weight!r}"
                )
            if isinstance(weight, str) and weight not in WEIGHT_SCHEDULES:
                raise ValueError(
                    f"loss weight {term}: unknown schedule {weight!r} "
                    f"(schedules: {', '.join(WEIGHT_SCHEDULES)})"
                )
            if not isinstance(weight, str) and weight < 0:
                raise ValueError(f"loss weight {term} must be ≥ 0, got {weight}")
        if isinstance(self.temperature, str):
            if self.temperature != "cosine":
                raise ValueError(
                    f"temperature: expected a number or 'cosine', got {self.temperature!r}"
                )
        elif self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.base_temperature <= 0:
            raise ValueError(f"base_temperature must be positive, got {self.base_temperature}")
        if self.bag_alignment_form not in ("nll", "reference"):
            raise ValueError(
                f"bag_alignment_form must be 'nll' or 'reference', got {self.bag_alignment_form!r}"
            )

    def is_enabled(self, term: str) -> bool:
        """False only for a constant weight of 0: such a term is never computed."""
        weight = getattr(self, term)
        return isinstance(weight, str) or weight != 0

    def weight_at(self, term: str, epoch: int, num_epochs: int) -> float:
        """The weight of ``term`` at epoch ``epoch`` of ``num_epochs``."""
        weight = getattr(self, term)
        if isinstance(weight, str):
            return WEIGHT_SCHEDULES[weight](epoch, num_epochs)
        return float(weight)

    def temperature_at(self, epoch: int, num_epochs: int) -> float:
        """τ at epoch ``epoch`` of ``num_epochs``."""
        if self.temperature == "cosine":
            return temperature_schedule(epoch, num_epochs)
        return float(self.temperature)


def load_loss_presets(path: PresetFile = LOSS_PRESETS_PATH) -> dict[str, LossConfig]:
    """All presets of a loss-preset YAML file (``name: {field: value, ...}``), validated."""
    return LossConfig.presets(path)


# ---- the total -------------------------------------------------------------------------------


class HMILLoss(nn.Module):
    """Weighted sum of the HMIL loss terms over a batch of bags.

    Args:
        membership: M [C_f, C_c] of the hierarchy (a buffer: moves with ``.to(device)``).
        num_epochs: E, the length of the schedules.
        config: weights, schedules and switches (default: the method's total loss).

    Call with the model outputs of B bags, their fine labels [B] (and optionally coarse
    labels [B], otherwise derived through M) and the epoch e. Returns a dict with each
    enabled term, unweighted (for logging), and ``total``, the weighted sum. A term whose
    weight is 0 at this epoch is reported but left out of the total.
    """

    def __init__(
        self,
        membership: torch.Tensor,
        num_epochs: int,
        config: LossConfig | None = None,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("membership", torch.as_tensor(membership, dtype=torch.float32))
        self.class_weights = class_weights  # [C_f] or None (hmil/training/class_weights.py)
        self.num_epochs = num_epochs
        self.config = config if config is not None else LossConfig()

    def weights(self, epoch: int) -> dict[str, float]:
        """Weight of each enabled term at ``epoch``."""
        return {
            term: self.config.weight_at(term, epoch, self.num_epochs)
            for term in TERMS
            if self.config.is_enabled(term)
        }

    def temperature(self, epoch: int) -> float:
        return self.config.temperature_at(epoch, self.num_epochs)

    def forward(
        self,
        outputs: Sequence[MILOutput],
        fine_labels: torch.Tensor,
        epoch: int,
        coarse_labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if not outputs:
            raise ValueError("HMILLoss needs the outputs of at least one bag")
        fine_logits = torch.stack([o.fine_logits for o in outputs])  # [B, C_f]
        device = fine_logits.device  # follow the model, even if this module was not moved
        membership = self.membership.to(device)
        fine_labels = fine_labels.to(device)
        if coarse_labels is None:
            coarse_labels = membership.argmax(dim=1)[fine_labels]
        coarse_labels = coarse_labels.to(device)

        weights = self.class_weights
        bag_weights = None if weights is None else weights.to(device)[fine_labels]
        terms: dict[str, torch.Tensor] = {}
        if self.config.is_enabled("coarse_ce"):
            coarse_logits = torch.stack([_required(o.coarse_logits, "coarse_ce") for o in outputs])
            terms["coarse_ce"] = classification_loss(coarse_logits, coarse_labels, bag_weights)
        if self.config.is_enabled("fine_ce"):
            terms["fine_ce"] = classification_loss(fine_logits, fine_labels, bag_weights)
        if self.config.is_enabled("bag_alignment"):
            terms["bag_alignment"] = bag_alignment_loss(
                fine_logits, coarse_labels, membership, self.config.bag_alignment_form
            )
        if self.config.is_enabled("instance_alignment"):
            terms["instance_alignment"] = instance_alignment_loss(
                [_required(o.coarse_attention, "instance_alignment") for o in outputs],
                [o.fine_attention for o in outputs],
                membership,
            )
        if self.config.is_enabled("contrastive"):
            terms["contrastive"] = supervised_contrastive_loss(
                torch.stack([_required(o.embeddings, "contrastive") for o in outputs]),
                fine_labels,
                temperature=self.temperature(epoch),
                base_temperature=self.config.base_temperature,
                divide_by_batch=self.config.contrastive_divide_by_batch,
            )
        for term in AUXILIARY_TERMS:
            if self.config.is_enabled(term):
                value = auxiliary_loss(outputs, fine_labels, term)
                if value is not None:
                    terms[term] = value

        total = fine_logits.new_zeros(())
        for term, weight in self.weights(epoch).items():
            if weight != 0 and term in terms:
                total = total + weight * terms[term]
        return {**terms, "total": total}


def auxiliary_loss(
    outputs: Sequence[MILOutput], fine_labels: torch.Tensor, term: str
) -> torch.Tensor | None:
    """Mean over bags of the model-computed term ``term`` (see ``MILOutput.auxiliary``).

    None when no output carries it (e.g. MHIM's consistency term in eval mode, where there
    is no teacher pass): the term is then neither reported nor added.
    """
    carried = [term in (output.auxiliary or {}) for output in outputs]
    if not any(carried):
        return None
    if not all(carried):
        raise ValueError(f"loss term {term!r} is computed for some bags of the batch only")
    values = [
        output.auxiliary[term](label) for output, label in zip(outputs, fine_labels, strict=True)
    ]
    return torch.stack(values).mean()


def _required(value: torch.Tensor | None, term: str) -> torch.Tensor:
    if value is None:
        raise ValueError(
            f"loss term {term!r} needs a model output this model does not produce; "
            f"set its weight to 0 (e.g. the 'flat' loss preset for flat baselines)"
        )
    return value
