"""DependencyGraph: the groups it finds on the zoo and on hand-made cases, and what it refuses."""

import numpy as np
import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.structured import DependencyGraph

import zoo
from conftest import by_fx


def group_of(graph, member):
    return next(g for g in graph.groups if member in g.indices)


def test_vgg_groups_follow_bn_and_flatten():
    model, x = zoo.build("vgg")
    graph = DependencyGraph(model, x)
    g = group_of(graph, ("features.7", "weight", 0))
    assert g.prunable and len(g) == 16
    assert g.indices[("classifier.0", "weight", 1)].shape == (16, 16)  # each channel owns 4*4 features
    assert ("features.8", "running_var", 0) in g.indices
    assert not group_of(graph, ("classifier.3", "weight", 0)).prunable  # the model output


def test_residual_stream_is_one_group():
    model, x = zoo.build("resnet_basic")
    graph = DependencyGraph(model, x)
    g = group_of(graph, ("stem.0", "weight", 0))
    for member in [("layers.0.conv2", "weight", 0), ("layers.1.conv2", "weight", 0),
                   ("layers.2.downsample.0", "weight", 1)]:
        assert member in g.indices


def test_depthwise_and_gating_couple_channels():
    model, x = zoo.build("mobilenetv2")
    graph = DependencyGraph(model, x)
    g = group_of(graph, ("blocks.1.conv.0", "weight", 0))
    for member in [("blocks.1.conv.3", "weight", 0), ("blocks.1.conv.6.fc2", "weight", 0),
                   ("blocks.1.conv.6.fc1", "weight", 1), ("blocks.1.conv.7", "weight", 1)]:
        assert member in g.indices


def test_concat_offsets():
    model, x = zoo.build("concat")
    graph = DependencyGraph(model, x)
    b3 = group_of(graph, ("inception.b3.2", "weight", 0))
    # the 3x3 branch sits after the 4 channels of the 1x1 branch in the concatenation
    assert b3.indices[("dense.0.conv", "weight", 1)].flatten().tolist() == list(range(4, 10))


def test_attention_is_reported_not_broken():
    model, x = zoo.build("vit")
    graph = DependencyGraph(model, x)
    stream = group_of(graph, ("patch", "weight", 0))
    for member in [("", "cls_token", 2), ("", "pos_embed", 2), ("blocks.0.attn", "in_proj_weight", 1),
                   ("blocks.1.attn.out_proj", "weight", 0), ("head", "weight", 1)]:
        assert member in stream.indices
    assert stream.prunable and not stream.exact
    assert group_of(graph, ("blocks.0.mlp.fc1", "weight", 0)).prunable
    # inside: position j of every head's q and k is one unit, of every head's v (with out_proj's column) another
    inner = [g for g in graph.groups if ("blocks.0.attn", "in_proj_weight", 0) in g.indices]
    assert len(inner) == 2 and all(g.prunable and g.exact and len(g) == 4 for g in inner)
    qk, v = sorted(inner, key=lambda g: ("blocks.0.attn.out_proj", "weight", 1) in g.indices)
    assert qk.indices[("blocks.0.attn", "in_proj_weight", 0)][1].tolist() == [1, 5, 9, 13, 17, 21, 25, 29]
    assert v.indices[("blocks.0.attn", "in_proj_weight", 0)][1].tolist() == [33, 37, 41, 45]
    assert v.indices[("blocks.0.attn.out_proj", "weight", 1)][1].tolist() == [1, 5, 9, 13]
    model, x = zoo.build("transformer")
    graph = DependencyGraph(model, x)
    qkv = [g for g in graph.groups if ("blocks.0.attn.qkv", "weight", 0) in g.indices]
    assert qkv and not any(g.prunable for g in qkv)  # fixed reshape to (3, heads, head_dim)
    stream = group_of(graph, ("embed", "weight", 1))
    assert stream.prunable and not stream.exact  # LayerNorm normalizes over it
    assert ("", "pos", 2) in stream.indices


class Unknown(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=1)


class WithUnknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=-1))


def test_unknown_op_freezes_what_reaches_it():
    graph = DependencyGraph(WithUnknown(), torch.randn(2, 4))
    g = group_of(graph, ("a", "weight", 0))
    assert not g.prunable and any("cumsum" in r for r in g.reasons)


class HardCodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(self.conv(x).view(-1, 4 * 8 * 8))


class SizeRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.size(0), y.size(1), -1).mean(-1))


def test_fixed_sizes_are_detected():
    graph = DependencyGraph(HardCodedView(), torch.randn(2, 3, 8, 8))
    assert not group_of(graph, ("conv", "weight", 0)).prunable
    graph = DependencyGraph(SizeRead(), torch.randn(2, 3, 8, 8))
    assert not group_of(graph, ("conv", "weight", 0)).prunable


def test_grouped_conv_output_channel_j_of_every_group_is_one_unit():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 2, 1))
    graph = DependencyGraph(model, torch.randn(1, 4, 6, 6))
    g = group_of(graph, ("0", "weight", 0))
    assert g.prunable and g.exact and len(g) == 4  # 8 output channels in 2 groups: 4 units of 2
    rows = g.indices[("0", "weight", 0)]  # (units, k): unit j holds row j of each group
    assert rows.shape == (4, 2) and torch.equal(rows[:, 1] - rows[:, 0], torch.full((4,), 4))
    assert torch.equal(rows, g.indices[("2", "weight", 1)])


