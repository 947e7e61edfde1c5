"""Grouped convolutions (ResNeXt, RegNet) and GroupNorm in channel pruning (issue 15): channel j of
every group is one unit, so every group loses the same channels and ``groups`` / ``num_groups``
stay valid. Removal equals zeroing through a grouped conv; GroupNorm normalizes over its group's
channels, so its units are prunable but inexact."""

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


class ResNeXtBlock(nn.Module):
    """1x1 conv, grouped 3x3 conv (``groups`` groups), 1x1 conv, residual, as in ResNeXt and RegNet."""

    def __init__(self, width=32, groups=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.reduce, self.bn1 = nn.Conv2d(16, width, 1, bias=False), nn.BatchNorm2d(width)
        self.grouped, self.bn2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(width)
        self.expand, self.bn3 = nn.Conv2d(width, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 3)
        for bn in (self.bn1, self.bn2, self.bn3):  # statistics away from 0 and 1, so that zeroing shows
            with torch.no_grad():
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn1(self.reduce(x)))
        y = torch.relu(self.bn2(self.grouped(y)))
        return self.head(torch.relu(x + self.bn3(self.expand(y))).mean((2, 3)))


class GroupNormNet(nn.Module):
    """A conv and a GroupNorm of ``num_groups`` groups, then a 1x1 conv."""

    def __init__(self, affine=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.norm = nn.Conv2d(3, 12, 3, padding=1), nn.GroupNorm(3, 12, affine=affine)
        self.out = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.conv(x)))).mean((2, 3))


