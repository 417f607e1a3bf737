"""HMIL's supervised contrastive term L_con (docs/method.md, "Losses").

Every class slot of every bag is an anchor ("all" anchors, Khosla et al. 2020), and the
other slots of its own bag are among its positives: the term pulls a bag's class slots
together, and towards the slots of other bags of its label. ``hmil_mb`` trains without it
by default (docs/method.md, "Variant: a scorer per class row").
"""

from __future__ import annotations

import torch


def supervised_contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    base_temperature: float = 0.1,
    divide_by_batch: bool = False,
) -> torch.Tensor:
    """L_con: supervised contrastive loss (Khosla et al. 2020), every vector an anchor ("all").

    Args:
        embeddings: [B, K, d] L2-normalised vectors, K views per bag (HMIL: the C_f
            class slots).
        labels: [B] fine label of each bag.
        temperature: τ of the similarity logits.
        base_temperature: the loss is scaled by τ / base_temperature (0.1).
        divide_by_batch: further divide by B, as the reference code does (off by default).

    For anchor i among the B·K vectors: positives P(i) are all other vectors from bags
    with the same label (other slots of the same bag included); the denominator runs over
    every other vector (positives and negatives, i.e. vectors of other-label bags).
        ℓ_i = −(τ/τ_0) · mean_{p∈P(i)} [ s_ip/τ − log Σ_{a≠i} exp(s_ia/τ) ]
    The loss is the mean of ℓ_i over anchors with |P(i)| > 0, and 0 if there are none.
    """
    batch_size, num_views, _ = embeddings.shape
    vectors = embeddings.reshape(batch_size * num_views, -1)  # bag-major: row b·K + k
    vector_labels = labels.to(embeddings.device).repeat_interleave(num_views)
    logits = vectors @ vectors.transpose(0, 1) / temperature
    is_self = torch.eye(len(vectors), dtype=torch.bool, device=vectors.device)
    log_denominator = torch.logsumexp(logits.masked_fill(is_self, float("-inf")), dim=1)
    log_prob = logits - log_denominator.unsqueeze(1)
    is_positive = (vector_labels.unsqueeze(0) == vector_labels.unsqueeze(1)) & ~is_self
    num_positives = is_positive.sum(dim=1)
    has_positive = num_positives > 0
    if not bool(has_positive.any()):
        return embeddings.sum() * 0.0  # keeps the graph; no pair to contrast
    # where() rather than a product: the diagonal of log_prob is not finite for B·K = 1.
    positive_log_prob = torch.where(is_positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    mean_log_prob_pos = positive_log_prob[has_positive] / num_positives[has_positive]
    loss = -(temperature / base_temperature) * mean_log_prob_pos.mean()
    return loss / batch_size if divide_by_batch else loss
