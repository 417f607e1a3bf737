"""Loss terms against values worked out by hand on tiny examples (C_f = 4, C_c = 2).

Fine classes 0, 1 belong to coarse class 0 and fine classes 2, 3 to coarse class 1
(the `tiny_membership` fixture). The expected values are written out with `math`,
independently of the implementation.
"""

import math

import numpy as np
import pytest
import torch

from hmil.models import MILOutput
from hmil.training.class_weights import balanced_class_weights
from hmil.training.losses import (
    HMILLoss,
    LossConfig,
    bag_alignment_loss,
    classification_loss,
    curriculum_weight,
    instance_alignment_loss,
    load_loss_presets,
    supervised_contrastive_loss,
    temperature_schedule,
)

E = math.e
FINE_LOGITS = [[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 3.0]]
COARSE_LABELS = [0, 1, 0]


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [v / sum(exps) for v in exps]


def grouped(row):
    """Fine probabilities summed inside the coarse groups {0, 1} and {2, 3}."""
    p = softmax(row)
    return [p[0] + p[1], p[2] + p[3]]


# ---- cross-entropy and bag-level alignment ----------------------------------------------------


def test_classification_loss_is_mean_negative_log_softmax():
    logits = torch.tensor(FINE_LOGITS[:2])
    expected = (-math.log(E**2 / (E**2 + E**1 + 1 + E**-1)) - math.log(1 / (2 * E**0.5 + 2))) / 2
    value = classification_loss(logits, torch.tensor([0, 3]))
    assert math.isclose(float(value), expected, rel_tol=1e-6)


def test_bag_alignment_intended_form_is_nll_of_grouped_fine_probabilities(tiny_membership):
    # q = Mᵀ softmax(z_f); loss = mean −log q[y_c]
    q = [grouped(row) for row in FINE_LOGITS]
    expected = -(math.log(q[0][0]) + math.log(q[1][1]) + math.log(q[2][0])) / 3
    value = bag_alignment_loss(
        torch.tensor(FINE_LOGITS), torch.tensor(COARSE_LABELS), tiny_membership, form="nll"
    )
    assert math.isclose(float(value), expected, rel_tol=1e-6)
    # bag 0 by the numbers: p = (e², e, 1, 1/e)/Σ, q_0 = (e² + e)/(e² + e + 1 + 1/e)
    assert math.isclose(q[0][0], (E**2 + E) / (E**2 + E + 1 + 1 / E), rel_tol=1e-12)


def test_bag_alignment_reference_form_is_cross_entropy_over_the_probabilities(tiny_membership):
    # the reference code: −q[y_c] + log(exp q_0 + exp q_1)
    q = [grouped(row) for row in FINE_LOGITS]
    expected = (
        sum(
            -qb[y] + math.log(math.exp(qb[0]) + math.exp(qb[1]))
            for qb, y in zip(q, COARSE_LABELS, strict=True)
        )
        / 3
    )
    reference = bag_alignment_loss(
        torch.tensor(FINE_LOGITS), torch.tensor(COARSE_LABELS), tiny_membership, form="reference"
    )
    intended = bag_alignment_loss(
        torch.tensor(FINE_LOGITS), torch.tensor(COARSE_LABELS), tiny_membership, form="nll"
    )
    assert math.isclose(float(reference), expected, rel_tol=1e-6)
    assert abs(float(reference) - float(intended)) > 0.1


def test_bag_alignment_stays_finite_for_a_confidently_wrong_group(tiny_membership):
    # q_1 = 2e^-200 / (2 + 2e^-200) underflows in float32; the log-space form does not
    logits = torch.tensor([[0.0, 0.0, -200.0, -200.0]], requires_grad=True)
    value = bag_alignment_loss(logits, torch.tensor([1]), tiny_membership)
    assert math.isclose(float(value.detach()), 200.0, rel_tol=1e-5)
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_unknown_bag_alignment_form_is_refused(tiny_membership):
    with pytest.raises(ValueError, match="'nll' or 'reference'"):
        bag_alignment_loss(torch.zeros(1, 4), torch.tensor([0]), tiny_membership, form="ce")


