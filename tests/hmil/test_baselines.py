"""The MIL baselines CLAM-SB/MB, TransMIL, DSMIL and the MHIM-MIL models: output contract,
gradients, the architecture-specific behaviour, learning, and training through the CLI."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hmil.data.bags import Bag, collate_bags
from hmil.data.synthetic import SyntheticConfig, generate_cohort
from hmil.models import MILOutput, create_model, list_models
from hmil.models.clam import CLAM
from hmil.models.mhim import MHIM
from hmil.models.transmil import (
    PPEG,
    NystromAttention,
    fold_padding,
    iterative_pinv,
    pad_to_square,
    segment_means,
)
from hmil.train import main
from hmil.training.loop import train_epoch
from hmil.training.losses import HMILLoss, LossConfig
from tests.hmil.train_cli import TINY_SPEC, one_error_line, write_fold_cohort

ROOT = Path(__file__).resolve().parents[2]
BASELINES = ["clam_sb", "clam_mb", "transmil", "dsmil"]
MHIM_MODELS = ["mhim_abmil", "mhim_transmil", "mhim_dsmil"]
NEW_MODELS = BASELINES + MHIM_MODELS
# attention rows per model for C_f = 4: class-wise for CLAM-MB and DSMIL, else one
ATTENTION_ROWS = {"clam_sb": 1, "clam_mb": 4, "transmil": 1, "dsmil": 4}
ATTENTION_ROWS |= {"mhim_abmil": 1, "mhim_transmil": 1, "mhim_dsmil": 4}


def loss_for(model, membership, num_epochs=10) -> HMILLoss:
    """The loss the trainer gives ``model``: its own preset, consistency weight for MHIM."""
    config = LossConfig.preset(getattr(model, "loss_preset", "flat"))
    if isinstance(model, MHIM):
        config = dataclasses.replace(config, consistency=model.config.cl_alpha)
    return HMILLoss(membership, num_epochs=num_epochs, config=config)


def test_registry_has_every_baseline():
    assert set(NEW_MODELS) <= set(list_models())


@pytest.mark.parametrize("name", NEW_MODELS)
@pytest.mark.parametrize("num_instances", [1, 7, 10_000])
def test_output_shapes_and_gradient_flow(tiny_hierarchy, tiny_membership, name, num_instances):
    torch.manual_seed(0)
    model = create_model(name, in_dim=16, hierarchy=tiny_hierarchy)
    bag = torch.randn(num_instances, 16)
    model.eval()
    with torch.no_grad():
        output = model(bag)
    assert isinstance(output, MILOutput)
    assert output.fine_logits.shape == (4,)
    assert output.coarse_logits is None  # flat: the coarse prediction comes from the fine one
    assert output.fine_attention.shape == (ATTENTION_ROWS[name], num_instances)
    torch.testing.assert_close(
        output.fine_attention.sum(dim=1), torch.ones(ATTENTION_ROWS[name]), atol=1e-4, rtol=0
    )
    assert (output.fine_attention >= 0).all()
    assert output.bag_embedding is not None and output.bag_embedding.ndim == 1
    assert math.isclose(
        float(output.coarse_probs_from_fine(tiny_membership).sum()), 1.0, rel_tol=1e-6
    )

    model.train()
    output = model(bag)
    terms = loss_for(model, tiny_membership)([output], torch.tensor([2]), epoch=3)
    if name.startswith("clam") or name.endswith("dsmil"):
        assert "instance" in terms
    if name.startswith("mhim"):
        assert "consistency" in terms
    terms["total"].backward()
    for parameter_name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert parameter_name.startswith("teacher."), parameter_name
            continue
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name


@pytest.mark.parametrize("name", BASELINES)
def test_gradients_reach_every_parameter(tiny_hierarchy, tiny_membership, name):
    torch.manual_seed(3)
    model = create_model(name, 8, tiny_hierarchy)
    bags = [torch.randn(n, 8) for n in (20, 17, 30, 25)]
    terms = loss_for(model, tiny_membership)(
        [model(bag) for bag in bags], torch.tensor([0, 1, 2, 3]), epoch=5
    )
    terms["total"].backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert parameter.grad.abs().max() > 1e-6, parameter_name


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb", "dsmil", "transmil"])
def test_a_bag_of_the_wrong_dimension_is_refused(tiny_hierarchy, name):
    model = create_model(name, 8, tiny_hierarchy)
    with pytest.raises(ValueError, match=r"expected one bag of shape \[N, 8\], got \(5, 9\)"):
        model(torch.randn(5, 9))
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.randn(0, 8))


# ---- TransMIL --------------------------------------------------------------------------------


def test_transmil_padding_leaves_a_square_bag_alone_and_copies_the_first_instances(
    tiny_hierarchy,
):
    torch.manual_seed(4)
    square = torch.randn(16, 8)
    padded, side = pad_to_square(square)
    assert padded is square and side == 4
    model = create_model("transmil", 8, tiny_hierarchy).eval()
    bag = torch.randn(10, 8)
    by_hand = torch.cat([bag, bag[:6]])  # 16 = 4²: the model must not pad it further
    with torch.no_grad():
        output, square_output = model(bag), model(by_hand)
        embedding, _, _ = model.encode(bag)
        square_embedding, _, _ = model.encode(by_hand)
    torch.testing.assert_close(embedding, square_embedding)  # the class-token output
    torch.testing.assert_close(output.fine_logits, square_output.fine_logits)
    # the copies' attention belongs to the instances they copy
    torch.testing.assert_close(
        output.fine_attention[0], fold_padding(square_output.fine_attention[0], 10)
    )


def test_transmil_output_depends_on_instance_order_through_ppeg(tiny_hierarchy):
    """PPEG gives TransMIL positions: reordering the instances changes the output (unlike
    ABMIL), while the same order gives the same output."""
    torch.manual_seed(5)
    model = create_model("transmil", 8, tiny_hierarchy).eval()
    bag = torch.randn(25, 8)
    with torch.no_grad():
        first, again = model(bag).fine_logits, model(bag.clone()).fine_logits
        shuffled = model(bag[torch.randperm(25)]).fine_logits
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, shuffled)


def smooth_sequence(length: int, heads: int = 2, head_dim: int = 8) -> torch.Tensor:
    """[1, heads, length, head_dim] tokens that vary smoothly along the sequence (as
    neighbouring patches do): segment means then make good landmarks."""
    position = torch.linspace(0, 1, length).unsqueeze(1)
    waves = torch.cat(
        [torch.sin(2 * math.pi * f * position + phase) for f, phase in ((1, 0), (2, 1), (0.5, 2))],
        dim=1,
    )  # [length, 3]
    return (waves @ torch.randn(1, heads, 3, head_dim)).contiguous()


def test_nystrom_is_exact_up_to_the_landmark_count_and_close_beyond():
    torch.manual_seed(6)
    attention = NystromAttention(64, heads=2, head_dim=8, num_landmarks=16)
    for length in (16, 200, 1000):
        q, k, v = smooth_sequence(length), smooth_sequence(length), torch.randn(1, 2, length, 8)
        exact = F.scaled_dot_product_attention(q, k, v)
        approximate = attention.mix(q, k, v)
        error = float((approximate - exact).norm() / exact.norm())
        assert error < (1e-5 if length <= 16 else 0.1), (length, error)
        if length > 16:  # the fused kernels compute attn1 · attn2⁺ · attn3 · v
            segment = math.ceil(length / 16)
            q_landmarks, k_landmarks = segment_means(q, segment), segment_means(k, segment)
            attn1, attn2, attn3 = (
                torch.softmax(a @ b.transpose(-1, -2) / math.sqrt(8), dim=-1)
                for a, b in ((q, k_landmarks), (q_landmarks, k_landmarks), (q_landmarks, k))
            )
            by_hand = attn1 @ iterative_pinv(attn2, 6) @ attn3 @ v
            torch.testing.assert_close(approximate, by_hand, atol=1e-4, rtol=1e-4)


def test_iterative_pinv_approaches_the_pseudo_inverse():
    torch.manual_seed(7)
    matrix = torch.softmax(torch.randn(3, 20, 20), dim=-1)
    inverse = iterative_pinv(matrix, iterations=20)
    torch.testing.assert_close(inverse, torch.linalg.pinv(matrix), atol=1e-3, rtol=1e-3)


def test_landmarks_average_only_real_tokens():
    sequence = torch.arange(10.0).view(10, 1)
    means = segment_means(sequence, 4)  # segments [0..3], [4..7], [8, 9]
    torch.testing.assert_close(means.flatten(), torch.tensor([1.5, 5.5, 8.5]))


def test_ppeg_single_kernel_equals_three_convolutions_plus_identity():
    torch.manual_seed(8)
    position = PPEG(6)
    tokens = torch.randn(1 + 25, 6)
    grid = tokens[1:].transpose(0, 1).reshape(1, 6, 5, 5)
    expected = position.conv7(grid) + position.conv5(grid) + position.conv3(grid) + grid
    with torch.no_grad():
        mixed = position(tokens, 5)
    torch.testing.assert_close(mixed[0], tokens[0])  # the class token passes unchanged
    torch.testing.assert_close(mixed[1:], expected.reshape(6, 25).transpose(0, 1))


# ---- DSMIL -----------------------------------------------------------------------------------


def test_dsmil_attends_to_the_argmax_instance_of_each_class(tiny_hierarchy):
    torch.manual_seed(9)
    model = create_model("dsmil", 8, tiny_hierarchy).eval()
    bag = torch.randn(30, 8)
    # make instance 17 the top scorer of class 2 by pushing it along class 2's weights
    bag[17] = 10 * model.instance_classifier.weight[2].detach()
    with torch.no_grad():
        instance_logits = model.instance_classifier(bag)
        critical = model.critical_instances(instance_logits)
        output = model(bag)
        queries = model.query(bag)
    assert critical.tolist() == instance_logits.argmax(dim=0).tolist()
    assert int(critical[2]) == 17
    for class_index in range(4):
        by_hand = torch.softmax(queries @ queries[critical[class_index]] / math.sqrt(128), dim=0)
        torch.testing.assert_close(output.fine_attention[class_index], by_hand)


def test_dsmil_instance_loss_is_cross_entropy_of_the_max_instance(tiny_hierarchy):
    torch.manual_seed(10)
    model = create_model("dsmil", 8, tiny_hierarchy)
    bag = torch.randn(12, 8)
    output = model(bag)
    label = torch.tensor(3)
    max_logits = model.instance_classifier(bag).max(dim=0).values
    expected = -torch.log_softmax(max_logits, dim=0)[3]
    torch.testing.assert_close(output.auxiliary["instance"](label), expected)
    terms = HMILLoss(tiny_hierarchy.membership_tensor(), 10, LossConfig.preset("dsmil"))(
        [output], label.view(1), epoch=0
    )
    torch.testing.assert_close(terms["total"], 0.5 * terms["fine_ce"] + 0.5 * terms["instance"])


# ---- CLAM ------------------------------------------------------------------------------------


def test_clam_instance_loss_matches_clam_subtyping_formula():
    """Class y: top-k → 1 and bottom-k → 0; other classes: top-k → 0; per-class means
    summed and divided by C."""
    torch.manual_seed(11)
    logits = torch.randn(3, 4, 2)  # C = 3 classes, k = 2
    label = torch.tensor(1)
    loss = CLAM.instance_loss(logits, label)
    log_probs = torch.log_softmax(logits, dim=-1)
    in_class = -(log_probs[1, :2, 1].sum() + log_probs[1, 2:, 0].sum()) / 4
    out_of_class = -(log_probs[0, :2, 0].mean() + log_probs[2, :2, 0].mean())
    torch.testing.assert_close(loss, (in_class + out_of_class) / 3)


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb"])
def test_clam_scores_the_most_and_least_attended_instances(tiny_hierarchy, name):
    torch.manual_seed(12)
    model = create_model(name, 8, tiny_hierarchy, k_sample=3).eval()
    bag = torch.randn(40, 8)
    with torch.no_grad():
        instances = model.embedding(bag)
        attention = model.attention(instances)
        logits = model.instance_logits(instances, attention)
    assert logits.shape == (4, 6, 2)
    row = 2 if name == "clam_mb" else 0  # class 2's attention row
    top = attention[row].topk(3).indices
    weight = model.instance_classifiers.weight.view(4, 2, -1)[2]
    bias = model.instance_classifiers.bias.view(4, 2)[2]
    torch.testing.assert_close(logits[2, :3], instances[top] @ weight.T + bias)
    # fewer instances than k: k = N
    with torch.no_grad():
        assert model(torch.randn(2, 8)).auxiliary["instance"](torch.tensor(0)).isfinite()


# ---- learning --------------------------------------------------------------------------------

OVERFIT = SyntheticConfig(
    bags_per_class=2,
    feature_dim=16,
    min_instances=16,
    max_instances=30,
    min_key_fraction=0.2,
    max_key_fraction=0.4,
    signal=6.0,
    fine_offset=3.0,
    seed=2,
)


def fit_tiny_set(hierarchy, model, epochs: int = 40) -> tuple[list[int], list[int], dict]:
    """Train ``model`` on 8 generated bags; its eval predictions, the labels, last losses."""
    cohort = generate_cohort(hierarchy, OVERFIT)
    labels = [hierarchy.fine.index(label) for label in cohort.table["label"]]
    bags = [
        Bag(torch.from_numpy(features), label, 0, str(index))
        for index, (features, label) in enumerate(zip(cohort.features, labels, strict=True))
    ]
    loader = DataLoader(bags, batch_size=4, shuffle=False, collate_fn=collate_bags)
    loss_fn = loss_for(model, hierarchy.membership_tensor(), num_epochs=epochs)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for epoch in range(epochs):
        terms = train_epoch(model, loss_fn, optimizer, loader, epoch, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        predicted = [int(model(bag.features).fine_logits.argmax()) for bag in bags]
    return predicted, labels, terms


@pytest.fixture(scope="module")
def fitted_students():
    """Baselines fitted to the tiny set, trained once: MHIM's teachers start from them."""
    return {}


