"""transformers' Conv1D (GPT-2's Linear with the weight stored (in, out), run as ``torch.addmm``)
and ``x ** 3`` / ``torch.pow`` (GPT-2's tanh GELU) in channel pruning (issue 15). The layer type
is known by its qualified name, so transformers need not be installed: a stand-in class with the
same name and layout is tested here, and the real GPT-2 where transformers is."""

import copy
import math

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
from zoo import Conv1D


def new_gelu(x):
    """GPT-2's activation: a tanh approximation with x ** 3 and torch.pow."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class MLP(nn.Module):
    def __init__(self, width=16, hidden=32, cube="pow"):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(5, width)
        self.c_fc, self.c_proj = Conv1D(hidden, width), Conv1D(width, hidden)
        self.cube = cube
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        x = self.embed(x)
        h = self.c_fc(x)
        h = new_gelu(h) if self.cube == "pow" else h * (h ** 2).sigmoid()
        return self.head(x + self.c_proj(h))


def tokens():
    return torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tracing", ["record", "fx"])
@pytest.mark.parametrize("cube", ["pow", "**"])
def test_conv1d_hidden_width_prunes_like_a_linear(tracing, cube):
    model, x = MLP(cube=cube), tokens()
    graph = DependencyGraph(model, x) if tracing == "record" else by_fx(model, x)
    g = next(g for g in graph.groups if ("c_fc", "weight", 1) in g.indices)
    assert g.prunable and g.exact and len(g) == 32
    assert g.indices.keys() == {("c_fc", "weight", 1), ("c_fc", "bias", 0), ("c_proj", "weight", 0)}
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    assert (pruned.c_fc.nf, pruned.c_fc.nx, pruned.c_proj.nf, pruned.c_proj.nx) == (16, 8, 8, 16)
    assert pruned.c_fc.weight.shape == (8, 16) and pruned.c_proj.weight.shape == (16, 8)
    with torch.no_grad():
        assert_same_function(pruned, masked, x)


def test_conv1d_prune_save_and_load(tmp_path):
    model, x = MLP(), tokens()
    tp.prune(model, 0.5, granularity="channel", example_inputs=x)
    assert model.c_fc.weight.shape == (8, 16)
    model(x).sum().backward()
    tp.save(model, tmp_path / "pruned.pt")
    fresh = tp.load(tmp_path / "pruned.pt", MLP())
    assert (fresh.c_fc.nf, fresh.c_proj.nx) == (16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_gpt2_mlp_width_prunes():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=100,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(config).eval()
    x = torch.randint(0, 100, (1, 16))
    masked = copy.deepcopy(model)
    with pytest.warns(UserWarning):  # the attention and the residual stream stay (hand-written attention)
        tp.prune(model, 0.5, granularity="channel", example_inputs=x)
    for block in model.h:
        assert block.mlp.c_fc.weight.shape == (64, 128) and block.mlp.c_proj.weight.shape == (128, 64)
    assert model(x).last_hidden_state.shape == (1, 16, 64)
    assert masked(x).last_hidden_state.shape == (1, 16, 64)