# ---- instance-level alignment -----------------------------------------------------------------

# Bag 1, N = 3. Rows = classes, columns = instances.
FINE_ATTENTION_1 = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25]]
COARSE_ATTENTION_1 = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]
# Bag 2, N = 2.
FINE_ATTENTION_2 = [[0.5, 0.5], [0.0, 0.0], [0.3, 0.7], [0.2, 0.8]]
COARSE_ATTENTION_2 = [[1.0, 0.0], [0.0, 1.0]]


def test_instance_alignment_averages_one_minus_cosine_per_bag_then_over_bags(tiny_membership):
    # Bag 1: Mᵀ A_f columns are (0.8, 0.6), (0.5, 0.35), (0.7, 1.05)
    bag1_cosines = [
        (0.5 * 0.8 + 0.1 * 0.6) / (math.sqrt(0.5**2 + 0.1**2) * 1.0),
        (0.3 * 0.5 + 0.6 * 0.35) / (math.sqrt(0.3**2 + 0.6**2) * math.sqrt(0.5**2 + 0.35**2)),
        1.0,  # (0.7, 1.05) = 3.5 · (0.2, 0.3)
    ]
    # Bag 2: Mᵀ A_f columns are (0.5, 0.5), (0.5, 1.5)
    bag2_cosines = [0.5 / math.sqrt(0.5), 1.5 / math.sqrt(2.5)]
    bag1 = sum(1 - c for c in bag1_cosines) / 3
    bag2 = sum(1 - c for c in bag2_cosines) / 2
    value = instance_alignment_loss(
        [torch.tensor(COARSE_ATTENTION_1), torch.tensor(COARSE_ATTENTION_2)],
        [torch.tensor(FINE_ATTENTION_1), torch.tensor(FINE_ATTENTION_2)],
        tiny_membership,
    )
    assert math.isclose(float(value), (bag1 + bag2) / 2, rel_tol=1e-6)
    pooled_over_instances = (sum(1 - c for c in bag1_cosines + bag2_cosines)) / 5
    assert not math.isclose(float(value), pooled_over_instances, rel_tol=1e-3)


def test_instance_alignment_is_zero_when_coarse_attention_is_the_grouped_fine_one(
    tiny_membership,
):
    fine = torch.tensor(FINE_ATTENTION_1)
    coarse = torch.stack([fine[0] + fine[1], fine[2] + fine[3]]) * 0.5  # same direction
    value = instance_alignment_loss([coarse], [fine], tiny_membership)
    assert abs(float(value)) < 1e-6


def test_instance_alignment_refuses_single_row_attention(tiny_membership):
    with pytest.raises(ValueError, match=r"needs attention \[C_c=2, N\] and \[C_f=4, N\]"):
        instance_alignment_loss([torch.ones(2, 3)], [torch.ones(1, 3)], tiny_membership)


# ---- supervised contrastive loss --------------------------------------------------------------


def two_bags_of_two_slots() -> torch.Tensor:
    """Bag 0: both slots e1; bag 1: both slots e2. Shape [B=2, K=2, d=2]."""
    return torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])


def test_contrastive_positive_is_the_other_slot_of_the_same_bag_when_labels_differ():
    # Anchor e1 of bag 0: its only positive is the other slot of bag 0 (similarity 1);
    # the two e2 slots of bag 1 (label 1) are negatives (similarity 0).
    # τ = 1: ℓ = −(1/0.1)·(1/τ − log(e^{1/τ} + 2·e^0)); all four anchors are alike.
    expected = -10.0 * (1.0 - math.log(E + 2.0))
    value = supervised_contrastive_loss(two_bags_of_two_slots(), torch.tensor([0, 1]), 1.0)
    assert math.isclose(float(value), expected, rel_tol=1e-6)
    # τ = 0.5: logits double, scale τ/0.1 = 5
    expected_half = -5.0 * (2.0 - math.log(E**2 + 2.0))
    value_half = supervised_contrastive_loss(two_bags_of_two_slots(), torch.tensor([0, 1]), 0.5)
    assert math.isclose(float(value_half), expected_half, rel_tol=1e-6)