def test_untraceable_model_is_recorded_or_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    assert DependencyGraph(Branchy(), torch.ones(2, 3)).tracing == "recorded run"  # see test_structured_record.py
    with pytest.raises(ValueError, match="torch.fx.*did not run"):
        DependencyGraph(Branchy(), -torch.ones(2, 3))


def test_exported_and_model_left_unchanged():
    from conftest import assert_unchanged, snapshot

    model, x = zoo.build("resnet_basic")
    model.train()
    before = snapshot(model)
    graph = tp.DependencyGraph(model, x)
    assert len(graph.prunable_groups) >= 5 and "Group(" in repr(graph)
    assert_unchanged(model, before)


class Branchy(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace this block."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


class WithBranchyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.block = Branchy()
        self.b = nn.Linear(8, 6)
        self.c = nn.Linear(6, 2)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.block(self.a(x)))))


def test_untraceable_submodule_is_left_whole_and_named():
    model = WithBranchyBlock().eval()
    x = torch.randn(3, 4)
    graph = DependencyGraph(model, x)
    assert any("Python control flow" in r for r in graph.unprunable["a"])
    assert group_of(graph, ("b", "weight", 0)).prunable
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    assert model.b.out_features == 3 and model.a.out_features == 8 and model.block.fc.in_features == 8
    model(x)


def test_chunk_pairs_the_pieces():
    model, x = zoo.build("glu")
    graph = DependencyGraph(model, x)
    # a, b = conv1(x).chunk(2, 1): channel j of a goes with channel 8 + j of b
    g = group_of(graph, ("conv1", "weight", 0))
    assert g.prunable and len(g) == 8
    assert sorted(map(tuple, g.indices[("conv1", "weight", 0)].tolist())) == [(j, j + 8) for j in range(8)]
    assert sorted(map(tuple, g.indices[("bn1", "running_var", 0)].tolist())) == [(j, j + 8) for j in range(8)]
    assert sorted(g.indices[("conv2", "weight", 1)].flatten().tolist()) == list(range(8))
    # the halves of conv2's output feed two different branches: still paired
    g = group_of(graph, ("conv2", "weight", 0))
    assert g.prunable and len(g) == 6 and {("left", "weight", 1), ("right", "weight", 1)} <= set(g.indices)
    # F.glu on proj's outputs
    g = group_of(graph, ("proj", "weight", 0))
    assert sorted(map(tuple, g.indices[("proj", "weight", 0)].tolist())) == [(j, j + 6) for j in range(6)]
    assert ("fc", "weight", 1) in g.indices


class UnevenChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        p, q = self.conv(x).chunk(2, 1)  # 3 and 2 channels
        return self.a(p) + self.b(q)


class SplitSizes(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.a = nn.Conv2d(4, 2, 1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        p, q = self.conv(x).split([4, 4], 1)  # the sizes are constants of the code
        return self.a(p) + self.b(q)


def test_uneven_chunk_and_split_sizes_stay():
    g = group_of(DependencyGraph(UnevenChunk(), torch.randn(1, 3, 4, 4)), ("conv", "weight", 0))
    assert not g.prunable and any("unequal" in r for r in g.reasons)
    g = group_of(DependencyGraph(SplitSizes(), torch.randn(1, 3, 4, 4)), ("conv", "weight", 0))
    assert not g.prunable and any("split with fixed sizes" in r for r in g.reasons)


class WithDefault(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x, scale: float = 2.0):
        return self.b(torch.relu(self.a(x)) * scale)


def test_arguments_left_to_their_defaults():
    for graph in (DependencyGraph(WithDefault(), torch.randn(3, 4)), by_fx(WithDefault(), torch.randn(3, 4))):
        assert group_of(graph, ("a", "weight", 0)).prunable
    assert by_fx(WithDefault(), torch.randn(3, 4)).tracing == "torch.fx"


def test_a_layer_that_does_not_run_is_traced_by_fx():
    """A layer the example inputs skip (an auxiliary head) is invisible to a run: fx traces it."""

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.aux = nn.Linear(6, 3)
            self.b = nn.Linear(6, 2)
            self.use_aux = False

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.aux(h) if self.use_aux else self.b(h)

    graph = DependencyGraph(Skips(), torch.randn(3, 4))
    assert graph.tracing == "torch.fx" and group_of(graph, ("a", "weight", 0)).prunable


def test_unit_signatures_survive_hash_collisions():
    """Units are grouped by hashing their runs; with every hash equal (zero weights) the full
    comparison must still separate different signatures and join equal ones."""
    from torchprune.structured.graph import _signatures

    # units: 0 and 2 own (member 0, 1 index), (member 1, 1 index); 1 owns (member 0, 2 indices); 3 is frozen
    runs = np.array([2, 1, 2, 2])
    unit_first = np.array([0, 2, 3, 5])
    run_key = np.array([0, 1, 0, 0, 1, 0, 1])
    run_length = np.array([1, 1, 2, 1, 1, 1, 1])
    frozen = np.array([False, False, False, True])
    for weights in (None, np.zeros(6, dtype=np.int64)):
        kind = _signatures(frozen, runs, unit_first, run_key, run_length, weights)
        assert kind[0] == kind[2] and len({kind[0], kind[1], kind[3]}) == 3
