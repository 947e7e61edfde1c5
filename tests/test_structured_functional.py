"""Functional forms of layers called by custom modules with their own tensors (timm's BatchNormAct2d
calls ``F.batch_norm``, ConvNeXt's LayerNorm2d ``F.layer_norm`` between permutes, BART's scaled
embedding ``F.embedding``): the tensors passed are members of the channel group, as in the layer."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp
from torchprune.importance import resolve
from torchprune.structured import DependencyGraph
from torchprune.structured.channels import choose_removal
from torchprune.structured.plan import apply_plan, plan_from_removed, zero_channels

from conftest import by_fx
from error_bounds import assert_same_function

C = 8


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's: a BatchNorm2d whose forward calls F.batch_norm with its own tensors, then an activation;
    ``constant`` passes a weight built in forward instead."""

    def __init__(self, channels, constant=False):
        super().__init__(channels)
        self.constant = constant

    def forward(self, x):
        weight = torch.linspace(0.5, 1.5, self.num_features) if self.constant else self.weight
        x = F.batch_norm(x, self.running_mean, self.running_var, weight, self.bias, self.training, 0.1, self.eps)
        return torch.relu(x)


class BatchNormNet(nn.Module):
    def __init__(self, constant=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.bn = nn.Conv2d(3, C, 3, padding=1), BatchNormAct2d(C, constant)
        self.conv2, self.head = nn.Conv2d(C, C, 3, padding=1), nn.Linear(C, 2)
        with torch.no_grad():  # statistics and affine away from 0 and 1, so that zeroing shows
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 1.5)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)
        self.eval()

    def forward(self, x):
        return self.head(self.conv2(self.bn(self.conv1(x))).mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's: a LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class LayerNormNet(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.norm = nn.Conv2d(3, C, 3, padding=1), LayerNorm2d(C)
        self.conv2, self.head = nn.Conv2d(C, C, 1), nn.Linear(C, 2)

    def forward(self, x):
        return self.head(self.conv2(self.norm(self.conv1(x))).mean((2, 3)))


class ScaledEmbedding(nn.Embedding):
    """BART's: an nn.Embedding whose forward calls F.embedding and scales the result."""

    def forward(self, ids):
        return F.embedding(ids, self.weight, self.padding_idx) * 2.0


class EmbeddingNet(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = ScaledEmbedding(10, C, padding_idx=0)
        self.fc1, self.fc2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, 2)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.embed(ids)))).mean(1)


def image():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def token_ids():
    return torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(0))


def group_of(graph, member):
    return next(g for g in graph.groups if member in g.indices)


BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


@pytest.mark.parametrize("tracing", ["record", "fx"])
def test_functional_batch_norm_is_sliced_with_its_channels(tracing):
    model, x = BatchNormNet(), image()
    graph = DependencyGraph(model, x) if tracing == "record" else by_fx(model, x)
    group = group_of(graph, ("conv1", "weight", 0))
    assert group.prunable and group.exact and len(group) == C
    assert all(("bn", t, 0) in group.indices for t in BN_TENSORS)
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    assert pruned.conv1.weight.shape[0] < C
    assert all(getattr(pruned.bn, t).shape == (pruned.conv1.weight.shape[0],) for t in BN_TENSORS)
    with torch.no_grad():
        assert_same_function(pruned, masked, x)
    pruned(x).sum().backward()
    assert pruned.bn.weight.grad.shape == pruned.bn.weight.shape


def test_pruned_functional_batch_norm_saves_and_loads(tmp_path):
    model, x = BatchNormNet(), image()
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    assert model.bn.running_var.shape[0] < C and model.bn.num_features == model.bn.running_var.shape[0]
    tp.save(model, tmp_path / "pruned.pt")
    fresh = tp.load(tmp_path / "pruned.pt", BatchNormNet())
    assert fresh.bn.running_mean.shape == model.bn.running_mean.shape
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_a_tensor_built_in_forward_passed_to_batch_norm_still_freezes():
    model, x = BatchNormNet(constant=True), image()
    group = group_of(DependencyGraph(model, x), ("conv1", "weight", 0))
    assert not group.prunable
    assert any("batch_norm" in reason and "unpruned tensor" in reason for reason in group.reasons)


@pytest.mark.parametrize("tracing", ["record", "fx"])
def test_functional_layer_norm_is_pruned_with_its_channels(tracing):
    """As for nn.LayerNorm: prunable, not exact (it normalizes over the channels), weight and bias go."""
    model, x = LayerNormNet(), image()
    graph = DependencyGraph(model, x) if tracing == "record" else by_fx(model, x)
    group = group_of(graph, ("conv1", "weight", 0))
    assert group.prunable and not group.exact
    assert ("norm", "weight", 0) in group.indices and ("norm", "bias", 0) in group.indices
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    assert model.norm.weight.shape == model.norm.bias.shape == (model.conv1.weight.shape[0],)
    assert model.conv1.weight.shape[0] < C and model.norm.normalized_shape == (model.conv1.weight.shape[0],)
    model(x).sum().backward()
    assert model.norm.weight.grad.shape == model.norm.weight.shape


def test_functional_layer_norm_over_several_dims_freezes():
    class Net(LayerNormNet):
        def forward(self, x):
            y = self.conv1(x)
            y = F.layer_norm(y, y.shape[1:], None, None)
            return self.head(self.conv2(y).mean((2, 3)))

    group = group_of(DependencyGraph(Net(), image()), ("conv1", "weight", 0))
    assert not group.prunable
    assert any("layer_norm" in reason and "several dims" in reason for reason in group.reasons)


@pytest.mark.parametrize("tracing", ["record", "fx"])
def test_functional_embedding_is_pruned_with_the_width(tracing):
    model, x = EmbeddingNet(), token_ids()
    graph = DependencyGraph(model, x) if tracing == "record" else by_fx(model, x)
    group = group_of(graph, ("embed", "weight", 1))
    assert group.prunable and group.exact and ("fc1", "weight", 1) in group.indices
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    assert pruned.embed.weight.shape[0] == 10 and pruned.embed.weight.shape[1] < C
    assert pruned.embed.embedding_dim == pruned.embed.weight.shape[1]
    with torch.no_grad():
        assert_same_function(pruned, masked, x)
    pruned(x).sum().backward()
