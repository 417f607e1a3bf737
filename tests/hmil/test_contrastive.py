"""The contrastive term's ``label`` views: each bag's label slot against every other slot."""

import math

import numpy as np
import pytest
import torch

from hmil.training.contrastive import supervised_contrastive_loss
from hmil.training.losses import HMILLoss, LossConfig


def test_label_views_match_enumeration_over_three_bags_of_four_class_slots():
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((3, 4, 3))
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    labels = [2, 1, 2]
    tau = 0.7
    flat = [(b, k, vectors[b, k].tolist()) for b in range(3) for k in range(4)]

    def similarity(u, v):
        return sum(x * y for x, y in zip(u, v, strict=True)) / tau

    anchor_losses = []
    for i, (bag_i, slot_i, v_i) in enumerate(flat):
        if slot_i != labels[bag_i]:
            continue  # only label slots are anchors
        others = [j for j in range(len(flat)) if j != i]
        log_denominator = math.log(sum(math.exp(similarity(v_i, flat[j][2])) for j in others))
        positives = [
            j for j in others if flat[j][1] == labels[flat[j][0]] == labels[bag_i]
        ]  # the label slots of other bags of this label
        if not positives:
            continue  # bag 1 is alone with label 1
        mean_log_prob = sum(similarity(v_i, flat[j][2]) - log_denominator for j in positives)
        anchor_losses.append(-(tau / 0.1) * mean_log_prob / len(positives))
    assert len(anchor_losses) == 2
    expected = sum(anchor_losses) / len(anchor_losses)

    value = supervised_contrastive_loss(
        torch.tensor(vectors, dtype=torch.float64), torch.tensor(labels), tau, views="label"
    )
    assert math.isclose(float(value), expected, rel_tol=1e-9)


def test_label_views_prefer_a_bags_slots_apart_where_the_method_prefers_them_together():
    # Bags 0 and 1 have label 0 (label slot 0), bag 2 label 1 (label slot 1). Together:
    # each bag's two slots are one vector; apart: its other slot is orthogonal to it.
    e = torch.eye(4)
    together = torch.stack([e[[0, 0]], e[[0, 0]], e[[1, 1]]])
    apart = torch.stack([e[[0, 2]], e[[0, 2]], e[[3, 1]]])
    labels = torch.tensor([0, 0, 1])

    def loss(slots, views):
        return float(supervised_contrastive_loss(slots, labels, 0.5, views=views))

    assert loss(together, "all") < loss(apart, "all")
    assert loss(apart, "label") < loss(together, "label")


def test_label_views_without_a_second_bag_of_a_label_is_zero_not_nan():
    embeddings = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1).requires_grad_()
    value = supervised_contrastive_loss(embeddings, torch.tensor([0, 1]), 0.5, views="label")
    assert float(value.detach()) == 0.0
    value.backward()
    assert torch.isfinite(embeddings.grad).all()


def test_label_views_need_a_slot_per_class():
    embeddings = torch.nn.functional.normalize(torch.randn(2, 1, 4), dim=-1)  # K = 1
    with pytest.raises(ValueError, match="label 1 of a bag with 1 slots"):
        supervised_contrastive_loss(embeddings, torch.tensor([1, 1]), 0.5, views="label")


def test_unknown_views_are_refused_by_the_loss_config():
    with pytest.raises(ValueError, match="contrastive_views must be one of"):
        LossConfig(contrastive_views="bags")


def test_the_label_slot_preset_reaches_the_total_loss():
    membership = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    config = LossConfig.preset("label_slot_contrastive")
    assert config.contrastive_views == "label"
    embeddings = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    labels = torch.tensor([2, 2])
    expected = supervised_contrastive_loss(embeddings, labels, 1.0, views="label")
    outputs = [_output(embeddings[b]) for b in range(2)]
    terms = HMILLoss(membership, 4, config)(outputs, labels, epoch=0)
    assert math.isclose(float(terms["contrastive"]), float(expected), rel_tol=1e-6)


def _output(embeddings):
    from hmil.models.output import MILOutput

    return MILOutput(
        fine_logits=torch.zeros(3),
        coarse_logits=torch.zeros(2),
        fine_attention=torch.full((3, 5), 0.2),
        coarse_attention=torch.full((2, 5), 0.2),
        embeddings=embeddings,
    )
