"""HMIL's supervised contrastive term L_con (docs/method.md, "Losses"), on the class slots.

Two choices of which slots take part (``views``):
- ``all`` (the method's): every class slot of every bag is an anchor, and the other slots
  of its own bag are among its positives, so the term pulls a bag's slots together.
- ``label``: only each bag's slot of its own label is an anchor; its positives are the
  label slots of other bags of that label, and every other slot (of its own bag too) is a
  negative. The term then pulls a bag's label slot *away* from its other slots. Why: a
  scorer per class row (``hmil_mb``) reads each slot less the mean slot, and slots pulled
  together leave it nothing to read (benchmarks/README.md, "The contrastive views").
"""

from __future__ import annotations

import torch

CONTRASTIVE_VIEWS = ("all", "label")


def supervised_contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    base_temperature: float = 0.1,
    divide_by_batch: bool = False,
    views: str = "all",
) -> torch.Tensor:
    """L_con: supervised contrastive loss (Khosla et al. 2020) over the class slots.

    Args:
        embeddings: [B, K, d] L2-normalised vectors, K views per bag (HMIL: the C_f
            class slots).
        labels: [B] fine label of each bag.
        temperature: τ of the similarity logits.
        base_temperature: the loss is scaled by τ / base_temperature (0.1).
        divide_by_batch: further divide by B, as the reference code does (off by default).
        views: ``all`` or ``label`` (module docstring); ``label`` needs K > max label.

    For anchor i: positives P(i) are the other vectors of its label (``all``: every slot of
    a bag of that label; ``label``: the label slots of such bags); the denominator runs over
    every other vector.
        ℓ_i = −(τ/τ_0) · mean_{p∈P(i)} [ s_ip/τ − log Σ_{a≠i} exp(s_ia/τ) ]
    The loss is the mean of ℓ_i over anchors with |P(i)| > 0, and 0 if there are none.
    """
    if views not in CONTRASTIVE_VIEWS:
        raise ValueError(f"contrastive views must be one of {CONTRASTIVE_VIEWS}, got {views!r}")
    batch_size, num_views, _ = embeddings.shape
    labels = labels.to(embeddings.device)
    vectors = embeddings.reshape(batch_size * num_views, -1)  # bag-major: row b·K + k
    vector_labels = labels.repeat_interleave(num_views)
    if views == "label":
        if int(labels.max()) >= num_views:
            raise ValueError(
                f"contrastive views 'label' need a slot per class: label {int(labels.max())} "
                f"of a bag with {num_views} slots"
            )
        slot = torch.arange(num_views, device=labels.device).repeat(batch_size)
        # a slot that is not its bag's label slot is a negative of every anchor: label −1
        vector_labels = torch.where(slot == vector_labels, vector_labels, -1)
    logits = vectors @ vectors.transpose(0, 1) / temperature
    is_self = torch.eye(len(vectors), dtype=torch.bool, device=vectors.device)
    log_denominator = torch.logsumexp(logits.masked_fill(is_self, float("-inf")), dim=1)
    log_prob = logits - log_denominator.unsqueeze(1)
    same_label = vector_labels.unsqueeze(0) == vector_labels.unsqueeze(1)
    is_positive = same_label & ~is_self & (vector_labels >= 0).unsqueeze(1)
    num_positives = is_positive.sum(dim=1)
    has_positive = num_positives > 0
    if not bool(has_positive.any()):
        return embeddings.sum() * 0.0  # keeps the graph; no pair to contrast
    # where() rather than a product: the diagonal of log_prob is not finite for B·K = 1.
    positive_log_prob = torch.where(is_positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    mean_log_prob_pos = positive_log_prob[has_positive] / num_positives[has_positive]
    loss = -(temperature / base_temperature) * mean_log_prob_pos.mean()
    return loss / batch_size if divide_by_batch else loss