def test_contrastive_all_other_vectors_are_positives_when_labels_match():
    # Anchor e1 of bag 0: positives = other slot of bag 0 (s = 1) and both slots of
    # bag 1 (s = 0); mean log-prob = (1 + 0 + 0)/3 − log(e + 2).
    expected = -10.0 * (1.0 / 3.0 - math.log(E + 2.0))
    value = supervised_contrastive_loss(two_bags_of_two_slots(), torch.tensor([0, 0]), 1.0)
    assert math.isclose(float(value), expected, rel_tol=1e-6)


def test_contrastive_divide_by_batch_switch_divides_by_the_number_of_bags():
    plain = supervised_contrastive_loss(two_bags_of_two_slots(), torch.tensor([0, 1]), 1.0)
    divided = supervised_contrastive_loss(
        two_bags_of_two_slots(), torch.tensor([0, 1]), 1.0, divide_by_batch=True
    )
    assert math.isclose(float(divided), float(plain) / 2, rel_tol=1e-6)


def test_contrastive_matches_enumeration_over_three_bags_of_four_class_slots():
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((3, 4, 3))
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    labels = [0, 1, 0]
    tau = 0.7
    flat = [(b, vectors[b, k].tolist()) for b in range(3) for k in range(4)]

    def similarity(u, v):
        return sum(x * y for x, y in zip(u, v, strict=True)) / tau

    anchor_losses = []
    for i, (bag_i, v_i) in enumerate(flat):
        others = [j for j in range(len(flat)) if j != i]
        log_denominator = math.log(sum(math.exp(similarity(v_i, flat[j][1])) for j in others))
        positives = [j for j in others if labels[flat[j][0]] == labels[bag_i]]
        # bag 1 is alone with label 1: its positives are its own 3 other slots
        assert len(positives) == (3 if bag_i == 1 else 7)
        mean_log_prob = sum(similarity(v_i, flat[j][1]) - log_denominator for j in positives)
        anchor_losses.append(-(tau / 0.1) * mean_log_prob / len(positives))
    expected = sum(anchor_losses) / len(anchor_losses)

    value = supervised_contrastive_loss(
        torch.tensor(vectors, dtype=torch.float64), torch.tensor(labels), tau
    )
    assert math.isclose(float(value), expected, rel_tol=1e-9)


def test_contrastive_without_any_positive_is_zero_not_nan():
    embeddings = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], requires_grad=True)  # K = 1
    value = supervised_contrastive_loss(embeddings, torch.tensor([0, 1]), 0.5)
    assert float(value.detach()) == 0.0
    value.backward()
    assert torch.isfinite(embeddings.grad).all()


def test_contrastive_averages_only_over_anchors_with_positives():
    # K = 1: bags 0 and 1 share label 0, bag 2 (label 1) has no positive and is skipped.
    # Anchor 0: s(0,1) = 0, s(0,2) = 1 (τ = 1) → ℓ = −10·(0 − log(1 + e)); anchor 1 likewise
    # with s(1,0) = 0, s(1,2) = 0 → ℓ = −10·(0 − log 2).
    embeddings = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]])
    value = supervised_contrastive_loss(embeddings, torch.tensor([0, 0, 1]), 1.0)
    expected = (10 * math.log(1 + E) + 10 * math.log(2)) / 2
    assert math.isclose(float(value), expected, rel_tol=1e-6)


# ---- schedules --------------------------------------------------------------------------------


