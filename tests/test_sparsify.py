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
    assert set(BREAK_EVEN) == {"linear", "linear_block", "linear_nm", "conv1x1", "conv"}
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

    monkeypatch.setattr(sparsify_module, "time_layer", fake_time)
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


# ---------------------------------------------------------------------------------------------
# Layers whose attributes a parent reads in its own forward (T5, timm's edgenext and xcit)


class T5LikeFeedForward(nn.Module):
    """transformers' T5DenseActDense: the forward reads ``wo.weight.dtype`` before calling ``wo``."""

    def __init__(self):
        super().__init__()
        self.wi = nn.Linear(16, 32)
        self.wo = nn.Linear(32, 16)

    def forward(self, x):
        hidden = torch.relu(self.wi(x))
        if isinstance(self.wo.weight, torch.Tensor) and hidden.dtype != self.wo.weight.dtype:
            hidden = hidden.to(self.wo.weight.dtype)
        return self.wo(hidden)


class TimmLikeEncoding(nn.Module):
    """timm's PositionalEncodingFourier (edgenext, xcit) reads ``token_projection.weight``'s device
    and dtype, then calls it; ``proj``'s bias is read by this forward and ``proj`` is called."""

    def __init__(self):
        super().__init__()
        self.token_projection = nn.Conv2d(8, 16, 1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.proj = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        batch, _, height, width = x.shape
        weight = self.token_projection.weight
        grid = torch.arange(8 * height * width, dtype=weight.dtype, device=weight.device)
        x = self.conv(x) + self.token_projection(grid.reshape(1, 8, height, width).sin() / 8)
        y = self.proj(x.mean((2, 3)))
        return self.fc(y - self.proj.bias)


def swap_every_timed_layer(monkeypatch):
    monkeypatch.setattr(sparsify_module, "time_layer", lambda layer, shapes: (1.0, 0.5))


@pytest.mark.parametrize("kwargs", [dict(), dict(min_sparsity=0.0)])
def test_layers_read_by_their_parent_stay_dense_with_example_inputs(monkeypatch, kwargs):
    swap_every_timed_layer(monkeypatch)
    torch.manual_seed(0)
    model = tp.prune(nn.Sequential(T5LikeFeedForward(), nn.ReLU(), T5LikeFeedForward()), sparsity=0.9)
    x = torch.randn(3, 16)
    before, attributes = snapshot(model), [dict(vars(m)) for m in model.modules()]
    decisions = plan(model, example_inputs=x, **kwargs)
    assert_unchanged(model, before)  # classes put back, nothing left on the layers
    assert [dict(vars(m)) for m in model.modules()] == attributes
    for block in ("0", "2"):
        assert not decisions[f"{block}.wo"].swap
        assert decisions[f"{block}.wo"].reason == (
            "its weight is read outside its forward (by T5LikeFeedForward.forward); kept dense")
        assert decisions[f"{block}.wi"].swap
    sparse = tp.sparsify(model, example_inputs=x, **kwargs)
    assert isinstance(sparse[0].wi, SparseLinear) and type(sparse[0].wo) is MaskedLinear
    assert_same_outputs(model, sparse, x)


def test_timm_like_reads_of_weight_and_bias_keep_those_layers_dense(monkeypatch):
    swap_every_timed_layer(monkeypatch)
    torch.manual_seed(0)
    model = tp.prune(TimmLikeEncoding(), sparsity=0.9)
    x = torch.randn(2, 16, 4, 4)
    decisions = plan(model, example_inputs=x)
    assert decisions["token_projection"].reason == (  # read and called: still dense
        "its weight is read outside its forward (by TimmLikeEncoding.forward); kept dense")
    assert decisions["proj"].reason == "its bias is read outside its forward (by TimmLikeEncoding.forward); kept dense"
    assert decisions["conv"].swap and decisions["fc"].swap
    sparse = tp.sparsify(model, example_inputs=x)
    assert type(sparse.token_projection) is MaskedConv2d and type(sparse.proj) is MaskedLinear
    assert isinstance(sparse.conv, SparseConv2d) and isinstance(sparse.fc, SparseLinear)
    assert_same_outputs(model, sparse, x)


class ReadsAtConstruction(nn.Module):
    """Reads its child's weight in __init__ and in a method the forward does not call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.scale = 1.0 / self.fc.weight.shape[1]

    def weight_norm(self):
        return self.fc.weight.norm()

    def forward(self, x):
        return self.fc(x) * self.scale


def test_reads_outside_the_traced_forward_do_not_keep_a_layer_dense(monkeypatch):
    swap_every_timed_layer(monkeypatch)
    model = tp.prune(ReadsAtConstruction(), sparsity=0.9)
    model.weight_norm()
    assert plan(model, example_inputs=torch.randn(2, 8))["fc"].swap
    assert isinstance(tp.sparsify(model, example_inputs=torch.randn(2, 8)).fc, SparseLinear)


def test_a_failing_forward_leaves_the_layer_classes_as_they_were():
    class Fails(T5LikeFeedForward):
        def forward(self, x):
            self.wo.weight
            raise RuntimeError("boom")

    model = tp.prune(Fails(), sparsity=0.9)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        plan(model, example_inputs=torch.randn(2, 16))
    assert_unchanged(model, before)
    assert type(model.wo) is MaskedLinear and "weight" in model.wo._parameters


def test_without_example_inputs_the_read_says_what_to_do():
    model = tp.prune(T5LikeFeedForward(), sparsity=0.9)
    assert plan(model, min_sparsity=0.0)["wo"].swap  # nothing runs: the read cannot be seen
    sparse = tp.sparsify(model, min_sparsity=0.0)
    with pytest.raises(AttributeError, match=r"'SparseLinear' has no attribute 'weight'.*"
                                             r"tp.sparsify\(model, example_inputs=...\)"):
        sparse(torch.randn(2, 16))


def test_t5_encoder_end_to_end(monkeypatch):
    transformers = pytest.importorskip("transformers")
    swap_every_timed_layer(monkeypatch)
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, num_heads=2, d_ff=32, num_layers=2)
    model = tp.prune(transformers.T5EncoderModel(config).eval(), sparsity=0.9)
    ids = torch.randint(0, 32, (2, 7))
    decisions = plan(model, example_inputs=ids)
    read = {name for name, d in decisions.items() if "read outside its forward" in d.reason}
    assert read == {f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in range(2)}
    assert all(d.swap for name, d in decisions.items() if name not in read)
    sparse = tp.sparsify(model, example_inputs=ids)
    assert isinstance(sparse.encoder.block[0].layer[0].SelfAttention.q, SparseLinear)
    assert_same_function(model, sparse, ids, return_dict=False)
