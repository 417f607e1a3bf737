"""MHIM-MIL: masking counts, the EMA teacher, the consistency loss, the student/teacher
wrapper and the teacher checkpoint."""

import dataclasses
import hashlib

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from hmil.data.bags import Bag, collate_bags
from hmil.data.hierarchy import hierarchy_as_dict
from hmil.models import create_model
from hmil.models.mhim import TeacherError, class_aware_scores, load_teacher
from hmil.models.mhim_masking import (
    MHIM_PRESETS_PATH,
    MHIMConfig,
    cosine_schedule,
    ema_update_,
    hard_instance_mask,
    load_mhim_presets,
    mask_counts,
    soft_target_cross_entropy,
)
from hmil.training.loop import train_epoch
from hmil.training.losses import HMILLoss, LossConfig


def ranked(scores: torch.Tensor) -> torch.Tensor:
    """Instance indices from the highest score to the lowest."""
    return torch.argsort(scores, descending=True)


# ---- masks -----------------------------------------------------------------------------------


def test_mask_counts_are_exact():
    counts = mask_counts(1000, mask_ratio_h=0.03, mask_ratio_l=0.2, mask_ratio=0.5, hr=0.5)
    assert (counts.candidates, counts.high, counts.low, counts.random) == (60, 30, 200, 500)
    assert counts.kept == 270


def test_masking_keeps_exactly_the_expected_instances():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(1000, generator=generator)
    order = ranked(scores)
    top_60, bottom_200 = set(order[:60].tolist()), set(order[-200:].tolist())

    def masked(**ratios) -> set[int]:
        keep = hard_instance_mask(scores, generator=generator, **ratios)
        assert torch.equal(keep, keep.unique())  # ascending, no repeats
        return set(range(1000)) - set(keep.tolist())

    high = masked(mask_ratio_h=0.03, mask_ratio_l=0.0, mask_ratio=0.0, mask_ratio_hr=0.5)
    assert len(high) == 30 and high <= top_60
    assert high != masked(mask_ratio_h=0.03, mask_ratio_l=0.0, mask_ratio=0.0, mask_ratio_hr=0.5)
    exact_top = masked(mask_ratio_h=0.03, mask_ratio_l=0.0, mask_ratio=0.0, mask_ratio_hr=1.0)
    assert exact_top == set(order[:30].tolist())
    low = masked(mask_ratio_h=0.0, mask_ratio_l=0.2, mask_ratio=0.0)
    assert low == bottom_200
    assert len(masked(mask_ratio_h=0.0, mask_ratio_l=0.0, mask_ratio=0.5)) == 500
    everything = masked(mask_ratio_h=0.03, mask_ratio_l=0.2, mask_ratio=0.5, mask_ratio_hr=0.5)
    assert len(everything) == 30 + 200 + 500
    assert bottom_200 <= everything and len(everything & top_60) >= 30
    assert masked(mask_ratio_h=0.0, mask_ratio_l=0.0, mask_ratio=0.0) == set()


@pytest.mark.parametrize("num_instances", [1, 2, 3, 7, 50])
def test_masking_never_masks_everything(num_instances):
    scores = torch.rand(num_instances)
    for ratios in ((1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)):
        keep = hard_instance_mask(scores, *ratios)
        assert len(keep) >= 1
        counts = mask_counts(num_instances, *ratios, hr=1.0)
        assert len(keep) == counts.kept
    assert hard_instance_mask(torch.rand(1), 0.5, 0.5, 0.5).tolist() == [0]


# ---- schedules, EMA, loss --------------------------------------------------------------------


