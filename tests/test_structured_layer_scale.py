"""Layer scale (ConvNeXt's and CaiT's ``x + self.gamma * f(x)``): a parameter of the model used
directly as an operand of an elementwise op is a member of the channel group along the dim it
varies on, sliced with it; a tensor built in forward (not a parameter or buffer) still freezes."""

import copy

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.importance import resolve
from torchprune.structured import DependencyGraph
from torchprune.structured.channels import choose_removal
from torchprune.structured.plan import apply_plan, plan_from_removed, zero_channels

from conftest import by_fx
from error_bounds import assert_same_function

C = 8


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, BatchNorm, 1x1 convs, ``x = shortcut + gamma * y`` in NCHW; ``layout`` says
    how gamma meets y: held as (C, 1, 1), or held as (C,) and viewed or indexed to (1, C, 1, 1)."""

    def __init__(self, layout="c11", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layout = layout
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.dw = nn.Conv2d(C, C, 7, padding=3, groups=C)
        self.norm = nn.BatchNorm2d(C)
        self.pw1, self.pw2 = nn.Conv2d(C, 4 * C, 1), nn.Conv2d(4 * C, C, 1)
        self.gamma = nn.Parameter(torch.rand((C, 1, 1) if layout == "c11" else (C,)) + 0.5)
        self.head = nn.Linear(C, 2)
        with torch.no_grad():  # running statistics away from 0 and 1, so that zeroing shows
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, x):
        x = self.stem(x)
        y = self.pw2(torch.relu(self.pw1(self.norm(self.dw(x)))))
        if self.layout == "c11":
            y = self.gamma * y
        elif self.layout == "view":
            y = y.mul(self.gamma.view(1, -1, 1, 1))
        else:
            y = y * self.gamma[:, None, None]
        return self.head((x + y).mean((2, 3)))


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's own layout: depthwise conv, permute, LayerNorm and Linears over the last dim,
    ``gamma`` of shape (C,)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.dw = nn.Conv2d(C, C, 7, padding=3, groups=C)
        self.norm = nn.LayerNorm(C)
        self.pw1, self.pw2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.gamma = nn.Parameter(torch.rand(C) + 0.5)
        self.head = nn.Linear(C, 2)

    def forward(self, x):
        x = self.stem(x)
        y = self.pw2(torch.relu(self.pw1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        return self.head((x + (self.gamma * y).permute(0, 3, 1, 2)).mean((2, 3)))


class CaiTBlock(nn.Module):
    """``x + self.gamma_1 * mlp(x)`` on the hidden dim of tokens, with Linears."""

    def __init__(self, seed=0, constant=False, buffer=False):
        super().__init__()
        torch.manual_seed(seed)
        self.constant = constant
        self.embed = nn.Linear(5, C)
        self.fc1, self.fc2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)
        if buffer:  # a fixed per-channel scale held as a buffer is a member too
            self.register_buffer("gamma_1", torch.rand(C) + 0.5)
        else:
            self.gamma_1 = nn.Parameter(torch.rand(C) + 0.5)
        self.head = nn.Linear(C, 2)

    def forward(self, x):
        x = self.embed(x)
        scale = torch.linspace(0.5, 1.5, C) if self.constant else self.gamma_1  # built here: no unit owns it
        return self.head(x + scale * self.fc2(torch.relu(self.fc1(x))))


def image():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def tokens():
    return torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))


def group_of(graph, member):
    return next(g for g in graph.groups if member in g.indices)


CASES = [
    pytest.param(lambda: ConvNeXtBlock("c11"), image, ("", "gamma", 0), id="convnext-c11"),
    pytest.param(lambda: ConvNeXtBlock("view"), image, ("", "gamma", 0), id="convnext-view"),
    pytest.param(lambda: ConvNeXtBlock("index"), image, ("", "gamma", 0), id="convnext-index"),
    pytest.param(CaiTBlock, tokens, ("", "gamma_1", 0), id="cait"),
    pytest.param(lambda: CaiTBlock(buffer=True), tokens, ("", "gamma_1", 0), id="cait-buffer"),
]


@pytest.mark.parametrize("build, inputs, member", CASES)
@pytest.mark.parametrize("tracing", ["record", "fx"])
def test_layer_scale_is_sliced_with_its_channels(build, inputs, member, tracing):
    model, x = build(), inputs()
    graph = DependencyGraph(model, x) if tracing == "record" else by_fx(model, x)
    group = group_of(graph, member)
    assert group.prunable and group.exact and len(group) == C
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    gamma = getattr(pruned, member[1])
    assert gamma.shape[0] == C // 2 and gamma.shape[1:] == getattr(model, member[1]).shape[1:]
    with torch.no_grad():
        assert_same_function(pruned, masked, x)
    pruned(x).sum().backward()
    assert not gamma.requires_grad or gamma.grad.shape == gamma.shape


@pytest.mark.parametrize("build, inputs, member", CASES)
def test_pruned_layer_scale_saves_and_loads(build, inputs, member, tmp_path):
    model, x = build(), inputs()
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    assert getattr(model, member[1]).shape[0] == C // 2
    tp.save(model, tmp_path / "pruned.pt")
    fresh = tp.load(tmp_path / "pruned.pt", build())
    assert getattr(fresh, member[1]).shape == getattr(model, member[1]).shape
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_channels_last_layer_scale_with_a_layer_norm():
    """The LayerNorm makes removal differ from zeroing (it normalizes over the channels), but the
    group is prunable and gamma goes with it."""
    model, x = ChannelsLastBlock(), image()
    group = group_of(DependencyGraph(model, x), ("", "gamma", 0))
    assert group.prunable and ("norm", "weight", 0) in group.indices
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    assert model.gamma.shape == (C // 2,) and model.norm.weight.shape == (C // 2,)
    model(x).sum().backward()
    assert model.gamma.grad.shape == (C // 2,)


def test_a_tensor_built_in_forward_still_freezes():
    model, x = CaiTBlock(constant=True), tokens()
    group = group_of(DependencyGraph(model, x), ("fc2", "weight", 0))
    assert not group.prunable
    assert any("unpruned tensor" in reason for reason in group.reasons)
    with pytest.warns(UserWarning, match="unpruned tensor"):
        tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    assert model.fc2.weight.shape[0] == C
