"""tp.sparsify(): which layers are swapped, and the swapped model computes the same outputs."""

import sys

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.nn import MaskedConv2d, MaskedLinear, SparseConv2d, SparseLinear
from torchprune.sparsify import BREAK_EVEN, plan

from conftest import assert_unchanged, make_mlp, snapshot
from error_bounds import assert_same_function

sparsify_module = sys.modules["torchprune.sparsify"]  # tp.sparsify is the function


class CNN(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=groups)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(1))


def assert_same_outputs(a, b, x):
    """b computes what a does (in float64, on copies: summation order cannot matter there)."""
    assert_same_function(b, a, x)


def test_mlp_equivalence_all_swapped():
    model = tp.prune(make_mlp(), sparsity=0.9)
    sparse = tp.sparsify(model, min_sparsity=0.0)
    assert all(isinstance(sparse[i], SparseLinear) for i in (0, 2, 4))
    assert_same_outputs(model, sparse, torch.randn(7, 16))


def test_cnn_equivalence_and_original_left_unchanged():
    torch.manual_seed(0)
    model = tp.prune(CNN(), sparsity=0.9)
    before = snapshot(model)
    sparse = tp.sparsify(model, min_sparsity=0.5)
    assert_unchanged(model, before)
    assert sparse is not model
    assert isinstance(sparse.conv1, SparseConv2d) and isinstance(sparse.conv3, SparseConv2d)
    assert isinstance(sparse.fc, SparseLinear)
    assert_same_outputs(model, sparse, torch.randn(2, 3, 8, 8))


def test_inplace_returns_the_same_model():
    model = tp.prune(make_mlp(), sparsity=0.9)
    reference = tp.sparsify(model, min_sparsity=0.0)
    assert tp.sparsify(model, min_sparsity=0.0, inplace=True) is model
    assert isinstance(model[0], SparseLinear)
    assert_same_outputs(reference, model, torch.randn(3, 16))


def test_a_single_layer_model_comes_back_sparse():
    layer = tp.prune(nn.Linear(16, 8), sparsity=0.9)
    sparse = tp.sparsify(layer, min_sparsity=0.0)
    assert isinstance(sparse, SparseLinear)
    assert_same_outputs(layer, sparse, torch.randn(3, 16))


def test_min_sparsity_picks_layers():
    model = tp.prune(make_mlp(), scope={"0": 0.5, "2": 0.9, "4": 0.95})
    sparse = tp.sparsify(model, min_sparsity=0.85)
    assert isinstance(sparse[0], MaskedLinear)
    assert isinstance(sparse[2], SparseLinear) and isinstance(sparse[4], SparseLinear)
    assert_same_outputs(model, sparse, torch.randn(3, 16))


def test_grouped_conv_and_unpruned_layers_stay_dense():
    torch.manual_seed(0)
    model = tp.prune(CNN(groups=4), sparsity=0.8, exclude=["fc"])
    decisions = plan(model, min_sparsity=0.0)
    assert "grouped convolution (groups=4)" in decisions["conv2"].reason
    assert decisions["fc"].reason == "not pruned" and decisions["fc"].sparsity == 0.0
    sparse = tp.sparsify(model, min_sparsity=0.0)
    assert type(sparse.conv2) is MaskedConv2d and type(sparse.fc) is nn.Linear
    assert isinstance(sparse.conv1, SparseConv2d)
    assert_same_outputs(model, sparse, torch.randn(2, 3, 8, 8))


def test_zeros_without_mask_count_as_pruned():
    model = tp.make_permanent(tp.prune(make_mlp(), sparsity=0.9))
    sparse = tp.sparsify(model, min_sparsity=0.85)
    assert isinstance(sparse[0], SparseLinear)
    assert sparse[0].nnz == int(torch.count_nonzero(model[0].weight))


def test_cost_model_uses_the_largest_break_even(monkeypatch):
    monkeypatch.setattr(sparsify_module, "BREAK_EVEN", {
        "linear": {1: 0.6, 64: 0.8}, "conv1x1": {1: 0.5}, "conv": {1: 0.7, 8: None}})
    model = tp.prune(make_mlp(), scope={"0": 0.7, "2": 0.85, "4": 0.0})
    decisions = plan(model)
    assert not decisions["0"].swap and "< break-even 0.8" in decisions["0"].reason
    assert decisions["2"].swap and "cost model" in decisions["2"].reason
    assert not decisions["4"].swap and decisions["4"].reason == "not pruned"
    torch.manual_seed(0)
    cnn = tp.prune(CNN(), sparsity=0.9)
    decisions = plan(cnn)
    assert decisions["conv3"].swap  # 1x1: break-even 0.5
    assert not decisions["conv1"].swap and "did not beat dense" in decisions["conv1"].reason
    assert_same_outputs(cnn, tp.sparsify(cnn), torch.randn(2, 3, 8, 8))


