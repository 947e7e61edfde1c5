"""torchprune/layer_types.py: the one table of layer types, its lookup, and a user-registered layer
pruned end to end."""

import copy

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune import layer_types
from torchprune.masking import MaskedLinear
from torchprune.structured import DependencyGraph
from torchprune.structured.channels import choose_removal
from torchprune.structured.plan import zero_channels


class Affine(nn.Module):
    """A Linear-like layer with its own forward: torch.addmm, which the tracer has no rule for."""

    def __init__(self, features: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, features) / features**0.5)
        self.bias = nn.Parameter(torch.randn(width))
        self.width = width

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight.t())


class Unregistered(Affine):
    pass


class Registered(Affine):
    pass


layer_types.register_layer_type(Registered, inputs=[("weight", 1)], outputs=[("weight", 0), ("bias", 0)],
                                resize=lambda m: setattr(m, "width", m.weight.shape[0]))


def _model(layer):
    torch.manual_seed(0)
    return nn.Sequential(layer(8, 16), nn.ReLU(), layer(16, 12), nn.Tanh(), nn.Linear(12, 3)).eval()


def test_a_registered_layer_type_is_pruned_and_removal_equals_zeroing():
    model, x = _model(Registered), torch.randn(4, 8)
    graph = DependencyGraph(model, x)
    assert len(graph.prunable_groups) == 2
    removed = choose_removal(model, graph, 0.5, tp.importance.resolve("l2"))
    zeroed = copy.deepcopy(model)
    zero_channels(zeroed, removed)
    tp.prune(model, sparsity=0.5, granularity="channel", importance="l2", example_inputs=x)
    assert [model[0].width, model[2].width] == [8, 6]
    assert model[2].weight.shape == (6, 8) and model[4].in_features == 6
    with torch.no_grad():
        torch.testing.assert_close(model(x), zeroed(x), rtol=1e-5, atol=1e-6)


def test_an_unregistered_layer_type_keeps_its_channels():
    model, x = _model(Unregistered), torch.randn(4, 8)
    assert not DependencyGraph(model, x).prunable_groups


def test_a_registered_layer_is_replayed_by_load(tmp_path):
    model, x = _model(Registered), torch.randn(4, 8)
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    tp.save(model, tmp_path / "m.pt")
    fresh = _model(Registered)
    tp.load(tmp_path / "m.pt", fresh)
    assert fresh[2].width == 6
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_lookup_is_by_exact_type_then_mro():
    linear = layer_types.lookup(nn.Linear)
    assert layer_types.lookup(MaskedLinear) is linear
    assert layer_types.lookup(Registered) is not None and layer_types.lookup(Unregistered) is None
    assert layer_types.is_registered(nn.Linear) and not layer_types.is_registered(MaskedLinear)
    assert layer_types.lookup(nn.ReLU) is None


def test_scoring_facts():
    conv, bn, ln = nn.Conv2d(3, 4, 3), nn.BatchNorm3d(4), nn.LayerNorm(4)
    assert layer_types.output_channel_dim(conv, "weight", 0) == 1
    assert layer_types.output_channel_dim(conv, "weight", 1) is None
    assert layer_types.output_channel_dim(nn.Linear(3, 4), "weight", 0) == -1
    assert layer_types.output_channel_dim(ln, "weight", 0) == -1
    assert layer_types.scale_tensor(bn) == "weight" and layer_types.scale_tensor(conv) is None
    assert layer_types.is_scorable_weight(conv, "weight", conv.weight)
    assert not layer_types.is_scorable_weight(conv, "bias", conv.bias)
    assert not layer_types.is_scorable_weight(bn, "weight", bn.weight)
    assert layer_types.is_scorable_weight(nn.Module(), "token", torch.zeros(1, 1, 4))
    assert nn.BatchNorm3d in layer_types.BATCH_NORMS and nn.LayerNorm in layer_types.NORMS


def test_register_layer_type_checks_its_arguments():
    with pytest.raises(TypeError, match="subclass of torch.nn.Module"):
        layer_types.register_layer_type(int)
    with pytest.raises(ValueError, match="`couple` must be"):
        layer_types.register_layer_type(Unregistered, couple="diagonal")
    assert layer_types.lookup(Unregistered) is None

