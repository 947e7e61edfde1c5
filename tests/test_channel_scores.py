"""Channel-level (structured) scoring by each criterion's own `channel_scores` hook, and the one
definition of "activation" / "apoz" shared by weight-level and channel-level pruning."""

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.importance import resolve
from torchprune.structured import DependencyGraph
from torchprune.structured.scoring import group_scores


def _hidden_group(model, x):
    return [g for g in DependencyGraph(model, x).groups if ("0", "weight", 0) in g.indices]


def _two_neurons():
    """Linear(2, 2) without bias, rows [1, 1] and [-1, 3], then ReLU and Linear(2, 1).

    On the inputs below neuron 0 outputs 1, 1, 2, -1 and neuron 1 outputs -1, 3, 2, -3."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 3.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, -1.0]])
    return model, x


@pytest.mark.parametrize("kind, per_neuron", [
    ("activation", [4 / 4, 5 / 4]),   # mean of max(out, 0): (1+1+2+0)/4, (0+3+2+0)/4
    ("apoz", [1 - 1 / 4, 1 - 2 / 4]),  # 1 - APoZ, APoZ = share of max(out, 0) == 0
])
def test_activation_and_apoz_mean_the_same_at_weight_and_channel_level(kind, per_neuron):
    model, x = _two_neurons()
    expected = torch.tensor(per_neuron, dtype=torch.float64)
    # weight level: every weight of a row gets its neuron's value
    crit = resolve(kind)
    crit.observe_forward(model[0], (x,), model[0](x))
    torch.testing.assert_close(crit(model[0])[:, 0], expected)
    # channel level: the same values, divided by their mean over the layer (the group normalization)
    (group,) = _hidden_group(model, x[:1])
    (scores,) = group_scores(model, [group], resolve(kind), data=[(x, None)])
    torch.testing.assert_close(scores, expected / expected.mean())


def test_channel_apoz_ranks_the_channels_of_a_conv():
    """APoZ counts zeros after the ReLU: on a conv output (which is never exactly zero) the old
    count of nonzeros was 1 for every channel, so channel-level "apoz" ranked nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with torch.no_grad():
        model[0].bias.copy_(torch.linspace(-1.0, 1.0, 8))  # channels fire more or less often
    x = torch.randn(4, 3, 8, 8)
    (group,) = _hidden_group(model, x[:1])
    (scores,) = group_scores(model, [group], resolve("apoz"), data=[(x, None)])
    assert scores.unique().numel() == 8
    with torch.no_grad():
        fires = (model[0](x) > 0).double().mean((0, 2, 3))
    torch.testing.assert_close(scores, fires / fires.mean())


def test_criteria_declare_what_they_need():
    need = {name: resolve(name).requires.value for name in ("l1", "filter_norm", "random", "bn_scale")}
    assert set(need.values()) == {"weights"}
    assert resolve("taylor").requires.value == "loss" and resolve("gradient").requires.value == "loss"
    assert resolve("apoz").requires.value == "data" and resolve("wanda").requires.value == "data"


def test_random_draws_through_its_public_method():
    crit = tp.importance.Random(seed=3)
    first = crit.sample(5)
    crit.reset()
    assert torch.equal(crit.sample(5), first) and first.dtype == torch.float64


def test_a_criterion_without_a_channel_form_is_refused_by_name():
    model, x = _two_neurons()
    with pytest.raises(ValueError, match="has no structured form"):
        tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x, importance="wanda", data=[(x, None)])