def test_cost_model_table_is_well_formed():
    assert set(BREAK_EVEN) == {"linear", "conv1x1", "conv"}
    for levels in BREAK_EVEN.values():
        assert levels and all(v is None or 0 < v < 1 for v in levels.values())


def test_timing_path_records_real_shapes_and_keeps_the_faster(monkeypatch):
    torch.manual_seed(0)
    model = tp.prune(CNN(), sparsity=0.9)
    seen = {}

    def fake_time(layer, shapes):
        name = {id(m): n for n, m in model.named_modules()}[id(layer)]
        seen[name] = shapes
        return (1.0, 0.5) if name in ("conv1", "fc") else (0.5, 1.0)  # (dense s, sparse s)

    monkeypatch.setattr(sparsify_module, "_time_layer", fake_time)
    x = torch.randn(4, 3, 8, 8)
    sparse = tp.sparsify(model, example_inputs=x)
    assert seen["conv1"] == [torch.Size([4, 3, 8, 8])] and seen["fc"] == [torch.Size([4, 512])]
    assert isinstance(sparse.conv1, SparseConv2d) and isinstance(sparse.fc, SparseLinear)
    assert type(sparse.conv2) is MaskedConv2d and type(sparse.conv3) is MaskedConv2d
    assert_same_outputs(model, sparse, x)


def test_timing_path_runs_for_real():
    torch.manual_seed(0)
    model = tp.prune(CNN(), sparsity=0.9)
    model.train()
    decisions = plan(model, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert model.training and all(m.training for m in model.modules())
    for name in ("conv1", "conv2", "conv3", "fc"):
        assert decisions[name].reason.startswith("timed: dense")
    sparse = tp.sparsify(model, example_inputs=torch.randn(2, 3, 8, 8))
    assert_same_outputs(model, sparse, torch.randn(2, 3, 8, 8))


def test_aliased_layer_swapped_everywhere_and_tied_weights_left():
    model = tp.prune(make_mlp(), sparsity=0.9)
    model.alias = model[0]  # one layer under two names
    sparse = tp.sparsify(model, min_sparsity=0.0)
    assert isinstance(sparse[0], SparseLinear) and sparse.alias is sparse[0]

    tied = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    tied[2].weight = tied[0].weight
    tp.prune(tied, sparsity=0.5)
    decisions = plan(tied, min_sparsity=0.0)
    assert "shared" in decisions["0"].reason and not decisions["0"].swap
    assert_same_outputs(tied, tp.sparsify(tied, min_sparsity=0.0), torch.randn(2, 8))


def test_conv1d_and_other_layers_are_not_candidates(small_net):
    tp.prune(small_net, sparsity=0.9)
    decisions = plan(small_net, min_sparsity=0.0)
    assert "conv1d" not in decisions and set(decisions) == {"conv", "fc1", "fc2"}


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(min_sparsity=1.5), ValueError, r"`min_sparsity` must be in \[0, 1\], got 1.5"),
    (dict(min_sparsity="0.9"), TypeError, "`min_sparsity` must be a float"),
    (dict(example_inputs=[1, 2]), TypeError, "`example_inputs` must be a Tensor"),
    (dict(inplace=1), TypeError, "`inplace` must be a bool"),
])
def test_bad_arguments_raise_before_anything_changes(kwargs, error, message):
    model = tp.prune(make_mlp(), sparsity=0.9)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        tp.sparsify(model, inplace=kwargs.pop("inplace", True), **kwargs)
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match="`model` must be an nn.Module"):
        tp.sparsify("model")


def test_transformer_encoder_layer_linears_stay_dense():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2,
                                  enable_nested_tensor=False)
    tp.prune(model, sparsity=0.9)
    decisions = plan(model, min_sparsity=0.0)
    assert "reads the weight directly" in decisions["layers.0.linear1"].reason
    sparse = tp.sparsify(model, min_sparsity=0.0).eval()
    model.eval()
    assert_same_outputs(model, sparse, torch.randn(2, 5, 16))  # the fast path still runs


def test_summary_of_sparsified_model_counts_like_the_masked_one():
    torch.manual_seed(0)
    model = tp.prune(CNN(groups=4), sparsity=0.8)
    x = torch.randn(2, 3, 8, 8)
    sparse = tp.sparsify(model, min_sparsity=0.0)
    before, after = tp.summary(model, x), tp.summary(sparse, x)
    for key in ("nonzeros", "sparsity", "macs_dense", "macs_effective"):
        assert after.totals[key] == before.totals[key], key
    rows = {r["name"]: r for r in after.rows}
    assert rows["conv1"]["type"] == "SparseConv2d" and rows["conv1"]["weight_shape"] == [16, 3, 3, 3]
    assert rows["conv1"]["params"] == sparse.conv1.nnz + 16  # what it stores: values and bias
    assert rows["conv1"]["note"] == "sparse kernel (CSR)"
    assert rows["conv2"]["note"] == "groups > 1: no sparse kernel, runs dense"
    assert "Note" in str(after) and "Note" not in str(tp.summary(make_mlp()))
