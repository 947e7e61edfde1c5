"""F.pad, F.interpolate (and nn.Upsample), F.normalize and addcmul in channel pruning (issue 15): ops that leave the
channel dim alone pass its channels on (they used to freeze them: "has no pruning rule")."""

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


class Net(nn.Module):
    """conv -> op -> conv, with the op in the middle chosen by ``kind``."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 2, 3)
        self.up = nn.Upsample(scale_factor=2, mode="nearest") if kind == "upsample" else None

    def forward(self, x):
        y = torch.relu(self.a(x))
        if self.kind == "pad":
            y = F.pad(y, (1, 2, 0, 1), mode="reflect")
        elif self.kind == "pad-constant":
            y = F.pad(y, (1, 1, 1, 1), value=0.5)
        elif self.kind == "interpolate":
            y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        elif self.kind == "upsample":
            y = self.up(y)
        elif self.kind == "normalize":
            y = F.normalize(y, dim=1)
        elif self.kind == "addcmul":
            y = torch.addcmul(y, torch.tanh(self.b(x)), torch.sigmoid(self.c(x)), value=0.5)
        elif self.kind == "addcdiv-method":
            y = y.addcdiv(torch.tanh(self.b(x)), torch.sigmoid(self.c(x)) + 1.0)
        return self.out(y).mean((2, 3))


KINDS = ["pad", "pad-constant", "interpolate", "upsample", "normalize", "addcmul", "addcdiv-method"]


def image():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tracing", ["record", "fx"])
@pytest.mark.parametrize("kind", KINDS)
def test_channels_pass_through_and_removal_equals_zeroing(kind, tracing):
    model, x = Net(kind), image()
    graph = DependencyGraph(model, x) if tracing == "record" else by_fx(model, x)
    g = next(g for g in graph.groups if ("a", "weight", 0) in g.indices)
    assert g.prunable and g.exact and ("out", "weight", 1) in g.indices, g
    if kind.startswith("add"):
        assert {("b", "weight", 0), ("c", "weight", 0)} <= set(g.indices)
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    assert pruned.a.out_channels == pruned.out.in_channels == 4
    with torch.no_grad():
        assert_same_function(pruned, masked, x)


def test_padding_the_channel_dim_freezes_it():
    class PadChannels(Net):
        def forward(self, x):
            return self.out(F.pad(torch.relu(self.a(x)), (0, 0, 0, 0, 1, 1))[:, 1:-1]).mean((2, 3))

    graph = DependencyGraph(PadChannels("pad"), image())
    g = next(g for g in graph.groups if ("a", "weight", 0) in g.indices)
    assert not g.prunable and any("pad of a pruned dim" in r for r in g.reasons)


@pytest.mark.parametrize("kind", KINDS)
def test_prune_end_to_end(kind):
    model, x = Net(kind), image()
    tp.prune(model, 0.5, granularity="channel", example_inputs=x)
    assert model.a.out_channels == 4
    model(x).sum().backward()