def test_temperature_schedule_falls_to_0_1_at_half_time_and_rises_again():
    assert math.isclose(temperature_schedule(0, 4), 1.0)
    assert math.isclose(temperature_schedule(2, 4), 0.1)
    assert math.isclose(temperature_schedule(3, 4), 0.55)  # cos(3π/2) = 0: 0.1 + 0.9/2
    assert math.isclose(temperature_schedule(0, 200), 1.0)
    assert math.isclose(temperature_schedule(100, 200), 0.1)
    # e = E − 1 = 199: cos(2π·199/200) = cos(π/100) = 0.99950656...
    assert math.isclose(temperature_schedule(199, 200), 0.1 + 0.45 * 1.9995065603657316)


def test_curriculum_weight_starts_at_one_and_falls_quadratically():
    assert curriculum_weight(0, 4) == 1.0
    assert curriculum_weight(2, 4) == 0.75
    assert curriculum_weight(3, 4) == 1 - 9 / 16
    assert curriculum_weight(100, 200) == 0.75
    assert math.isclose(curriculum_weight(199, 200), 0.009975)


def test_schedules_refuse_epochs_outside_the_run():
    with pytest.raises(ValueError, match=r"epoch must be in 0\.\.3, got 4"):
        curriculum_weight(4, 4)
    with pytest.raises(ValueError, match="num_epochs must be positive"):
        temperature_schedule(0, 0)


def test_balanced_class_weights_are_n_over_c_n_c_of_the_classes_present():
    weights = balanced_class_weights([0, 0, 0, 1, 2, 2], num_classes=4)
    # n = 6 slides of C = 3 present classes: 6 / (3·3), 6 / (3·1), 6 / (3·2); class 3 absent
    assert torch.allclose(weights, torch.tensor([2 / 3, 2.0, 1.0, 0.0]))
    assert math.isclose(float(weights[[0, 0, 0, 1, 2, 2]].mean()), 1.0, rel_tol=1e-6)
    assert torch.equal(balanced_class_weights([2, 0, 1, 1, 0, 2], 3), torch.ones(3))


def test_weighted_classification_loss_weighs_each_bag_and_averages_over_the_bags():
    logits, labels = torch.tensor(FINE_LOGITS), torch.tensor([0, 3, 3])
    per_bag = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    weights = torch.tensor([2.0, 0.5, 0.5])
    value = classification_loss(logits, labels, weights)
    assert math.isclose(float(value), float((per_bag * weights).sum() / 3), rel_tol=1e-6)
    assert torch.equal(classification_loss(logits, labels, torch.ones(3)),
                       classification_loss(logits, labels))  # fmt: skip
    # a step whose bags share one class keeps that class's weight (no division by Σw)
    same = torch.tensor([3, 3, 3])
    assert math.isclose(float(classification_loss(logits, same, torch.full((3,), 2.0))),
                        2 * float(classification_loss(logits, same)), rel_tol=1e-6)  # fmt: skip


def test_class_weights_reach_both_classification_terms_and_nothing_else(tiny_membership):
    outputs, fine_labels = tiny_outputs()  # fine labels 1 and 3
    plain = HMILLoss(tiny_membership, num_epochs=4)(outputs, fine_labels, epoch=2)
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0])
    weighted = HMILLoss(tiny_membership, num_epochs=4, class_weights=weights)(
        outputs, fine_labels, epoch=2
    )
    for term in ("fine_ce", "coarse_ce"):
        logits = torch.stack([o.fine_logits if term == "fine_ce" else o.coarse_logits
                              for o in outputs])  # fmt: skip
        labels = fine_labels if term == "fine_ce" else torch.tensor([0, 1])
        per_bag = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        expected = float((per_bag * torch.tensor([3.0, 1.0])).mean())
        assert math.isclose(float(weighted[term]), expected, rel_tol=1e-6)
        assert not math.isclose(float(weighted[term]), float(plain[term]), rel_tol=1e-3)
    for term in ("bag_alignment", "instance_alignment", "contrastive"):
        assert torch.equal(weighted[term], plain[term])


