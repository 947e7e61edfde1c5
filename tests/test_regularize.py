"""Sparsity-inducing penalties against hand computations, and their gradients."""

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune import regularize

from conftest import make_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def test_l1_and_group_lasso_by_hand():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, -4.0], [0.0, 1.0]]))
        model[2].weight.copy_(torch.tensor([[-2.0, 0.5]]))
    assert regularize.l1(model).item() == pytest.approx(3 + 4 + 1 + 2 + 0.5)
    assert regularize.group_lasso(model).item() == pytest.approx(5 + 1 + (4 + 0.25) ** 0.5)
    assert regularize.l1(model, exclude=["2"]).item() == pytest.approx(8)


def test_l1_ignores_pruned_weights_and_has_sign_gradients():
    model = make_mlp()
    tp.prune(model, sparsity=0.5)
    penalty = regularize.l1(model)
    expected = sum(float(tp.masking.effective_weight(m).abs().sum()) for m in model if isinstance(m, nn.Linear))
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
    penalty.backward()
    w = model[0].weight
    assert torch.equal(w.grad, torch.sign(w.detach()) * model[0].weight_mask)


def test_bn_l1_and_training_drives_scales_down(small_net):
    with torch.no_grad():
        small_net.bn.weight.fill_(0.5)
    assert regularize.bn_l1(small_net).item() == pytest.approx(8 * 0.5)
    optimizer = torch.optim.SGD(small_net.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        regularize.bn_l1(small_net).backward()
        optimizer.step()
    assert torch.allclose(small_net.bn.weight, torch.full((8,), 0.2))
    with pytest.raises(ValueError, match="no affine BatchNorm"):
        regularize.bn_l1(make_mlp())
    with pytest.raises(TypeError, match="`model`"):
        regularize.l1("model")
