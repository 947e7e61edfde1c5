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


# --- data-driven criteria that read activations (torchprune/importance/activations.py) ----------


def test_activation_mean_and_apoz_by_hand():
    layer = tiny_linear()  # rows [1, -2, 0.5] and [-3, 0, 4]
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    out = layer(x)  # neuron 0: 1, -2, 0.5, -0.5 ; neuron 1: -3, 0, 4, 1
    for kind, expected in (("mean", [(1 + 0.5) / 4, (4 + 1) / 4]), ("apoz", [1 - 2 / 4, 1 - 2 / 4])):
        crit = imp.Activation(kind)
        crit.observe_forward(layer, (x[:2],), out[:2])  # two batches add up like one
        crit.observe_forward(layer, (x[2:],), out[2:])
        scores = crit(layer)
        assert scores.shape == layer.weight.shape
        assert torch.allclose(scores, torch.tensor(expected, dtype=scores.dtype)[:, None].expand(2, 3))
    with pytest.raises(ValueError, match="`kind` must be one of"):
        imp.Activation("max")


def test_activation_on_conv_uses_the_channel_dimension():
    conv = nn.Conv2d(2, 3, 1, bias=False)
    out = torch.zeros(2, 3, 2, 2)
    out[:, 1] = 2.0
    out[0, 2, 0, 0] = 1.0
    crit = imp.Activation("apoz")
    crit.observe_forward(conv, (torch.zeros(2, 2, 2, 2),), out)
    assert torch.allclose(crit(conv)[:, 0, 0, 0], torch.tensor([0.0, 1.0, 1 / 8], dtype=torch.float64))


def test_wanda_linear_by_hand():
    layer = tiny_linear()
    x = torch.tensor([[3.0, 0.0, 1.0], [4.0, 1.0, 0.0]])
    crit = imp.Wanda()
    crit.observe_forward(layer, (x,), layer(x))
    norms = torch.tensor([5.0, 1.0, 1.0])
    assert torch.allclose(crit(layer), layer.weight.detach().abs() * norms)


def test_wanda_conv_norm_per_input_channel_and_groups():
    conv = nn.Conv2d(4, 4, 2, groups=2, bias=False)
    x = torch.zeros(1, 4, 3, 3)
    x[0, 0] = 1.0  # ||X_0|| = 3
    x[0, 3, 0, 0] = 2.0  # ||X_3|| = 2
    crit = imp.Wanda()
    crit.observe_forward(conv, (x,), conv(x))
    w = conv.weight.detach().abs()
    expected = torch.zeros_like(w)
    expected[0:2, 0] = 3 * w[0:2, 0]  # group 0 sees channels 0, 1
    expected[2:4, 1] = 2 * w[2:4, 1]  # group 1 sees channels 2, 3
    assert torch.allclose(crit(conv), expected)


def test_prune_with_wanda_selects_within_each_row():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(20, 8) * torch.linspace(0.1, 3, 8)
    tp.prune(model, sparsity=0.5, importance="wanda", data=[x])  # no loss_fn needed
    for mask in tp.masks(model).values():
        assert ((~mask).sum(1) == mask.shape[1] // 2).all()
    # the kept weights are each row's largest |w| * ||x_j||
    layer = model[0]
    scores = layer.weight.detach().abs() * x.norm(dim=0)
    expected = scores >= scores.sort(dim=1).values[:, 4:5]
    assert torch.equal(layer.weight_mask, expected)


def test_prune_with_activation_needs_data_and_prunes_whole_neurons():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 3))
    with pytest.raises(ValueError, match="pass `data`"):
        tp.prune(model, sparsity=0.5, importance="apoz")
    assert tp.masks(model) == {}
    x = torch.randn(30, 8)
    with torch.no_grad():
        fired = torch.relu(model[0](x)).mean(0)
    tp.prune(model, sparsity=0.3, importance="activation", data=[(x, None)], exclude=["2"])
    gone = (~model[0].weight_mask).all(1)
    assert gone.sum() == 3  # 30% of 10 neurons, whole rows: the three that fire least
    assert set(torch.argsort(fired)[:3].tolist()) == set(torch.nonzero(gone).flatten().tolist())


def test_bn_scale_reads_the_following_batchnorm(small_net):
    with torch.no_grad():
        small_net.bn.weight.copy_(torch.tensor([0.1, -2.0, 0.3, 0.0, 5.0, -0.2, 1.0, 0.05]))
    crit = imp.BNScale()
    crit.prepare(small_net, {"conv": small_net.conv})
    assert torch.equal(crit(small_net.conv)[:, 0, 0, 0], small_net.bn.weight.detach().abs())
    with pytest.raises(ValueError, match=r"no affine BatchNorm right after layers \['fc1'\]"):
        crit.prepare(small_net, {"fc1": small_net.fc1})
    tp.prune(small_net, sparsity=0.25, importance="bn_scale", exclude=["conv1d", "fc1", "fc2"])
    gone = (~small_net.conv.weight_mask).flatten(1).all(1)
    assert gone.tolist() == [False, False, False, True, False, False, False, True]  # |gamma| 0 and 0.05


def test_bn_scale_explicit_pairs():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.BatchNorm2d(2))
    crit = imp.BNScale(pairs={"0": "2"})
    crit.prepare(model, {"0": model[0]})
    assert crit(model[0]).shape == model[0].weight.shape
    with pytest.raises(ValueError, match="must name an affine BatchNorm"):
        imp.BNScale(pairs={"0": "1"}).prepare(model, {"0": model[0]})
    with pytest.raises(TypeError, match="`pairs`"):
        imp.BNScale(pairs=["0"])


@pytest.mark.parametrize("name,cls,kind", [("activation", imp.Activation, "mean"), ("apoz", imp.Activation, "apoz"),
                                           ("wanda", imp.Wanda, None), ("bn_scale", imp.BNScale, None)])
def test_resolve_data_driven_names(name, cls, kind):
    crit = imp.resolve(name)
    assert type(crit) is cls and (kind is None or crit.kind == kind)


def test_forward_criteria_without_statistics_say_so():
    layer = tiny_linear()
    with pytest.raises(RuntimeError, match="no activation statistics"):
        imp.Wanda()(layer)


def test_row_selection_keeps_earlier_pruning_and_breaks_ties_by_index():
    from torchprune import selection

    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 5.0, 0.5]])
    mask = torch.tensor([[False, True, False, False], [True, True, True, True]])
    keep = selection.by_row_ratio(scores, mask, 0.5)
    assert keep.tolist() == [[False, True, False, False], [False, True, True, False]]