def fitted(name, hierarchy, cache) -> torch.nn.Module:
    if name not in cache:
        torch.manual_seed(13)
        model = create_model(name, 16, hierarchy)
        predicted, labels, terms = fit_tiny_set(hierarchy, model)
        assert predicted == labels, (name, terms)
        cache[name] = model
    return cache[name]


@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_overfits_a_tiny_generated_set(tiny_hierarchy, fitted_students, name):
    fitted(name, tiny_hierarchy, fitted_students)


@pytest.mark.parametrize("name", MHIM_MODELS)
def test_each_mhim_model_overfits_from_its_fitted_teacher(tiny_hierarchy, fitted_students, name):
    """As in use, the teacher is the trained baseline (a random teacher would mine random
    instances); the student starts from its embedding and must fit whole bags."""
    student_name = name.removeprefix("mhim_")
    teacher = fitted(student_name, tiny_hierarchy, fitted_students)
    torch.manual_seed(14)
    model = create_model(name, 16, tiny_hierarchy)
    model.teacher.load_state_dict(teacher.state_dict())
    if model.config.student_init == "embedding":
        model.student.embedding.load_state_dict(teacher.embedding.state_dict())
    predicted, labels, terms = fit_tiny_set(tiny_hierarchy, model)
    assert predicted == labels, (name, terms)
    assert terms["consistency"] > 0