# ---- the total and its configuration ----------------------------------------------------------


def tiny_outputs() -> tuple[list[MILOutput], torch.Tensor]:
    """Two hand-made bag outputs (C_f = 4, C_c = 2) and their fine labels."""
    slots = torch.tensor(np.random.default_rng(3).standard_normal((2, 4, 5)), dtype=torch.float32)
    slots = torch.nn.functional.normalize(slots, dim=-1)
    outputs = [
        MILOutput(
            fine_logits=torch.tensor(FINE_LOGITS[0]),
            fine_attention=torch.tensor(FINE_ATTENTION_1),
            coarse_logits=torch.tensor([0.3, -0.2]),
            coarse_attention=torch.tensor(COARSE_ATTENTION_1),
            embeddings=slots[0],
        ),
        MILOutput(
            fine_logits=torch.tensor(FINE_LOGITS[1]),
            fine_attention=torch.tensor(FINE_ATTENTION_2),
            coarse_logits=torch.tensor([1.0, 2.0]),
            coarse_attention=torch.tensor(COARSE_ATTENTION_2),
            embeddings=slots[1],
        ),
    ]
    return outputs, torch.tensor([1, 3])  # coarse labels 0, 1


def test_total_is_alpha_coarse_plus_fine_plus_alignments_plus_one_minus_alpha_contrastive(
    tiny_membership,
):
    outputs, fine_labels = tiny_outputs()
    terms = HMILLoss(tiny_membership, num_epochs=4)(outputs, fine_labels, epoch=2)
    assert set(terms) == {
        "coarse_ce",
        "fine_ce",
        "bag_alignment",
        "instance_alignment",
        "contrastive",
        "total",
    }
    # coarse CE by hand: bag 0 label 0 with logits (0.3, −0.2), bag 1 label 1 with (1, 2)
    coarse_ce = (
        -math.log(math.exp(0.3) / (math.exp(0.3) + math.exp(-0.2)))
        - math.log(math.exp(2) / (math.exp(1) + math.exp(2)))
    ) / 2
    assert math.isclose(float(terms["coarse_ce"]), coarse_ce, rel_tol=1e-6)
    q0, q1 = grouped(FINE_LOGITS[0]), grouped(FINE_LOGITS[1])
    assert math.isclose(
        float(terms["bag_alignment"]), -(math.log(q0[0]) + math.log(q1[1])) / 2, rel_tol=1e-6
    )
    alpha = 0.75  # α(2) with E = 4
    expected_total = (
        alpha * terms["coarse_ce"]
        + terms["fine_ce"]
        + terms["bag_alignment"]
        + terms["instance_alignment"]
        + (1 - alpha) * terms["contrastive"]
    )
    assert math.isclose(float(terms["total"]), float(expected_total), rel_tol=1e-6)
    # τ(2) = 0.1 for E = 4: the contrastive term uses it
    assert math.isclose(
        float(terms["contrastive"]),
        float(
            supervised_contrastive_loss(
                torch.stack([o.embeddings for o in outputs]), fine_labels, 0.1
            )
        ),
        rel_tol=1e-6,
    )


def test_contrastive_is_reported_but_not_added_at_epoch_zero(tiny_membership):
    outputs, fine_labels = tiny_outputs()
    terms = HMILLoss(tiny_membership, num_epochs=4)(outputs, fine_labels, epoch=0)
    assert "contrastive" in terms
    expected = (
        terms["coarse_ce"] + terms["fine_ce"] + terms["bag_alignment"] + terms["instance_alignment"]
    )
    assert math.isclose(float(terms["total"]), float(expected), rel_tol=1e-6)


