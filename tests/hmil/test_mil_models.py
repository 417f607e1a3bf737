"""MIL models: registry, output contract, shapes, gradients."""

import math

import pytest
import torch

from hmil.models import MILOutput, coarse_probs_from_fine, create_model, list_models
from hmil.models.registry import register_model
from hmil.training.losses import HMILLoss, LossConfig


def test_registry_lists_and_builds_the_models(tiny_hierarchy):
    assert {"hmil", "abmil"} <= set(list_models())
    model = create_model("hmil", in_dim=12, hierarchy=tiny_hierarchy)
    output = model(torch.randn(5, 12))
    assert isinstance(output, MILOutput)
    assert output.fine_logits.shape == (4,)
    flat = create_model("abmil", 12, (4, 2), hidden_dim=16)  # (num_fine, num_coarse) also works
    assert flat(torch.randn(5, 12)).fine_logits.shape == (4,)


def test_unknown_model_name_lists_the_available_models(tiny_hierarchy):
    with pytest.raises(ValueError, match=r"unknown model 'nope' \(available: abmil, .*hmil"):
        create_model("nope", 12, tiny_hierarchy)


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="model 'hmil' is already registered"):
        register_model("hmil")(lambda **kwargs: None)


@pytest.mark.parametrize("num_instances", [1, 50_000])
def test_hmil_output_shapes(tiny_hierarchy, num_instances):
    torch.manual_seed(0)
    model = create_model("hmil", in_dim=32, hierarchy=tiny_hierarchy)
    with torch.no_grad():
        output = model(torch.randn(num_instances, 32))
    assert output.fine_logits.shape == (4,)
    assert output.coarse_logits.shape == (2,)
    assert output.fine_attention.shape == (4, num_instances)
    assert output.coarse_attention.shape == (2, num_instances)
    assert output.embeddings.shape == (4, 256)
    # attention rows are distributions over the instances
    torch.testing.assert_close(output.fine_attention.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(output.coarse_attention.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(output.embeddings.norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("num_instances", [1, 50_000])
def test_abmil_output_shapes(tiny_hierarchy, num_instances):
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=32, hierarchy=tiny_hierarchy)
    with torch.no_grad():
        output = model(torch.randn(num_instances, 32))
    assert output.fine_logits.shape == (4,)
    assert output.coarse_logits is None and output.coarse_attention is None
    assert output.fine_attention.shape == (1, num_instances)
    assert output.embeddings.shape == (1, 256)
    torch.testing.assert_close(output.fine_attention.sum(), torch.tensor(1.0))


def test_coarse_probabilities_from_fine_sum_the_groups_and_to_one(tiny_membership):
    fine_probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.0, 0.05, 0.25]])
    coarse = coarse_probs_from_fine(fine_probs, tiny_membership)
    torch.testing.assert_close(coarse, torch.tensor([[0.3, 0.7], [0.7, 0.3]]))
    torch.testing.assert_close(coarse.sum(dim=1), torch.ones(2))


def test_every_models_coarse_from_fine_prediction_sums_to_one(tiny_hierarchy, tiny_membership):
    torch.manual_seed(1)
    for name in ("hmil", "abmil"):
        with torch.no_grad():
            output = create_model(name, 8, tiny_hierarchy)(torch.randn(9, 8))
        coarse = output.coarse_probs_from_fine(tiny_membership)
        assert coarse.shape == (2,)
        assert math.isclose(float(coarse.sum()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("name", ["hmil", "abmil"])
def test_instance_order_does_not_change_the_prediction(tiny_hierarchy, name):
    torch.manual_seed(2)
    model = create_model(name, 8, tiny_hierarchy)
    bag = torch.randn(11, 8)
    permutation = torch.randperm(11)
    with torch.no_grad():
        output, permuted = model(bag), model(bag[permutation])
    torch.testing.assert_close(output.fine_logits, permuted.fine_logits)
    torch.testing.assert_close(output.fine_attention[:, permutation], permuted.fine_attention)


@pytest.mark.parametrize(
    ("name", "loss_config"),
    [("hmil", LossConfig()), ("abmil", LossConfig.preset("flat"))],
)
def test_gradients_reach_every_parameter(tiny_hierarchy, tiny_membership, name, loss_config):
    torch.manual_seed(3)
    model = create_model(name, 8, tiny_hierarchy)
    bags = [torch.randn(n, 8) for n in (5, 7, 6, 4)]
    fine_labels = torch.tensor([0, 1, 2, 0])
    loss = HMILLoss(tiny_membership, num_epochs=10, config=loss_config)
    # epoch 5 of 10: every scheduled weight (α = 0.75, 1 − α = 0.25) is non-zero
    terms = loss([model(bag) for bag in bags], fine_labels, epoch=5)
    terms["total"].backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name
        # above round-off: a parameter no loss can see (e.g. one bias added to every
        # logit, which cancels in the softmax) still gets a gradient of ~1e-8
        assert parameter.grad.abs().max() > 1e-5, parameter_name


def test_hmil_starts_with_kaiming_normal_weights_and_zero_biases(tiny_hierarchy):
    torch.manual_seed(4)
    model = create_model("hmil", 1024, tiny_hierarchy)
    for parameter_name, parameter in model.named_parameters():
        if parameter_name.endswith("bias"):
            assert torch.count_nonzero(parameter) == 0, parameter_name
    first_layer = model.coarse_embedding[0].weight.detach()  # [256, 1024]: std sqrt(2 / 1024)
    assert math.isclose(float(first_layer.std()), math.sqrt(2 / 1024), rel_tol=0.03)
    assert abs(float(first_layer.mean())) < 1e-3


def test_dropout_is_off_by_default_and_on_when_asked(tiny_hierarchy):
    torch.manual_seed(5)
    bag = torch.randn(20, 8)
    model = create_model("hmil", 8, tiny_hierarchy).train()
    torch.testing.assert_close(model(bag).fine_logits, model(bag).fine_logits)
    with_dropout = create_model("hmil", 8, tiny_hierarchy, dropout=0.25).train()
    assert not torch.equal(with_dropout(bag).fine_logits, with_dropout(bag).fine_logits)


@pytest.mark.parametrize("name", ["hmil", "abmil"])
def test_a_bag_of_the_wrong_dimension_is_refused(tiny_hierarchy, name):
    model = create_model(name, 8, tiny_hierarchy)
    with pytest.raises(ValueError, match=r"expected one bag of shape \[N, 8\], got \(5, 9\)"):
        model(torch.randn(5, 9))
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.randn(0, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("name", "loss_config"),
    [("hmil", LossConfig()), ("abmil", LossConfig.preset("flat"))],
)
def test_model_and_loss_give_the_cpu_result_on_cuda(tiny_hierarchy, name, loss_config):
    torch.manual_seed(6)
    model = create_model(name, 8, tiny_hierarchy)
    bags = [torch.randn(n, 8) for n in (5, 7, 6)]
    fine_labels = torch.tensor([0, 1, 3])
    loss = HMILLoss(tiny_hierarchy.membership_tensor(), num_epochs=10, config=loss_config)
    on_cpu = loss([model(bag) for bag in bags], fine_labels, epoch=5)
    model = model.to("cuda")
    # the loss module is deliberately left on the CPU: it follows the model's device
    on_cuda = loss([model(bag.cuda()) for bag in bags], fine_labels, epoch=5)
    on_cuda["total"].backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in model.parameters())
    for term, value in on_cpu.items():
        assert on_cuda[term].is_cuda
        torch.testing.assert_close(on_cuda[term].cpu(), value.detach(), rtol=1e-4, atol=1e-5)