# ---- through the trainer's command line ----------------------------------------------------

EASY = SyntheticConfig(
    bags_per_class=5,
    feature_dim=16,
    min_instances=20,
    max_instances=40,
    min_key_fraction=0.1,
    max_key_fraction=0.3,
    signal=6.0,
    fine_offset=3.0,
    seed=1,
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """20 slides; fold0: 1 test, 1 val, 3 train slides per class."""
    return write_fold_cohort(tmp_path_factory.mktemp("cohort"), EASY, 1, 1)["root"]


def train_args(root, out, model, *extra, epochs=2):
    return [
        "--features", str(root / "features"),
        "--splits", str(root / "DATA_SPLIT.csv"),
        "--fold", "0",
        "--model", model,
        "--hierarchy", str(root / "tiny.yaml"),
        "--out", str(out),
        "--epochs", str(epochs),
        "--batch-bags", "4",
        "--lr", "1e-3",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def baseline_runs(cohort, tmp_path_factory):
    """A 2-epoch run of every baseline (and of ABMIL, the mhim_abmil teacher)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run outside the one-thread fixture
    outs = {}
    try:
        for model in [*BASELINES, "abmil"]:
            out = tmp_path_factory.mktemp(model)
            assert main(train_args(cohort, out, model)) == 0
            outs[model] = out
    finally:
        torch.set_num_threads(threads)
    return outs


def check_run_outputs(out: Path, cohort: Path, model: str, rows: int) -> None:
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 8  # 4 test + 4 val slides
    fine = predictions[[f"p_fine_{name}" for name in TINY_SPEC["fine"]]].to_numpy()
    np.testing.assert_allclose(fine.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        predictions["p_coarse_from_fine_A"], fine[:, :2].sum(axis=1), atol=1e-5
    )
    assert predictions["p_coarse_A"].isna().all()  # flat: no coarse head
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["model"] == model and metrics["test"]["coarse"] is None
    with h5py.File(out / "attention.h5", "r") as attention:
        assert attention.attrs["model"] == model
        for slide_id in attention:
            with h5py.File(cohort / "features" / f"{slide_id}.h5", "r") as features:
                num_patches = features["features"].shape[0]
            weights = attention[slide_id]["fine_attention"][()]
            assert weights.shape == (rows, num_patches)
            np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-4)


@pytest.mark.parametrize("model", BASELINES)
def test_baseline_trains_through_the_cli(baseline_runs, cohort, model):
    out = baseline_runs[model]
    check_run_outputs(out, cohort, model, ATTENTION_ROWS[model])
    log = pd.read_csv(out / "log.csv")
    expected_preset = {"clam_sb": "clam", "clam_mb": "clam", "dsmil": "dsmil"}.get(model, "flat")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["loss_preset"] == expected_preset
    assert ("train_instance" in log.columns) == (expected_preset != "flat")


def test_mhim_trains_from_its_teacher_through_python_m_hmil_train(baseline_runs, cohort, tmp_path):
    teacher = baseline_runs["abmil"] / "model.pt"
    out = tmp_path / "mhim_abmil"
    args = train_args(cohort, out, "mhim_abmil", "--teacher", str(teacher))
    result = subprocess.run(
        [sys.executable, "-m", "hmil.train", *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    check_run_outputs(out, cohort, "mhim_abmil", 1)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["mhim_preset"] == "abmil_c16"
    assert len(metrics["config"]["teacher_sha256"]) == 64
    log = pd.read_csv(out / "log.csv")
    assert "train_consistency" in log.columns and "val_consistency" not in log.columns
    saved = torch.load(out / "model.pt", weights_only=False)
    assert saved["model_kwargs"] == {"mhim": "abmil_c16"}
    rebuilt = create_model("mhim_abmil", 16, (4, 2), **saved["model_kwargs"])
    rebuilt.load_state_dict(saved["state_dict"])  # the teacher travels with the student
    trained_teacher = torch.load(teacher, weights_only=False)["state_dict"]
    assert not torch.equal(
        rebuilt.teacher.classifier.weight, trained_teacher["classifier.weight"]
    )  # the EMA moved it


@pytest.mark.parametrize("student", ["transmil", "dsmil"])
def test_mhim_transmil_and_dsmil_train_from_their_teachers(
    baseline_runs, cohort, tmp_path, student
):
    out = tmp_path / student
    args = train_args(
        cohort, out, f"mhim_{student}", "--teacher", str(baseline_runs[student] / "model.pt")
    )
    assert main(args) == 0
    check_run_outputs(out, cohort, f"mhim_{student}", ATTENTION_ROWS[student])


def test_mhim_without_teacher_is_one_error_line(cohort, tmp_path, capsys):
    line = one_error_line(capsys, train_args(cohort, tmp_path / "out", "mhim_transmil"))
    assert "needs --teacher" in line and "transmil" in line


def test_teacher_of_another_architecture_is_one_error_line(baseline_runs, cohort, tmp_path, capsys):
    teacher = baseline_runs["dsmil"] / "model.pt"
    args = train_args(cohort, tmp_path / "out", "mhim_abmil", "--teacher", str(teacher))
    line = one_error_line(capsys, args)
    assert str(teacher) in line and "'dsmil'" in line and "'abmil'" in line


def test_teacher_of_another_fold_or_a_missing_teacher_is_one_error_line(
    baseline_runs, cohort, tmp_path, capsys
):
    checkpoint = torch.load(baseline_runs["abmil"] / "model.pt", weights_only=False)
    checkpoint["config"]["fold"] = 3
    other_fold = tmp_path / "fold3.pt"
    torch.save(checkpoint, other_fold)
    args = train_args(cohort, tmp_path / "out", "mhim_abmil", "--teacher", str(other_fold))
    assert "fold 3, not fold 0" in one_error_line(capsys, args)
    missing = tmp_path / "nope.pt"
    args = train_args(cohort, tmp_path / "out", "mhim_abmil", "--teacher", str(missing))
    line = one_error_line(capsys, args)
    assert str(missing) in line and "not found" in line


def test_mhim_options_on_another_model_are_one_error_line(cohort, tmp_path, capsys):
    args = train_args(cohort, tmp_path / "out", "abmil", "--mhim-preset", "abmil_c16")
    assert "--mhim-preset applies to mhim_* models only" in one_error_line(capsys, args)


def test_unknown_mhim_preset_is_one_error_line(baseline_runs, cohort, tmp_path, capsys):
    teacher = str(baseline_runs["abmil"] / "model.pt")
    args = train_args(cohort, tmp_path / "out", "mhim_abmil", "--teacher", teacher)
    line = one_error_line(capsys, [*args, "--mhim-preset", "nope"])
    assert "unknown MHIM preset 'nope'" in line and "abmil_c16" in line
