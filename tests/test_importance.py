"""Importance criteria against hand computations on tiny layers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp
from torchprune import importance as imp


def tiny_linear():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-3.0, 0.0, 4.0]]))
        layer.bias.zero_()
    return layer


def test_magnitude_p1_and_p2():
    layer = tiny_linear()
    assert torch.equal(imp.Magnitude(p=1)(layer), torch.tensor([[1.0, 2.0, 0.5], [3.0, 0.0, 4.0]]))
    assert torch.equal(imp.Magnitude(p=2)(layer), torch.tensor([[1.0, 4.0, 0.25], [9.0, 0.0, 16.0]]))


def test_magnitude_reads_the_effective_weight():
    layer = tiny_linear()
    tp.masking.attach_mask(layer, torch.tensor([[True, False, True], [True, True, True]]))
    assert imp.Magnitude()(layer)[0, 1] == 0


def test_filter_norm_per_output_neuron_and_filter():
    layer = tiny_linear()
    expected = torch.tensor([(1 + 4 + 0.25) ** 0.5, 5.0])
    assert torch.allclose(imp.FilterNorm()(layer), expected[:, None].expand(2, 3))
    conv = nn.Conv2d(2, 3, 2)
    scores = imp.FilterNorm(p=1)(conv)
    assert scores.shape == conv.weight.shape
    assert torch.allclose(scores[:, 0, 0, 0], conv.weight.detach().abs().flatten(1).sum(1))


def _grads_over(layer, batches):
    grads = []
    for x, y in batches:
        layer.zero_grad()
        F.mse_loss(layer(x), y).backward()
        grads.append(layer.weight.grad.clone())
    return grads


@pytest.mark.parametrize("cls", [imp.Gradient, imp.Taylor])
def test_gradient_and_taylor_accumulate_per_batch(cls):
    torch.manual_seed(0)
    layer = tiny_linear()
    batches = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(3)]
    crit = cls()
    for x, y in batches:
        layer.zero_grad()
        F.mse_loss(layer(x), y).backward()
        crit.observe(layer)
    grads = _grads_over(layer, batches)
    w = layer.weight.detach()
    if cls is imp.Gradient:
        expected = sum(g.abs() for g in grads)
    else:
        expected = sum((w * g).abs() for g in grads)
    assert torch.allclose(crit(layer), expected)
    crit.reset()
    with pytest.raises(RuntimeError, match="no gradient statistics"):
        crit(layer)


def test_random_is_seeded_and_reproducible():
    layer = nn.Linear(5, 4)
    a, b = imp.Random(seed=3), imp.Random(seed=3)
    first = a(layer)
    assert first.shape == layer.weight.shape
    assert torch.equal(first, b(layer))
    assert not torch.equal(a(layer), first)  # the stream moves on ...
    a.reset()
    assert torch.equal(a(layer), first)  # ... and reset() starts it again
    assert not torch.equal(first, imp.Random(seed=4)(layer))


@pytest.mark.parametrize(
    "name,cls,p",
    [("magnitude", imp.Magnitude, 1), ("l1", imp.Magnitude, 1), ("l2", imp.Magnitude, 2),
     ("filter_norm", imp.FilterNorm, 2), ("gradient", imp.Gradient, None), ("taylor", imp.Taylor, None),
     ("random", imp.Random, None), ("Magnitude", imp.Magnitude, 1)],
)
def test_resolve_names(name, cls, p):
    crit = imp.resolve(name)
    assert type(crit) is cls
    if p is not None:
        assert crit.p == p


def test_resolve_errors_list_the_allowed_names():
    with pytest.raises(ValueError, match=r"`importance` must be one of .*'magnitude'.*got 'hessian'"):
        imp.resolve("hessian")
    with pytest.raises(TypeError, match="`importance`"):
        imp.resolve(3)
    with pytest.raises(ValueError, match="`p` must be a positive number"):
        imp.Magnitude(p=0)
    with pytest.raises(TypeError, match="`seed` must be an int"):
        imp.Random(seed=1.5)
