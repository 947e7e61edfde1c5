"""OWL layer sparsities (torchprune/owl.py): tp.allocate(method="owl") and tp.prune(scope="owl")."""

import pytest
import torch
from torch import nn

import torchprune as tp

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoBranches(nn.Module):
    """Two Linears that read the same input (equal input norms), no repeated blocks."""

    def __init__(self, out_b=10):
        super().__init__()
        self.a = nn.Linear(10, 10, bias=False)
        self.b = nn.Linear(10, out_b, bias=False)

    def forward(self, x):
        return self.a(x).sum(-1) + self.b(x).sum(-1)


def outlier_model(out_b=10):
    """Layer a: 5 of 100 Wanda scores above 5x the mean; layer b: 1 of its scores."""
    net = TwoBranches(out_b)
    with torch.no_grad():
        net.a.weight.fill_(1.0)
        net.a.weight.view(-1)[:5] = 100.0  # mean 5.95: the five 100s are outliers
        net.b.weight.fill_(1.0)
        net.b.weight.view(-1)[7] = 1000.0  # only this one is an outlier
    return net


DATA = [torch.ones(3, 10)]


def test_hand_computed_sparsities():
    # D = (0.05, 0.01) -> scaled to (2 * 0.08, 0) -> minus the mean 0.08: a gets target - 0.08, b + 0.08
    plan = tp.allocate(outlier_model(), 0.5, method="owl", data=DATA)
    assert plan == pytest.approx({"a": 0.42, "b": 0.58}, abs=1e-12)
    plan = tp.allocate(outlier_model(), 0.5, method="owl", data=DATA, lam=0.05)
    assert plan == pytest.approx({"a": 0.45, "b": 0.55}, abs=1e-12)


def test_the_mean_weighted_by_size_is_the_target():
    net = outlier_model(out_b=30)  # b: 300 weights, a: 100
    plan = tp.allocate(net, 0.6, method="owl", data=DATA)
    assert (100 * plan["a"] + 300 * plan["b"]) / 400 == pytest.approx(0.6, abs=1e-12)
    assert plan["b"] - plan["a"] == pytest.approx(0.16, abs=1e-12)  # the spread stays 2 * lam


def test_sparsities_stay_in_range_and_the_mean_still_holds():
    plan = tp.allocate(outlier_model(), 0.95, method="owl", data=DATA)
    assert max(plan.values()) <= 0.99
    assert (plan["a"] + plan["b"]) / 2 == pytest.approx(0.95, abs=1e-12)
    assert plan["b"] == pytest.approx(0.99)


def test_no_outliers_anywhere_gives_the_uniform_target():
    net = TwoBranches()
    with torch.no_grad():
        net.a.weight.fill_(1.0)
        net.b.weight.fill_(2.0)
    assert tp.allocate(net, 0.7, method="owl", data=DATA) == pytest.approx({"a": 0.7, "b": 0.7})


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.out = nn.Linear(8, 2)
        with torch.no_grad():  # outliers in the middle block
            self.blocks[1].up.weight.view(-1)[:6] = 40.0

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def test_the_layers_of_one_block_share_its_sparsity():
    g = torch.Generator().manual_seed(0)
    plan = tp.allocate(Stack(), 0.5, method="owl", data=[torch.randn(8, 8, generator=g)])
    for k in range(3):
        assert plan[f"blocks.{k}.up"] == plan[f"blocks.{k}.down"]
    assert plan["blocks.1.up"] < plan["blocks.0.up"]  # more outliers, pruned less
    assert plan["blocks.1.up"] < plan["out"]


@pytest.mark.parametrize("importance", ["magnitude", "wanda", "sparsegpt"])
def test_scope_owl_is_the_allocation_as_a_dict_scope(importance):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 8, generator=g) for _ in range(2)]
    net, twin = Stack(), Stack()
    tp.prune(net, 0.6, importance=importance, scope="owl", data=batches, sequential=False)
    plan = tp.allocate(twin, 0.6, method="owl", data=batches)
    tp.prune(twin, importance=importance, scope=plan, data=None if importance == "magnitude" else batches,
             sequential=False)
    for name, mask in tp.masks(twin).items():
        assert torch.equal(tp.masks(net)[name], mask), name
    assert tp.sparsity(net) == pytest.approx(0.6, abs=0.01)


def test_arguments_are_checked():
    net = outlier_model()
    with pytest.raises(ValueError, match="`m` .* must be a finite number > 1, got 1"):
        tp.allocate(net, 0.5, method="owl", data=DATA, m=1)
    with pytest.raises(ValueError, match=r"`lam` .* must be in \[0, 0.5\), got 0.5"):
        tp.allocate(net, 0.5, method="owl", data=DATA, lam=0.5)
    with pytest.raises(TypeError, match="`lam` must be a real number, got str"):
        tp.allocate(net, 0.5, method="owl", data=DATA, lam="a")
    with pytest.raises(ValueError, match="method='owl' reads Wanda scores on calibration data: pass `data`"):
        tp.allocate(net, 0.5, method="owl")
    with pytest.raises(ValueError, match="`method` must be 'sensitivity' .* or 'owl'"):
        tp.allocate(net, 0.5, method="greedy")
    with pytest.raises(ValueError, match="`method` must be"):
        tp.allocate(net, 0.5)
    with pytest.raises(ValueError, match="scope='owl' reads Wanda scores on calibration data: pass `data`"):
        tp.prune(net, 0.5, scope="owl")
    with pytest.raises(ValueError, match="scope='owl' needs `sparsity`"):
        tp.prune(net, granularity="2:4", scope="owl", data=DATA)
    with pytest.raises(ValueError, match="scope='owl' needs `sparsity`"):
        tp.prune(net, threshold=0.1, scope="owl", data=DATA)
    assert tp.masks(net) == {}
