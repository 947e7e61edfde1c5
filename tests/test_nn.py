"""tp.nn.SparseLinear / SparseConv2d: packing from dense layers, state_dict, fine-tuning, compile."""

import io

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.masking import attach_mask, effective_weight
from torchprune.nn import SparseConv2d, SparseLinear

from conftest import make_mlp
from error_bounds import assert_layer_close


def masked(layer, sparsity, seed=0):
    """``layer`` with a random mask of about ``sparsity`` (pruned weights zeroed)."""
    generator = torch.Generator().manual_seed(seed)
    attach_mask(layer, torch.rand(layer.weight.shape, generator=generator) >= sparsity)
    return layer


def linear(in_features=24, out_features=16, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


def saved_size(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# from_dense / to_dense


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_round_trip(dtype, bias):
    dense = masked(linear(bias=bias, dtype=dtype), 0.7)
    sparse = SparseLinear.from_dense(dense)
    assert isinstance(sparse.values, nn.Parameter)
    assert sparse.nnz == int(dense.weight_mask.sum())
    assert sparse.row_ptr.dtype == torch.int32 and sparse.col_idx.dtype == torch.int16
    x = torch.randn(3, 5, 24, dtype=dtype)
    assert_layer_close(sparse(x), dense, x)
    back = sparse.to_dense()
    assert type(back) is nn.Linear and back.weight.dtype == dtype
    assert torch.equal(back.weight, effective_weight(dense))
    assert (back.bias is None) == (not bias)
    if bias:
        assert torch.equal(back.bias, dense.bias)


def test_mask_keeps_its_zeros_and_unmasked_layer_keeps_nonzeros():
    dense = masked(linear(), 0.5)
    kept = dense.weight_mask.nonzero()[:3]
    with torch.no_grad():
        dense.weight[kept[:, 0], kept[:, 1]] = 0.0  # kept by the mask, yet zero
    sparse = SparseLinear.from_dense(dense)
    assert sparse.nnz == int(dense.weight_mask.sum())  # stored: fine-tuning may grow them

    plain = linear()
    with torch.no_grad():
        plain.weight[plain.weight.abs() < 0.1] = 0.0
    sparse = SparseLinear.from_dense(plain)
    assert sparse.nnz == int(torch.count_nonzero(plain.weight))
    assert torch.equal(sparse.to_dense().weight, plain.weight)


def test_masked_layer_with_garbage_in_pruned_slots():
    dense = masked(linear(), 0.6)
    with torch.no_grad():
        dense.weight[~dense.weight_mask] = float("nan")  # the mask decides, not the stored value
    sparse = SparseLinear.from_dense(dense)
    x = torch.randn(4, 24)
    assert_layer_close(sparse(x), dense, x)


CONV_CASES = {
    "3x3 pad1": dict(kernel_size=3, padding=1),
    "stride2 dilation2": dict(kernel_size=3, stride=2, padding=2, dilation=2),
    "1x1 no bias": dict(kernel_size=1, bias=False),
    "same reflect": dict(kernel_size=(3, 5), padding="same", padding_mode="reflect"),
    "circular": dict(kernel_size=3, padding=1, padding_mode="circular"),
}


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=list(CONV_CASES))
def test_conv_round_trip(case):
    torch.manual_seed(0)
    dense = masked(nn.Conv2d(4, 6, **case), 0.6)
    sparse = SparseConv2d.from_dense(dense)
    assert sparse.nnz == int(dense.weight_mask.sum())
    x = torch.randn(2, 4, 9, 10)
    assert_layer_close(sparse(x), dense, x)
    assert_layer_close(sparse(x[0]), dense, x[0])  # unbatched input
    back = sparse.to_dense()
    assert type(back) is nn.Conv2d
    assert torch.equal(back.weight, effective_weight(dense))
    assert_layer_close(back(x), dense, x)


def test_extra_repr_shows_shape_nnz_sparsity_format():
    sparse = SparseLinear.from_dense(masked(linear(), 0.75))
    text = repr(sparse)
    assert "in_features=24, out_features=16" in text
    assert f"nnz={sparse.nnz}" in text and f"sparsity={sparse.sparsity:.3f}" in text
    assert "csr (int16 col_idx)" in text
    torch.manual_seed(0)
    conv = SparseConv2d.from_dense(masked(nn.Conv2d(3, 4, 3, padding=1), 0.5))
    assert "kernel_size=(3, 3)" in repr(conv) and "nnz=" in repr(conv)


def test_wide_layer_uses_int32_indices():
    layer = nn.Linear(70000, 2, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 69999] = 1.5
        layer.weight[1, 3] = -2.0
    sparse = SparseLinear.from_dense(layer)
    assert sparse.col_idx.dtype == torch.int32 and sparse.nnz == 2
    x = torch.randn(3, 70000)
    assert_layer_close(sparse(x), layer, x)


@pytest.mark.parametrize("in_features,out_features", [(0, 4), (4, 0), (1, 1)])
def test_empty_and_tiny_layers(in_features, out_features):
    dense = nn.Linear(in_features, out_features)
    sparse = SparseLinear.from_dense(dense)
    x = torch.randn(3, in_features)
    assert_layer_close(sparse(x), dense, x)
    assert sparse(torch.randn(0, in_features)).shape == (0, out_features)


def test_non_contiguous_input_bf16_deepcopy_and_pickle():
    import copy
    import pickle

    dense = masked(linear(), 0.5)
    sparse = SparseLinear.from_dense(dense)
    x = torch.randn(8, 24)[::2]
    assert_layer_close(sparse(x), dense, x)
    for clone in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
        assert torch.equal(clone(x), sparse(x))
    half = SparseLinear.from_dense(masked(linear(dtype=torch.bfloat16), 0.5))
    assert half.values.dtype == torch.bfloat16
    y = half(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert_layer_close(y, half.to_dense(), x.bfloat16())  # accumulated in float32


@pytest.mark.parametrize("make", [lambda: SparseLinear.from_dense(masked(linear(), 0.5)),
                                  lambda: SparseConv2d.from_dense(masked(nn.Conv2d(2, 4, 3), 0.5))])
def test_weight_access_says_what_to_do_and_stays_an_attribute_error(make):
    import copy
    import pickle

    sparse = make()
    name = type(sparse).__name__
    with pytest.raises(AttributeError, match=rf"'{name}' has no attribute 'weight'.*dense_weight\(\).*"
                                             r"tp.sparsify\(model, example_inputs=...\).*kept dense"):
        sparse.weight
    assert not hasattr(sparse, "weight") and getattr(sparse, "weight", None) is None
    with pytest.raises(AttributeError, match=f"'{name}' object has no attribute 'other'"):
        sparse.other  # every other missing name: torch's own message
    assert sparse.bias is not None and sparse.values.numel() == sparse.nnz
    x = torch.randn(2, 24) if name == "SparseLinear" else torch.randn(2, 2, 5, 5)
    for clone in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
        assert torch.equal(clone(x), sparse(x)) and not hasattr(clone, "weight")


def test_tp_sparsity_counts_sparse_layers():
    model = tp.prune(make_mlp(), sparsity=0.8)
    assert tp.sparsity(tp.sparsify(model, min_sparsity=0.0)) == pytest.approx(tp.sparsity(model))


def test_from_dense_errors():
    with pytest.raises(TypeError, match="`linear` must be an nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(2, 2, 1))
    with pytest.raises(TypeError, match="`conv` must be an nn.Conv2d"):
        SparseConv2d.from_dense(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="groups=2"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError, match="float16"):
        SparseLinear.from_dense(nn.Linear(4, 4, dtype=torch.float16))
    with pytest.raises(TypeError, match="`in_features`"):
        SparseLinear(-1, 3)


# ---------------------------------------------------------------------------------------------
# state_dict


def test_state_dict_round_trip_and_size():
    dense = masked(nn.Linear(256, 256), 0.9)
    sparse = SparseLinear.from_dense(dense)
    state = sparse.state_dict()
    assert set(state) == {"values", "row_ptr", "col_idx", "bias", "_extra_state"}
    assert state["_extra_state"] == {"format": "csr", "shape": [256, 256]}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = SparseLinear(256, 256)
    fresh.load_state_dict(loaded)
    x = torch.randn(4, 256)
    assert_layer_close(fresh(x), dense, x)
    tp.make_permanent(dense)
    assert saved_size(state) <= saved_size(dense.state_dict()) / 4


def test_load_into_module_with_different_nnz():
    torch.manual_seed(0)
    source = SparseConv2d.from_dense(masked(nn.Conv2d(8, 8, 3, padding=1), 0.9, seed=1))
    target = SparseConv2d.from_dense(masked(nn.Conv2d(8, 8, 3, padding=1), 0.3, seed=2))
    values = target.values
    assert target.nnz != source.nnz
    target.load_state_dict(source.state_dict())
    assert target.values is values  # same Parameter object (optimizers keep their reference)
    assert target.nnz == source.nnz
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(target(x), source(x))


def corrupt(state, **changes):
    state = dict(state)
    state.update(changes)
    return state


@pytest.mark.parametrize("change,message", [
    (lambda s: corrupt(s, _extra_state={"format": "csr", "shape": [16, 25]}), "dense shape"),
    (lambda s: corrupt(s, row_ptr=s["row_ptr"][:-1]), "'row_ptr' must be int32 with 17"),
    (lambda s: corrupt(s, row_ptr=s["row_ptr"].long()), "'row_ptr' must be int32"),
    (lambda s: corrupt(s, col_idx=s["col_idx"].int()), "'col_idx' must be torch.int16"),
    (lambda s: corrupt(s, values=s["values"][:-1]), "'values' must be floating point"),
    (lambda s: corrupt(s, row_ptr=s["row_ptr"].flip(0)), "must start at 0"),
    (lambda s: corrupt(s, col_idx=torch.full_like(s["col_idx"], 30)), "column 30"),
    (lambda s: corrupt(s, values=s["values"].reshape(1, -1)), r"1-D tensor, got a 2-D tensor of shape \[1, "),
    (lambda s: corrupt(s, col_idx=s["col_idx"].flip(0)), "must ascend within each row"),
], ids=["shape", "row_ptr length", "row_ptr dtype", "col_idx dtype", "values length",
        "row_ptr order", "col range", "values dim", "col order"])
def test_bad_state_dict_names_the_key_and_changes_nothing(change, message):
    state = SparseLinear.from_dense(masked(linear(), 0.5, seed=1)).state_dict()
    target = SparseLinear.from_dense(masked(linear(), 0.8, seed=2))
    before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError, match=message):
        target.load_state_dict(change(state))
    for key, value in before.items():
        assert torch.equal(target.state_dict()[key], value)


@pytest.mark.parametrize("keep", [("col_idx",), ("values", "row_ptr"), ("row_ptr",)])
def test_partial_pack_is_refused_before_anything_is_copied(keep):
    state = SparseLinear.from_dense(masked(linear(), 0.5, seed=1)).state_dict()
    state["col_idx"] = torch.full_like(state["col_idx"], -1)  # reads as column 65535: out of range
    target = SparseLinear.from_dense(masked(linear(), 0.8, seed=2))
    before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
    partial = {key: state[key] for key in keep}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="must be loaded together"):
            target.load_state_dict(partial, strict=strict)
        for key, value in before.items():
            assert torch.equal(target.state_dict()[key], value)


def test_dense_state_dict_is_refused_with_advice():
    target = SparseLinear(24, 16)
    with pytest.raises(RuntimeError, match="from_dense"):
        target.load_state_dict(linear().state_dict())


def test_sparsified_model_state_dict_loads_into_another_sparsified_model():
    source = tp.sparsify(tp.prune(make_mlp(seed=0), sparsity=0.9), min_sparsity=0.0)
    target = tp.sparsify(tp.prune(make_mlp(seed=1), sparsity=0.5), min_sparsity=0.0)
    target.load_state_dict(source.state_dict())
    x = torch.randn(5, 16)
    torch.testing.assert_close(target(x), source(x))


# ---------------------------------------------------------------------------------------------
# training through the sparse kernels


def test_fine_tuning_moves_stored_values_only():
    dense = masked(linear(), 0.8)
    sparse = SparseLinear.from_dense(dense)
    start = sparse.to_dense().weight.clone()
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    x, target = torch.randn(32, 24), torch.randn(32, 16)
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.mse_loss(sparse(x), target).backward()
        assert sparse.values.grad.shape == sparse.values.shape
        optimizer.step()
    weight = sparse.to_dense().weight
    assert (weight[~dense.weight_mask] == 0).all()
    assert not torch.allclose(weight[dense.weight_mask], start[dense.weight_mask])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradcheck_through_module_fp64(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer = SparseLinear.from_dense(masked(nn.Linear(6, 5, dtype=torch.float64), 0.5))
        x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    else:
        layer = SparseConv2d.from_dense(masked(nn.Conv2d(2, 3, 3, padding=1, stride=2, dtype=torch.float64), 0.5))
        x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    values = layer.values.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def run(x, values, bias):
        return torch.func.functional_call(layer, {"values": values, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(run, (x, values, bias))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.mark.slow
def test_compile_fullgraph_over_sparsified_model():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tp.prune(SmallCNN(), sparsity=0.8)
    sparse = tp.sparsify(model, min_sparsity=0.0).eval()
    assert isinstance(sparse.conv, SparseConv2d) and isinstance(sparse.fc1, SparseLinear)
    x = torch.randn(2, 3, 4, 4)
    compiled = torch.compile(sparse, fullgraph=True)
    torch.testing.assert_close(compiled(x), sparse(x))


def test_layers_on_a_device_without_kernels_are_refused_naming_the_devices():
    from torchprune.ops.devices import kernel_devices

    devices = kernel_devices("sparse_linear")
    assert devices[0] == "cpu"
    assert ("cuda" in devices) == torch._C._dispatch_has_kernel_for_dispatch_key("torchprune::sparse_linear", "CUDA")
    layer = nn.Linear(8, 4, device="meta")
    with pytest.raises(ValueError, match=r"`linear` is on meta; this build's sparse kernels run on cpu"):
        SparseLinear.from_dense(layer)
    from torchprune.sparsify import plan

    decision = plan(nn.Sequential(layer), min_sparsity=0.0)["0"]
    assert not decision.swap and "on meta" in decision.reason
