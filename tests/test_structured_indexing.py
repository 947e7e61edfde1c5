"""x[index] with an integer tensor index in channel pruning (issue 15): BEiT's, Swin's and LeViT's
relative-position bias reads a parameter table through an index buffer. The index is a set of
positions to gather, not channels: the tracer used to run the indexing on the index's channel
labels and failed with an IndexError."""

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


class RelativeBias(nn.Module):
    """A hidden layer plus a bias gathered from a (positions, heads) table by an index buffer."""

    def __init__(self, mask_index=False):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.out = nn.Linear(6, 8), nn.Linear(8, 2)
        self.table = nn.Parameter(torch.randn(7, 2))
        self.register_buffer("index", torch.randint(0, 7, (4, 4), generator=torch.Generator().manual_seed(1)))
        self.mask_index = mask_index

    def forward(self, x):  # x: (batch, 4 tokens, 6)
        h = torch.relu(self.proj(x))
        if self.mask_index:  # a bool index too
            bias = self.table[self.index.view(-1)[:7] > 2].sum(0)
        else:
            bias = self.table[self.index.view(-1)].view(4, 4, 2).sum(1)
        return self.out(h) + bias


def tokens():
    return torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tracing", ["record", "fx"])
@pytest.mark.parametrize("mask_index", [False, True])
def test_a_table_read_through_an_index_buffer(tracing, mask_index):
    model, x = RelativeBias(mask_index), tokens()
    graph = DependencyGraph(model, x) if tracing == "record" else by_fx(model, x)
    hidden = next(g for g in graph.groups if ("proj", "weight", 0) in g.indices)
    assert hidden.prunable and hidden.exact and len(hidden) == 8
    assert not any(m[0] == "" and m[1] == "index" for g in graph.groups for m in g.indices)  # never sliced
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    assert pruned.proj.out_features == pruned.out.in_features == 4
    assert torch.equal(pruned.index, model.index) and torch.equal(pruned.table, model.table)
    with torch.no_grad():
        assert_same_function(pruned, masked, x)


def test_prune_end_to_end_with_an_index_buffer():
    model, x = RelativeBias(), tokens()
    tp.prune(model, 0.5, granularity="channel", example_inputs=x)
    model(x).sum().backward()
    assert model.table.grad.shape == (7, 2) and model.proj.weight.shape == (4, 6)
