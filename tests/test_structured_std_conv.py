"""timm's weight-standardized convs (StdConv2d in ResNetV2/BiT, ScaledStdConv2d in NFNet) in channel
pruning (issue 15): nn.Conv2d subclasses whose forward standardizes the weight per output channel
(F.batch_norm over its inputs) before F.conv2d. They froze every channel they touched ("reshape_as
has no pruning rule"); now they are kept whole and labelled as convs through their layer-type entry
(keyed by timm's qualified names, so timm is not needed): output channels are exact, input
channels inexact, since removing one changes the statistics the other weights are standardized
with. timm's Linear and Conv2dSame, which call F.linear / F.conv2d with their own weight, are the
layers they subclass. Stand-ins carry timm's module path."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp
from torchprune.importance import resolve
from torchprune.structured.channels import choose_removal
from torchprune.structured.graph import DependencyGraph
from torchprune.structured.plan import apply_plan, plan_from_removed, zero_channels

from error_bounds import assert_same_function


class StdConv2d(nn.Conv2d):
    """timm.layers.std_conv.StdConv2d's forward."""

    def __init__(self, *args, eps=1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm.layers.std_conv.ScaledStdConv2d's forward: a gain per output channel."""

    def __init__(self, cin, cout, k, **kwargs):
        super().__init__(cin, cout, k, **kwargs)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)
        self.scale, self.eps = (cin * k * k) ** -0.5, 1e-6

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


for _cls in (StdConv2d, ScaledStdConv2d):
    _cls.__module__ = "timm.layers.std_conv"  # what the layer-type table keys them by


class Net(nn.Module):
    """std conv -> plain conv (exact: only the std conv's outputs go) -> scaled std conv (inexact:
    its inputs go) -> head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = StdConv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = ScaledStdConv2d(8, 12, 3, padding=1)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h = F.relu(self.b(F.relu(self.a(x))))
        return self.head(F.relu(self.c(h)).mean((2, 3)))


def image():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def group_of(graph, member):
    return next(g for g in graph.groups if member in g.indices)


def test_outputs_are_exact_and_inputs_inexact():
    model, x = Net().double(), image()
    graph = DependencyGraph(model, x)
    a_out, b_out, c_out = (group_of(graph, (n, "weight", 0)) for n in "abc")
    assert a_out.prunable and a_out.exact and ("b", "weight", 1) in a_out.indices
    assert b_out.prunable and not b_out.exact and ("c", "weight", 1) in b_out.indices
    assert c_out.prunable and c_out.exact and ("c", "gain", 0) in c_out.indices


def test_removing_the_exact_channels_equals_zeroing_them():
    model, x = Net().double(), image()
    graph = DependencyGraph(model, x)
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    zeroed = copy.deepcopy(model)
    zero_channels(zeroed, removed)
    apply_plan(model, plan_from_removed(model, removed))
    assert (model.a.out_channels, model.b.in_channels, model.c.out_channels, tuple(model.c.gain.shape)) == (
        4, 4, 6, (6, 1, 1, 1))
    assert model.b.out_channels == model.c.in_channels == 8  # inexact: left by only_exact
    assert_same_function(model, zeroed, x)


def test_prune_trains_and_reloads(tmp_path):
    model, x = Net().double(), image()
    tp.prune(model, 0.5, granularity="channel", example_inputs=x)
    assert (model.a.out_channels, model.b.out_channels, model.c.in_channels, model.c.out_channels) == (4, 4, 4, 6)
    model.train()
    model(x).square().mean().backward()
    assert model.c.gain.grad.shape == (6, 1, 1, 1)
    model.eval()
    tp.save(model, tmp_path / "pruned.pt")
    fresh = tp.load(tmp_path / "pruned.pt", Net().double())
    assert_same_function(fresh, model, x)


class Linear(nn.Linear):
    """timm.layers.linear.Linear: F.linear with its own weight (timm's classifiers)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Conv2dSame(nn.Conv2d):
    """timm.layers.conv2d_same.Conv2dSame: "same" padding of the spatial dims, then F.conv2d."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


Linear.__module__, Conv2dSame.__module__ = "timm.layers.linear", "timm.layers.conv2d_same"


class Head(nn.Module):
    """A MobileNetV3-style head: conv, global pool, conv_head, timm's Linear classifier."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.conv_head, self.classifier = Conv2dSame(3, 8, 3), nn.Conv2d(8, 16, 1), Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.stem(x)).mean((2, 3), keepdim=True)
        return self.classifier(F.relu(self.conv_head(h)).flatten(1))


def test_timm_functional_subclasses_are_their_layers():
    model, x = Head().double(), image()
    graph = DependencyGraph(model, x)
    head = group_of(graph, ("conv_head", "weight", 0))
    assert head.prunable and head.exact and ("classifier", "weight", 1) in head.indices
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    zeroed = copy.deepcopy(model)
    zero_channels(zeroed, removed)
    apply_plan(model, plan_from_removed(model, removed))
    assert (model.stem.out_channels, model.conv_head.out_channels, model.classifier.in_features) == (4, 8, 8)
    assert_same_function(model, zeroed, x)