class Multiplier(nn.Module):
    """A depthwise conv with a channel multiplier (groups = in = out / 2) after a conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 12, 3, padding=1, groups=6)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(torch.relu(self.dw(torch.relu(self.conv(x)))).mean((2, 3)))


def image(seed=0):
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def group_of(graph, member):
    return next(g for g in graph.groups if member in g.indices)


@pytest.mark.parametrize("tracing", ["record", "fx"])
@pytest.mark.parametrize("width,groups", [(32, 4), (32, 8), (24, 3), (32, 16)])
def test_grouped_conv_units_cover_one_channel_of_every_group(tracing, width, groups):
    model, x = ResNeXtBlock(width, groups), image()
    graph = DependencyGraph(model, x) if tracing == "record" else by_fx(model, x)
    per_group = width // groups
    for member in (("reduce", "weight", 0), ("grouped", "weight", 0)):
        g = group_of(graph, member)
        assert g.prunable and g.exact and len(g) == per_group, member
        rows = g.indices[member]  # (units, groups): row j of every group
        assert rows.shape == (per_group, groups)
        assert torch.equal(rows - rows[:, :1], (torch.arange(groups) * per_group).expand_as(rows))
    assert group_of(graph, ("reduce", "weight", 0)).indices[("grouped", "weight", 1)].shape == (per_group, 1)


@pytest.mark.parametrize("tracing", ["record", "fx"])
@pytest.mark.parametrize("width,groups", [(32, 4), (24, 3)])
def test_removal_through_a_grouped_conv_equals_zeroing(tracing, width, groups):
    model, x = ResNeXtBlock(width, groups), image()
    graph = DependencyGraph(model, x) if tracing == "record" else by_fx(model, x)
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    kept = width - (width // groups // 2) * groups  # half the units of width // groups channels each
    assert pruned.grouped.groups == groups
    assert pruned.grouped.in_channels == pruned.grouped.out_channels == kept == pruned.reduce.out_channels
    assert pruned.grouped.weight.shape == (kept, kept // groups, 3, 3) and pruned.bn2.num_features == kept
    with torch.no_grad():
        assert_same_function(pruned, masked, x)


def test_prune_a_grouped_block_end_to_end(tmp_path):
    model, x = ResNeXtBlock(32, 4), image()
    before = sum(p.numel() for p in model.parameters())
    tp.prune(model, 0.5, granularity="channel", importance="l2", example_inputs=x)
    assert model.grouped.groups == 4 and model.grouped.out_channels == 16 and model.stem.out_channels == 8
    assert sum(p.numel() for p in model.parameters()) < 0.4 * before
    model(x).sum().backward()
    assert model.grouped.weight.grad.shape == model.grouped.weight.shape
    tp.save(model, tmp_path / "pruned.pt")
    fresh = tp.load(tmp_path / "pruned.pt", ResNeXtBlock(32, 4))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_a_grouped_conv_on_the_model_input_keeps_its_inputs_and_prunes_its_outputs():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 2, 1))
    x = torch.randn(2, 4, 6, 6)
    tp.prune(model, 0.5, granularity="channel", example_inputs=x)
    assert (model[0].in_channels, model[0].out_channels, model[0].groups) == (4, 4, 2)
    assert model[2].in_channels == 4
    assert model(x).shape == (2, 2, 4, 4)


def test_a_channel_fixed_in_one_group_only_is_frozen_in_all():
    """Half of the grouped conv's input comes straight from the model input (unowned): channel j
    of the first group can't go, so channel j of the second group can't either."""

    class Half(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.grouped = nn.Conv2d(8, 8, 1, groups=2)

        def forward(self, x):
            return self.grouped(torch.cat([x[:, :1].expand(-1, 4, -1, -1), self.conv(x)], 1))

    graph = DependencyGraph(Half(), image())
    g = group_of(graph, ("conv", "weight", 0))
    assert not g.prunable and any("fixed in some of its groups" in r for r in g.reasons)


@pytest.mark.parametrize("tracing", ["record", "fx"])
def test_group_norm_units_and_removal(tracing):
    model, x = GroupNormNet(), image()
    graph = DependencyGraph(model, x) if tracing == "record" else by_fx(model, x)
    g = group_of(graph, ("norm", "weight", 0))
    assert g.prunable and not g.exact and len(g) == 4  # 12 channels in 3 groups
    assert any("GroupNorm" in r for r in g.inexact_reasons)
    rows = g.indices[("conv", "weight", 0)]
    assert torch.equal(rows - rows[:, :1], (torch.arange(3) * 4).expand_as(rows))
    tp.prune(model, 0.5, granularity="channel", example_inputs=x)
    assert (model.norm.num_groups, model.norm.num_channels, model.norm.weight.shape) == (3, 6, (6,))
    assert model.conv.out_channels == model.out.in_channels == 6
    model(x).sum().backward()


def test_group_norm_without_affine_weights_still_prunes():
    model, x = GroupNormNet(affine=False), image()
    tp.prune(model, 0.5, granularity="channel", example_inputs=x)
    assert model.conv.out_channels == 6 and model.out.in_channels == 6
    assert model(x).shape == (2, 4)


def test_a_depthwise_conv_with_a_channel_multiplier_prunes_its_multiplier_channels():
    model, x = Multiplier(), image()
    graph = DependencyGraph(model, x)
    g = group_of(graph, ("dw", "weight", 0))
    assert g.prunable and len(g) == 2  # output j of every group: the 2 multiplier channels
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    assert (pruned.dw.groups, pruned.dw.in_channels, pruned.dw.out_channels) == (6, 6, 6)
    with torch.no_grad():
        assert_same_function(pruned, masked, x)


class GroupNormAct(nn.GroupNorm):
    """timm's GroupNormAct: a GroupNorm subclass whose forward calls F.group_norm with its own
    weight and bias, then an activation (traced through, not kept whole)."""

    def forward(self, x):
        return torch.relu(nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class FunctionalGroupNormNet(GroupNormNet):
    def __init__(self):
        super().__init__()
        self.norm = GroupNormAct(3, 12)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("tracing", ["record", "fx"])
def test_functional_group_norm_in_a_custom_module(tracing):
    model, x = FunctionalGroupNormNet(), image()
    graph = DependencyGraph(model, x) if tracing == "record" else by_fx(model, x)
    g = group_of(graph, ("norm", "weight", 0))
    assert g.prunable and not g.exact and len(g) == 4
    assert g.indices.keys() >= {("conv", "weight", 0), ("norm", "bias", 0), ("out", "weight", 1)}
    tp.prune(model, 0.5, granularity="channel", example_inputs=x)
    assert model.norm.weight.shape == (6,) and model.conv.out_channels == 6
    assert model.norm.num_channels == 6  # resized as an nn.GroupNorm (the table's lookup follows the MRO)
    assert model(x).shape == (2, 4)


class AuxHead(nn.Module):
    """GoogLeNet's and Inception's pattern: an auxiliary classifier that runs only in training."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.body = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.aux = nn.Conv2d(8, 2, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        aux = self.aux(x).mean((2, 3)) if self.training else None
        y = self.head(torch.relu(self.body(x)).mean((2, 3)))
        return (y, aux) if self.training else y


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_training_only_branch_is_pruned_with_the_rest(mode):
    """Pruned in eval mode, the run does not reach the auxiliary head; the symbolic trace in train
    mode does, so its conv loses the stem's channels too (it used to keep them, and the pruned model
    failed in training)."""
    model, x = AuxHead().train(mode == "train"), image()
    tp.prune(model, 0.5, granularity="channel", example_inputs=x)
    assert model.stem.out_channels == model.aux.in_channels == model.body.in_channels == 4
    model.train()
    y, aux = model(x)
    (y.sum() + aux.sum()).backward()
    assert model.eval()(x).shape == (2, 2)


def test_a_module_that_never_runs_is_named_in_a_warning():
    class Unused(AuxHead):
        def forward(self, x):
            return self.head(torch.relu(self.body(torch.relu(self.stem(x)))).mean((2, 3)))

    with pytest.warns(UserWarning, match=r"neither ran on `example_inputs` nor appear in torch.fx's trace: \['aux'\]"):
        tp.prune(Unused().eval(), 0.5, granularity="channel", example_inputs=image())
