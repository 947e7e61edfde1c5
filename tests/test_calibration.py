"""The data pass behind data-driven importance: no side effects, works under no_grad/inference_mode."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp

from conftest import assert_unchanged, snapshot


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]


def test_submodule_modes_and_statistics_survive():
    net = make_net()
    net[1].eval()  # a frozen BatchNorm inside a model in train mode
    stats = net[1].running_mean.clone()
    tp.prune(net, sparsity=0.5, importance="taylor", data=batches(), loss_fn=F.cross_entropy)
    assert [m.training for m in net.modules()] == [True, True, False, True, True]
    assert torch.equal(net[1].running_mean, stats)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_under_no_grad_and_inference_mode(context):
    reference, net = make_net(), make_net()
    tp.prune(reference, sparsity=0.5, importance="gradient", data=batches(), loss_fn=F.cross_entropy)
    with context():
        data = batches()  # under inference_mode these are inference tensors
        tp.prune(net, sparsity=0.5, importance="gradient", data=data, loss_fn=F.cross_entropy)
    for name, mask in tp.masks(reference).items():
        assert torch.equal(tp.masks(net)[name], mask)


def test_layer_without_gradient_is_named_and_nothing_changes():
    net = make_net()
    net[0].weight.requires_grad_(False)
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"layers \['0'\] received no gradient"):
        tp.prune(net, sparsity=0.5, importance="taylor", data=batches(), loss_fn=F.cross_entropy)
    assert_unchanged(net, before)


# --- the one parser of `data` batches and `example_inputs` ---------------------------------------


def test_batches_reads_pairs_and_bare_inputs_only_when_asked():
    from torchprune.calibration import batches

    x, y = torch.zeros(2, 3), torch.zeros(2)
    assert [b for b in batches([(x, y), [x, y]])] == [(x, y), (x, y)]
    assert list(batches([x], targets=False)) == [(x, None)]
    with pytest.raises(TypeError, match=r"`data` must yield \(inputs, targets\) pairs, got Tensor"):
        list(batches([x]))
    with pytest.raises(TypeError, match="pairs or input tensors, got a tuple of 3"):
        list(batches([(x, y, y)], targets=False))


def test_as_inputs_and_call():
    from torchprune.calibration import as_inputs, call

    x = torch.ones(2, 3)
    assert as_inputs(x) == (x,) and as_inputs([x, 2]) == (x, 2) and as_inputs((x,), tensors_only=True) == (x,)
    with pytest.raises(ValueError, match="`example_inputs` must be given"):
        as_inputs(None)
    with pytest.raises(TypeError, match="`example_inputs` must be a tensor or a tuple"):
        as_inputs(3)
    with pytest.raises(TypeError, match="`example_inputs` must be a Tensor or a tuple/list of Tensors"):
        as_inputs([x, 2], tensors_only=True)
    assert torch.equal(call(torch.add, (x, x)), 2 * x) and torch.equal(call(torch.neg, x), -x)