@pytest.mark.parametrize(
    ("preset", "missing_term"),
    [
        ("no_instance_alignment", "instance_alignment"),
        ("no_bag_alignment", "bag_alignment"),
        ("no_contrastive", "contrastive"),
    ],
)
def test_ablation_presets_switch_one_term_off(tiny_membership, preset, missing_term):
    outputs, fine_labels = tiny_outputs()
    full = HMILLoss(tiny_membership, 4)(outputs, fine_labels, epoch=2)
    ablated = HMILLoss(tiny_membership, 4, LossConfig.preset(preset))(outputs, fine_labels, 2)
    assert missing_term not in ablated
    weight = {"contrastive": 0.25}.get(missing_term, 1.0)
    expected = float(full["total"]) - weight * float(full[missing_term])
    assert math.isclose(float(ablated["total"]), expected, rel_tol=1e-6)


def test_fixed_weight_and_constant_temperature_presets(tiny_membership):
    outputs, fine_labels = tiny_outputs()
    fixed = HMILLoss(tiny_membership, 4, LossConfig.preset("fixed_weights"))
    terms = fixed(outputs, fine_labels, epoch=3)
    assert math.isclose(
        float(terms["total"]), float(sum(v for k, v in terms.items() if k != "total")), rel_tol=1e-6
    )
    constant = HMILLoss(tiny_membership, 4, LossConfig.preset("constant_temperature"))
    assert constant.temperature(0) == constant.temperature(3) == 0.1


def test_reference_code_preset_uses_the_reference_forms(tiny_membership):
    outputs, fine_labels = tiny_outputs()
    intended = HMILLoss(tiny_membership, 4)(outputs, fine_labels, epoch=1)
    reference = HMILLoss(tiny_membership, 4, LossConfig.preset("reference_code"))(
        outputs, fine_labels, epoch=1
    )
    q0, q1 = grouped(FINE_LOGITS[0]), grouped(FINE_LOGITS[1])
    reference_ba = (
        -q0[0]
        + math.log(math.exp(q0[0]) + math.exp(q0[1]))
        - q1[1]
        + math.log(math.exp(q1[0]) + math.exp(q1[1]))
    ) / 2
    assert math.isclose(float(reference["bag_alignment"]), reference_ba, rel_tol=1e-6)
    assert math.isclose(
        float(reference["contrastive"]), float(intended["contrastive"]) / 2, rel_tol=1e-6
    )


def test_flat_preset_trains_a_model_without_coarse_head_and_default_refuses_it(tiny_membership):
    flat_output = MILOutput(
        fine_logits=torch.tensor(FINE_LOGITS[0]), fine_attention=torch.ones(1, 3)
    )
    flat = HMILLoss(tiny_membership, 4, LossConfig.preset("flat"))(
        [flat_output], torch.tensor([0]), 0
    )
    assert set(flat) == {"fine_ce", "total"}
    assert math.isclose(float(flat["total"]), -math.log(softmax(FINE_LOGITS[0])[0]), rel_tol=1e-6)
    with pytest.raises(ValueError, match="loss term 'coarse_ce' needs a model output"):
        HMILLoss(tiny_membership, 4)([flat_output], torch.tensor([0]), 0)


def test_preset_file_default_is_the_dataclass_default_and_all_presets_load():
    presets = load_loss_presets()
    assert presets["hmil"] == LossConfig()
    assert {
        "hmil",
        "reference_code",
        "no_instance_alignment",
        "no_bag_alignment",
        "no_contrastive",
        "constant_temperature",
        "fixed_weights",
        "flat",
    } <= set(presets)


def test_loss_config_refuses_unknown_schedules_and_keys():
    with pytest.raises(ValueError, match="loss weight contrastive: unknown schedule 'cosine'"):
        LossConfig(contrastive="cosine")
    with pytest.raises(ValueError, match="unknown key 'alpha'"):
        LossConfig.from_mapping({"alpha": 1.0})
    with pytest.raises(ValueError, match="must be ≥ 0"):
        LossConfig(fine_ce=-1.0)