def test_cosine_schedule_runs_from_start_to_end():
    assert cosine_schedule(0.03, 0.0, 0.0) == pytest.approx(0.03)
    assert cosine_schedule(0.03, 0.0, 0.5) == pytest.approx(0.015)
    assert cosine_schedule(0.03, 0.0, 1.0) == pytest.approx(0.0)
    assert cosine_schedule(0.9999, 1.0, 1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("momentum", [0.9, 0.9999])
def test_ema_moves_the_teacher_by_one_minus_momentum(momentum):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    student(torch.randn(8, 4))  # running statistics differ from the teacher's
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    ema_update_(teacher, student, momentum)
    for name, parameter in teacher.named_parameters():
        expected = before[name] + (1 - momentum) * (student.state_dict()[name] - before[name])
        torch.testing.assert_close(parameter.detach(), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(teacher[1].running_mean, student[1].running_mean)


def test_consistency_loss_is_soft_target_cross_entropy_without_teacher_gradient():
    student = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    teacher = torch.tensor([0.2, 0.1, -0.3], requires_grad=True)
    loss = soft_target_cross_entropy(student, teacher, 1.0, 0.1)
    target = torch.softmax(teacher.detach() / 0.1, dim=0)
    expected = -(target * torch.log_softmax(student.detach(), dim=0)).sum()
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


# ---- the MHIM model --------------------------------------------------------------------------

STRONG_MASKS = {
    "mask_ratio": 0.5,
    "mask_ratio_l": 0.2,
    "mask_ratio_h": 0.1,
    "mask_ratio_hr": 0.5,
    "cl_alpha": 0.5,
}


@pytest.mark.parametrize("name", ["mhim_abmil", "mhim_transmil", "mhim_dsmil"])
def test_student_trains_on_the_teachers_masked_bag_and_predicts_on_whole_bags(tiny_hierarchy, name):
    torch.manual_seed(1)
    model = create_model(name, 8, tiny_hierarchy, mhim=STRONG_MASKS).train()
    bag = torch.randn(60, 8)
    torch.manual_seed(2)
    output = model(bag)
    with torch.no_grad():
        scores = model.teacher_scores(bag, model.teacher(bag))
    torch.manual_seed(2)  # the teacher pass draws no random numbers: same masks again
    keep = hard_instance_mask(scores, 0.1, 0.2, 0.5, 0.5)
    assert len(keep) == mask_counts(60, 0.1, 0.2, 0.5, hr=0.5).kept == 12
    assert output.fine_attention.shape[1] == 12
    torch.testing.assert_close(output.fine_logits, model.student(bag[keep]).fine_logits)
    assert set(output.auxiliary) >= {"consistency"}

    model.eval()
    with torch.no_grad():
        whole = model(bag)
        torch.testing.assert_close(whole.fine_logits, model.student(bag).fine_logits)
    assert whole.fine_attention.shape[1] == 60


def test_teacher_scores_use_the_predicted_class_row_of_class_wise_attention(tiny_hierarchy):
    torch.manual_seed(3)
    model = create_model("mhim_dsmil", 8, tiny_hierarchy).eval()
    bag = torch.randn(30, 8)
    with torch.no_grad():
        output = model.teacher(bag)
        scores = model.teacher_scores(bag, output)
    torch.testing.assert_close(scores, output.fine_attention[output.fine_logits.argmax()])


def test_class_aware_scores_apply_the_classifier_to_weighted_instances(tiny_hierarchy):
    torch.manual_seed(4)
    abmil = create_model("abmil", 8, tiny_hierarchy).eval()
    bag = torch.randn(20, 8)
    with torch.no_grad():
        scores = class_aware_scores(abmil, bag)
        instances = abmil.embedding(bag)
        attention = abmil.attention(instances)[0]
        logits = (attention[:, None] * instances) @ abmil.classifier.weight.T
        expected = torch.softmax(logits + abmil.classifier.bias, dim=1).max(dim=1).values
    torch.testing.assert_close(scores, expected)
    for name in ("transmil", "dsmil"):
        model = create_model(name, 8, tiny_hierarchy).eval()
        scores = class_aware_scores(model, bag)
        assert scores.shape == (20,)
        assert ((scores >= 0.25 - 1e-6) & (scores <= 1)).all()  # a max of 4 probabilities


def test_class_aware_option_masks_by_class_aware_scores(tiny_hierarchy):
    torch.manual_seed(5)
    model = create_model("mhim_abmil", 8, tiny_hierarchy, mhim="abmil_c16_class_aware")
    bag = torch.randn(40, 8)
    with torch.no_grad():
        scores = model.teacher_scores(bag, model.teacher(bag))
    torch.testing.assert_close(scores, class_aware_scores(model.teacher, bag))


def test_schedules_follow_training_progress(tiny_hierarchy):
    model = create_model("mhim_transmil", 8, tiny_hierarchy)  # transmil_c16: both cosine
    model.set_training_progress(0.0)
    assert model.mask_ratio_h() == pytest.approx(0.03)
    assert model.momentum() == pytest.approx(0.9999)
    model.set_training_progress(1.0)
    assert model.mask_ratio_h() == pytest.approx(0.0)
    assert model.momentum() == pytest.approx(1.0)


def test_trainer_steps_update_the_teacher_by_ema_only(tiny_hierarchy):
    torch.manual_seed(6)
    model = create_model("mhim_abmil", 8, tiny_hierarchy, mhim={**STRONG_MASKS, "momentum": 0.5})
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    bags = [Bag(torch.randn(15, 8), index % 4, 0, str(index)) for index in range(4)]
    loader = DataLoader(bags, batch_size=2, collate_fn=collate_bags)
    config = dataclasses.replace(LossConfig.preset("flat"), consistency=0.5)
    loss_fn = HMILLoss(tiny_hierarchy.membership_tensor(), num_epochs=4, config=config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.teacher.parameters())
    terms = train_epoch(
        model, loss_fn, torch.optim.SGD(trainable, lr=0.1), loader, 1, torch.device("cpu")
    )
    assert "consistency" in terms
    assert model.progress == pytest.approx((1 + 1 / 2) / 4)  # last step of epoch 1 of 4
    moved = model.teacher.classifier.weight
    assert not torch.equal(moved, teacher_before["classifier.weight"])
    assert not torch.equal(moved, model.student.classifier.weight)
    assert not model.teacher.training  # the teacher always scores in eval mode


def test_consistency_term_is_absent_in_eval(tiny_hierarchy):
    torch.manual_seed(7)
    model = create_model("mhim_abmil", 8, tiny_hierarchy).eval()
    config = dataclasses.replace(LossConfig.preset("flat"), consistency=0.1)
    loss = HMILLoss(tiny_hierarchy.membership_tensor(), num_epochs=4, config=config)
    with torch.no_grad():
        terms = loss([model(torch.randn(9, 8))], torch.tensor([1]), epoch=0)
    assert set(terms) == {"fine_ce", "total"}


# ---- presets and the teacher checkpoint -------------------------------------------------------


def test_every_preset_is_valid_and_each_student_has_a_default():
    presets = load_mhim_presets()
    for student in ("abmil", "transmil", "dsmil"):
        assert f"{student}_c16" in presets and f"{student}_tcga" in presets
    assert presets["transmil_c16"].mask_ratio_l == 0.8
    assert presets["transmil_c16"].attention_layer == 0
    assert presets["abmil_c16_class_aware"].class_aware


def test_bad_mhim_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'mask_ration'"):
        MHIMConfig.from_mapping({"mask_ration": 0.5})
    with pytest.raises(ValueError, match=r"mask_ratio_l must be in \[0, 1\]"):
        MHIMConfig(mask_ratio_l=1.5)
    with pytest.raises(ValueError, match="unknown MHIM preset 'nope'"):
        MHIMConfig.preset("nope", MHIM_PRESETS_PATH)


def save_checkpoint(path, model_name, model, in_dim, hierarchy, fold=0):
    """A model.pt laid out as hmil.train writes it."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "model": model_name,
            "model_kwargs": {},
            "in_dim": in_dim,
            "hierarchy": hierarchy_as_dict(hierarchy),
            "config": {"model": model_name, "fold": fold},
        },
        path,
    )


def test_teacher_loads_from_the_baseline_checkpoint(tiny_hierarchy, tmp_path):
    torch.manual_seed(8)
    baseline = create_model("abmil", 8, tiny_hierarchy)
    path = tmp_path / "model.pt"
    save_checkpoint(path, "abmil", baseline, 8, tiny_hierarchy)
    model = create_model("mhim_abmil", 8, tiny_hierarchy)  # student_init: embedding
    digest = load_teacher(model, path, 8, list(tiny_hierarchy.fine), fold=0)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    for name, value in baseline.state_dict().items():
        torch.testing.assert_close(model.teacher.state_dict()[name], value)
    torch.testing.assert_close(model.student.embedding[0].weight, baseline.embedding[0].weight)
    assert not torch.equal(model.student.classifier.weight, baseline.classifier.weight)


def test_a_wrong_teacher_is_refused_with_one_line_naming_the_file(tiny_hierarchy, tmp_path):
    torch.manual_seed(9)
    model = create_model("mhim_abmil", 8, tiny_hierarchy)
    fine = list(tiny_hierarchy.fine)
    cases = {
        "wrong_model.pt": ("dsmil", 8, 0, "teacher is a 'dsmil' model"),
        "wrong_dim.pt": ("abmil", 12, 0, "12-dimensional features, these are 8-dimensional"),
        "wrong_fold.pt": ("abmil", 8, 2, "fold 2, not fold 0"),
    }
    for file_name, (model_name, in_dim, fold, message) in cases.items():
        path = tmp_path / file_name
        save_checkpoint(
            path, model_name, create_model(model_name, in_dim, tiny_hierarchy), in_dim,
            tiny_hierarchy, fold,
        )  # fmt: skip
        with pytest.raises(TeacherError, match=message) as error:
            load_teacher(model, path, 8, fine, fold=0)
        assert str(path) in str(error.value) and "\n" not in str(error.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="cannot read teacher checkpoint"):
        load_teacher(model, garbage, 8, fine, fold=0)
    with pytest.raises(TeacherError, match="not found"):
        load_teacher(model, tmp_path / "missing.pt", 8, fine, fold=0)
    other = tmp_path / "other_classes.pt"
    save_checkpoint(other, "abmil", create_model("abmil", 8, (3, 2)), 8, tiny_hierarchy)
    with pytest.raises(TeacherError, match="weights do not fit abmil"):
        load_teacher(model, other, 8, fine, fold=0)
