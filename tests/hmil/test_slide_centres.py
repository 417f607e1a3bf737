"""``slide_norm: auto``: the permutation test of a class effect on the training slides'
means, and the trainer centring (or not) by it, recorded where evaluation finds it."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from hmil.data.synthetic import SyntheticConfig, generate_cohort
from hmil.evaluation.fold_models import load_fold_model
from hmil.train import main
from hmil.training.slide_centres import ALPHA, class_effect_on_centres, patient_centres
from tests.hmil.train_cli import write_fold_cohort

#: Enough slides for the test to see what a class adds to a slide's mean.
CLEAN = SyntheticConfig(
    bags_per_class=12, feature_dim=32, min_instances=40, max_instances=80, signal=4.0, seed=3
)
#: The same cohort with one offset per slide as large as the key-instance signal.
SHIFTED = replace(CLEAN, slide_shift=1.0)


def centres_and_labels(tiny_hierarchy, config):
    cohort = generate_cohort(tiny_hierarchy, config)
    centres = torch.stack([torch.from_numpy(bag.mean(axis=0)) for bag in cohort.features])
    labels = torch.tensor(cohort.table["label"].map(tiny_hierarchy.fine.index).tolist())
    return centres, labels


def direct_f(centres: np.ndarray, labels: np.ndarray) -> float:
    """The one-way F of the slide means, summed over features, written out."""
    grand = centres.mean(axis=0)
    classes = np.unique(labels)
    between = sum(
        (labels == c).sum() * np.square(centres[labels == c].mean(axis=0) - grand).sum()
        for c in classes
    )
    within = sum(np.square(centres[labels == c] - centres[labels == c].mean(axis=0)).sum()
                 for c in classes)  # fmt: skip
    n, k = len(labels), len(classes)
    return (between / (k - 1)) / (within / (n - k))


def test_the_test_finds_the_class_in_clean_slide_means_and_not_under_offsets(tiny_hierarchy):
    clean_f, clean_p = class_effect_on_centres(*centres_and_labels(tiny_hierarchy, CLEAN))
    shifted_f, shifted_p = class_effect_on_centres(*centres_and_labels(tiny_hierarchy, SHIFTED))
    assert clean_p < ALPHA <= shifted_p
    assert clean_f > 1 + 2 * (shifted_f - 1)  # the offsets drown what the classes add


def test_the_statistic_is_the_one_way_f_also_with_more_features_than_slides():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(5)  # 15 slides
    for width in (4, 40):  # 40 > 15: computed in the span of the slides
        centres = torch.randn(15, width, generator=generator, dtype=torch.float64)
        centres[labels == 0] += 0.8
        statistic, p_value = class_effect_on_centres(centres, labels, permutations=199)
        assert statistic == pytest.approx(direct_f(centres.numpy(), labels.numpy()))
        assert 1 / 200 <= p_value <= 1
        # the labels' permutations are seeded: the same slides give the same answer
        assert class_effect_on_centres(centres, labels, permutations=199) == (statistic, p_value)


def test_the_units_are_patients_with_their_slides_of_one_class_averaged():
    slides = torch.tensor([[0.0, 2.0], [2.0, 4.0], [5.0, 5.0], [9.0, 1.0]], dtype=torch.float64)
    patients = ["p1", "p1", "p2", "p1"]  # p1's last slide has another class: its own unit
    labels = torch.tensor([0, 0, 1, 1])
    centres, unit_labels = patient_centres(slides, patients, labels)
    torch.testing.assert_close(
        centres, torch.tensor([[1.0, 3.0], [5.0, 5.0], [9.0, 1.0]], dtype=torch.float64)
    )
    assert unit_labels.tolist() == [0, 1, 1]


def test_a_shared_offset_per_patient_is_not_taken_for_a_class_effect():
    # 3 classes × 10 patients × 3 slides; each patient's slides share one offset (scanner,
    # staining batch) and the classes add nothing: counted as slides, the patients'
    # offsets look like a class effect (F ≈ 3); counted as patients they do not
    generator = torch.Generator().manual_seed(1)
    offsets = 4 * torch.randn(30, 16, generator=generator, dtype=torch.float64)
    slides = offsets.repeat_interleave(3, dim=0) + 0.1 * torch.randn(
        90, 16, generator=generator, dtype=torch.float64
    )
    labels = torch.arange(3).repeat_interleave(30)
    patients = [f"p{i // 3}" for i in range(90)]
    assert class_effect_on_centres(slides, labels)[1] < ALPHA
    _, p_value = class_effect_on_centres(*patient_centres(slides, patients, labels))
    assert p_value >= ALPHA


def test_the_test_needs_two_classes_and_more_slides_than_classes():
    with pytest.raises(ValueError, match="need ≥ 2 classes"):
        class_effect_on_centres(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize(("config", "mode"), [(SHIFTED, "center"), (CLEAN, "none")])
def test_auto_centres_where_slide_means_carry_no_class_and_records_it(tmp_path, config, mode):
    (tmp_path / "cohort").mkdir()
    cohort = write_fold_cohort(tmp_path / "cohort", config, 2, 2)  # 8 train slides a class
    out = tmp_path / "run"
    args = [
        "--features", str(cohort["root"] / "features"), "--splits", str(cohort["splits"]),
        "--fold", "0", "--model", "abmil", "--hierarchy", str(cohort["hierarchy"]),
        "--out", str(out), "--epochs", "1", "--seed", "0",
    ]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["slide_norm"] == "auto"  # the setting, as given
    chosen = metrics["slide_norm"]  # and what the test made of this fold's slides
    assert (chosen["setting"], chosen["mode"], chosen["slides"]) == ("auto", mode, 32)
    assert chosen["patients"] == 32  # one slide per patient in this cohort
    assert (chosen["p_value"] >= ALPHA) == (mode == "center")
    model = load_fold_model(out, torch.device("cpu")).module
    assert model.slide_norm == mode  # evaluation and deployment rebuild the same model
