"""The N:8 storage format of tp.nn.SparseLinear ("nm n:8"): n slots in every window of 8 input
columns, ``values`` the flat slots, ``col_idx`` the slots' 3-bit positions packed 8 to an int32,
``row_ptr`` regular (torchprune/nn/sparse.py; the packing in torchprune/ops/nm.py).

Module level: the format from_dense picks (N:M masks from tp.prune, unmasked zeros, the
NM_AUTO_SLOTS and NM_MIN_FILL rules, CSR / block masks), forcing it (``nm=``) and the argument
checks, forward and backward against the masked dense layer, the accessors (padding slots count as
stored), the state_dict across formats (a module adopts the checkpoint's), bad checkpoints refused
with nothing changed, saving, tp.sparsify / tp.summary, deepcopy and dtype moves. The op itself
(pack_nm, nm_sparse_linear on its code paths) is tested in test_nm_sparse_ops.py.
"""

import copy
import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp
from torchprune.masking import attach_mask, effective_weight, get_mask
from torchprune.nn import SparseLinear
from torchprune.nn.sparse import NM_AUTO_SLOTS, NM_MIN_FILL, nm_pattern
from torchprune.ops import block_pattern_rows, nm_slots
from torchprune.sparsify import BREAK_EVEN, plan

from conftest import assert_sparse_unchanged, assert_unchanged, make_mlp, snapshot, sparse_state, through_bytes
from error_bounds import assert_close_bounded, assert_layer_close, assert_same_function, layer_grad_references

# torchprune.sparsify is the function at the package level; the module holds _kind
sparsify_module = importlib.import_module("torchprune.sparsify")

pytestmark = pytest.mark.usefixtures("one_thread")

IN, OUT = 64, 24  # in_features a multiple of 8 (the format's windows), out_features a multiple of 8 (blocks)


# ---------------------------------------------------------------------------------------------
# helpers


def nm_mask(out_features, in_features, n, m, seed=0):
    """A random keep-mask [out, in] with exactly n kept in every m consecutive input columns."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.rand(out_features, in_features // m, m, generator=g).argsort(-1).argsort(-1)
    return (rank < n).reshape(out_features, in_features)


def window_counts(mask):
    """Kept weights in every aligned window of 8 input columns: [out, in // 8]."""
    return mask.reshape(mask.shape[0], -1, 8).sum(-1)


def masked_linear(in_features, out_features, mask, bias=True, dtype=torch.float32, seed=0):
    """A Linear with ``mask`` attached (its pruned weights zero, as prune() leaves them)."""
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    attach_mask(layer, mask)
    return layer


def pruned_linear(granularity, in_features=IN, out_features=OUT, seed=0, bias=True, dtype=torch.float32, **kwargs):
    """A Linear pruned by tp.prune with ``granularity`` (an N:M one is checked to be N:M)."""
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    tp.prune(layer, granularity=granularity, **kwargs)
    if ":" in granularity and not granularity.startswith("block"):
        n, m = map(int, granularity.split(":"))
        groups = layer.weight_mask.reshape(out_features, -1, m).sum(-1)
        assert (groups == n).all(), f"tp.prune(granularity={granularity!r}) did not make an {n}:{m} mask"
    return layer


def zeroed_linear(mask, seed=0):
    """An unmasked Linear whose weight is zero where ``mask`` is False (and nonzero elsewhere)."""
    torch.manual_seed(seed)
    layer = nn.Linear(mask.shape[1], mask.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.where(mask, layer.weight.sign() * (layer.weight.abs() + 0.01), 0.0))
    assert get_mask(layer) is None
    return layer


def slot_columns(layer):
    """The input column of every stored slot of an nm SparseLinear, [out, slots], decoded here from
    the codes (3 bits a slot, 8 slots an int32, slot s in window s // n)."""
    rows, n = layer.out_features, layer.nm
    slots = layer.in_features // 8 * n
    codes = layer.col_idx.reshape(rows, -1).long()
    s = torch.arange(slots)
    positions = (codes[:, s // 8] >> (3 * (s % 8))) & 7
    return (s // n) * 8 + positions


def assert_nm_layout(sparse, n, in_features=IN, out_features=OUT):
    """The tensors of an nm layer with n slots a window are shaped and typed as the format says."""
    slots = in_features // 8 * n
    assert sparse.nm == n and sparse.block_rows == 1
    assert sparse.format == f"nm {n}:8 (int32 codes)"
    assert sparse.values.shape == (out_features * slots,)
    assert sparse.col_idx.dtype == torch.int32 and sparse.col_idx.shape == (out_features * math.ceil(slots / 8),)
    assert torch.equal(sparse.row_ptr, torch.arange(out_features + 1, dtype=torch.int32) * slots)


# ---------------------------------------------------------------------------------------------
# from_dense: which format


@pytest.mark.parametrize("granularity,n", [("2:4", 4), ("4:8", 4), ("1:4", 2), ("2:8", 2), ("1:8", 1), ("3:8", 3)])
def test_from_dense_picks_nm_for_2_4_and_4_8_masks_and_stores_others_when_asked(granularity, n):
    """Only n = NM_AUTO_SLOTS (2:4, 4:8) is chosen by itself; sparser N:M masks stay CSR unless
    ``nm=n`` asks (their kernels were no faster than CSR), and then pack without padding."""
    dense = pruned_linear(granularity)
    with torch.no_grad():  # garbage in the pruned slots: the mask, not the zeros, decides
        dense.weight[~dense.weight_mask] = 7.0
    assert nm_slots(dense.weight_mask) == n
    auto = SparseLinear.from_dense(dense)
    if n == NM_AUTO_SLOTS:
        assert nm_pattern(dense) == n
        assert_nm_layout(auto, n)
    else:
        assert nm_pattern(dense) is None
        assert auto.nm == 0 and auto.format == "csr (int16 col_idx)"
    sparse = SparseLinear.from_dense(dense, nm=n)
    assert_nm_layout(sparse, n)
    assert sparse.nnz == int(dense.weight_mask.sum())  # full windows: no padding
    assert torch.equal(sparse.dense_weight(), effective_weight(dense))
    # every stored slot sits on a kept weight, in its window
    columns = slot_columns(sparse)
    assert bool(dense.weight_mask.gather(1, columns).all())
    assert torch.equal(sparse.values.detach().reshape(OUT, -1), effective_weight(dense).gather(1, columns))


@pytest.mark.parametrize("n,m,expected", [(2, 4, 4), (1, 4, 2), (1, 8, 1), (3, 8, 3)])
def test_from_dense_stores_unmasked_zeros_in_an_n_m_pattern(n, m, expected):
    mask = nm_mask(OUT, IN, n, m, seed=1)
    dense = zeroed_linear(mask)
    assert SparseLinear.from_dense(dense).nm == (expected if expected == NM_AUTO_SLOTS else 0)
    sparse = SparseLinear.from_dense(dense, nm=expected)
    assert_nm_layout(sparse, expected)
    assert torch.equal(sparse.dense_weight(), dense.weight.detach())
    x = torch.randn(3, IN)
    assert_layer_close(sparse(x), dense, x)


@pytest.mark.parametrize("kind", ["unstructured 50%", "6:8", "5:8", "unmasked dense"])
def test_from_dense_keeps_csr_for_other_masks(kind):
    if kind == "unstructured 50%":
        dense = pruned_linear("weight", sparsity=0.5)
    elif kind == "unmasked dense":
        torch.manual_seed(0)
        dense = nn.Linear(IN, OUT)
    else:  # more than NM_AUTO_SLOTS kept in a window: the N:8 format would not pay
        n = int(kind[0])
        assert n > NM_AUTO_SLOTS
        dense = masked_linear(IN, OUT, nm_mask(OUT, IN, n, 8))
        assert nm_slots(dense.weight_mask) == n
    assert nm_pattern(dense) is None
    sparse = SparseLinear.from_dense(dense)
    assert sparse.nm == 0 and sparse.format == "csr (int16 col_idx)"
    assert torch.equal(sparse.dense_weight(), effective_weight(dense))


def test_n_at_nm_max_auto_is_still_nm():
    dense = masked_linear(IN, OUT, nm_mask(OUT, IN, NM_AUTO_SLOTS, 8, seed=2))
    assert SparseLinear.from_dense(dense).nm == NM_AUTO_SLOTS


@pytest.mark.parametrize("sparsity", [0.5, 0.875])
def test_block_masks_stay_blocks_even_when_every_window_keeps_at_most_four(sparsity):
    dense = pruned_linear("block:4x1", sparsity=sparsity)
    mask = dense.weight_mask
    assert block_pattern_rows(mask, (4,)) == 4
    if sparsity == 0.875:  # every window keeps <= 4: only NM_MIN_FILL keeps it out of the N:8 format
        assert int(window_counts(mask).max()) <= NM_AUTO_SLOTS
        n = nm_slots(mask)
        assert int(mask.sum()) < NM_MIN_FILL * mask.numel() * n / 8
    assert nm_pattern(dense) is None
    sparse = SparseLinear.from_dense(dense)
    assert sparse.nm == 0 and sparse.format.startswith("bsr ")
    assert torch.equal(sparse.dense_weight(), effective_weight(dense))


def test_a_mask_both_n_m_and_whole_blocks_is_stored_as_nm():
    """The N:8 format is tried first: a 2:4 mask repeated over 4 output rows is whole 4x1 blocks too."""
    mask = nm_mask(OUT // 4, IN, 2, 4, seed=25).repeat_interleave(4, 0)
    assert block_pattern_rows(mask, (4,)) == 4 and nm_slots(mask) == 4
    dense = masked_linear(IN, OUT, mask)
    assert sparsify_module._kind(dense) == "linear_nm"
    sparse = SparseLinear.from_dense(dense)
    assert_nm_layout(sparse, 4)
    assert torch.equal(sparse.dense_weight(), effective_weight(dense))
    assert SparseLinear.from_dense(dense, nm=0).format == "bsr 4x1 (int16 col_idx)"  # nm = 0: the next choice


def test_nm_min_fill_is_the_boundary():
    """A 2:4 mask with some kept weights dropped: nm (with padding) while the kept weights fill at
    least NM_MIN_FILL of the 4:8 slots, CSR one weight below."""
    full = nm_mask(OUT, IN, 2, 4, seed=3)
    slots = OUT * IN // 8 * 4
    least = math.ceil(NM_MIN_FILL * slots)
    assert least < slots
    kept = full.flatten().nonzero().flatten()
    for count, expected_nm in ((least, 4), (least - 1, 0)):
        mask = full.flatten().clone()
        mask[kept[count:]] = False
        mask = mask.reshape(OUT, IN)
        assert int(mask.sum()) == count
        dense = masked_linear(IN, OUT, mask)
        sparse = SparseLinear.from_dense(dense)
        assert sparse.nm == expected_nm, count
        if expected_nm:
            assert sparse.nnz == slots  # the windows that lost a weight store a zero slot
        assert torch.equal(sparse.dense_weight(), effective_weight(dense))


@pytest.mark.parametrize("in_features,granularity", [(36, "2:4"), (20, "1:4"), (12, "1:4"), (44, "2:4")])
def test_in_features_not_a_multiple_of_8_is_never_nm(in_features, granularity):
    dense = pruned_linear(granularity, in_features=in_features, out_features=16)
    assert nm_pattern(dense) is None and sparsify_module._kind(dense) != "linear_nm"
    sparse = SparseLinear.from_dense(dense)
    assert sparse.nm == 0 and sparse.format == "csr (int16 col_idx)"
    x = torch.randn(3, in_features)
    assert_layer_close(sparse(x), dense, x)
    # unmasked zeros in that pattern too
    plain = zeroed_linear(dense.weight_mask)
    assert SparseLinear.from_dense(plain).nm == 0
    with pytest.raises(ValueError, match="`nm`"):
        SparseLinear.from_dense(dense, nm=4)


# ---------------------------------------------------------------------------------------------
# from_dense: forcing and refusing; the constructor's `nm`


def test_from_dense_nm_forces_and_forbids_the_format():
    two_four = pruned_linear("2:4")
    forced = SparseLinear.from_dense(two_four, nm=4)
    assert_nm_layout(forced, 4)
    assert torch.equal(forced.dense_weight(), effective_weight(two_four))
    # more slots than needed: padded windows
    wide = SparseLinear.from_dense(two_four, nm=6)
    assert_nm_layout(wide, 6)
    assert wide.nnz == OUT * IN // 8 * 6
    assert torch.equal(wide.dense_weight(), effective_weight(two_four))
    x = torch.randn(4, IN)
    assert_layer_close(wide(x), two_four, x)
    # too few slots for a window
    with pytest.raises(ValueError, match="more than n = 2"):
        SparseLinear.from_dense(two_four, nm=2)
    # nm = 0 forbids it; block_rows = 1 alone means CSR
    for kwargs in (dict(nm=0), dict(block_rows=1), dict(nm=0, block_rows=1)):
        csr = SparseLinear.from_dense(two_four, **kwargs)
        assert csr.nm == 0 and csr.format == "csr (int16 col_idx)", kwargs
        assert torch.equal(csr.dense_weight(), effective_weight(two_four))


def test_from_dense_forces_nm_on_a_dense_ish_layer():
    six = masked_linear(IN, OUT, nm_mask(OUT, IN, 6, 8, seed=4))
    assert SparseLinear.from_dense(six).nm == 0
    sparse = SparseLinear.from_dense(six, nm=6)
    assert_nm_layout(sparse, 6)
    x = torch.randn(5, IN)
    assert_layer_close(sparse(x), six, x)
    with pytest.raises(ValueError, match="more than n = 5"):
        SparseLinear.from_dense(six, nm=5)


def test_from_dense_nm_with_block_rows_is_refused():
    block = pruned_linear("block:4x1", sparsity=0.5)
    for dense in (pruned_linear("2:4"), block):
        for block_rows in (4, 8):
            with pytest.raises(ValueError, match="`nm`.*`block_rows`"):
                SparseLinear.from_dense(dense, nm=4, block_rows=block_rows)


@pytest.mark.parametrize("nm", [True, False, -1, 9, 2.0, "4", None])
def test_a_bad_nm_is_refused_naming_it(nm):
    with pytest.raises(ValueError, match="`nm`"):
        SparseLinear(IN, OUT, nm=nm)


@pytest.mark.parametrize("nm", [True, 9, -2])
def test_from_dense_refuses_a_bad_nm_naming_it(nm):
    with pytest.raises(ValueError, match="`nm`"):
        SparseLinear.from_dense(pruned_linear("2:4"), nm=nm)


@pytest.mark.parametrize("in_features", [4, 12, 36, 60])
def test_nm_needs_in_features_a_multiple_of_8(in_features):
    with pytest.raises(ValueError, match="`nm` = 4 needs in_features to be a multiple of 8"):
        SparseLinear(in_features, OUT, nm=4)
    assert SparseLinear(in_features, OUT).nm == 0  # CSR needs nothing of the kind


def test_nm_and_block_rows_in_the_constructor_are_refused():
    with pytest.raises(ValueError, match="`nm`.*`block_rows`"):
        SparseLinear(IN, OUT, nm=4, block_rows=4)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_the_constructor_takes_any_n_in_range(n):
    layer = SparseLinear(IN, OUT, nm=n)
    assert layer.nm == n and layer.format == f"nm {n}:8 (int32 codes)"
    assert layer.col_idx.dtype == torch.int32


def test_a_fresh_nm_module_computes_its_bias_and_reloads_its_state():
    layer = SparseLinear(IN, OUT, nm=4)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(float(OUT)))
    assert torch.equal(layer(torch.randn(5, IN)), torch.arange(float(OUT)).expand(5, OUT))
    assert torch.equal(layer.dense_weight(), torch.zeros(OUT, IN))
    fresh = SparseLinear(IN, OUT)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dense_weight(), torch.zeros(OUT, IN))


# ---------------------------------------------------------------------------------------------
# forward, backward, fine-tuning


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["2:4", "1:4", "1:8", "3:8"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_the_masked_layer(dtype, granularity, bias):
    dense = pruned_linear(granularity, bias=bias, dtype=dtype, seed=5)
    with torch.no_grad():  # garbage in the pruned slots
        dense.weight[~dense.weight_mask] = 7.0
    sparse = SparseLinear.from_dense(dense, nm=nm_slots(dense.weight_mask))
    assert sparse.nm > 0 and sparse.values.dtype == dtype
    g = torch.Generator().manual_seed(6)
    for shape in [(5, IN), (2, 3, IN), (1, IN), (40, IN), (16, IN), (15, IN), (IN,)]:
        x = torch.randn(shape, generator=g).to(dtype)
        out = sparse(x)
        assert out.shape == (*shape[:-1], OUT) and out.dtype == dtype
        assert_layer_close(out, dense, x, f"{dtype} {granularity} x {list(shape)}")
    if dtype == torch.float64:
        x = torch.randn(6, IN, dtype=dtype, generator=g)
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-12, atol=1e-12)


def test_forward_with_padded_windows_equals_the_masked_layer():
    """Windows that keep fewer weights than n store zeros: they must add nothing."""
    mask = nm_mask(OUT, IN, 2, 4, seed=7)
    mask[0, :8] = False  # an empty window
    mask[1, 8:16] = torch.tensor([True, False] * 4)  # a full one
    mask[2] = False  # an empty row
    dense = masked_linear(IN, OUT, mask)
    with torch.no_grad():
        dense.weight[~mask] = -3.0
    sparse = SparseLinear.from_dense(dense, nm=4)
    assert sparse.nnz == OUT * IN // 2
    for rows in (1, 3, 40):
        x = torch.randn(rows, IN)
        assert_layer_close(sparse(x), dense, x, f"{rows} rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [5, 40])
@pytest.mark.parametrize("case", ["2:4", "1:4 as 4:8"])
def test_backward_equals_the_dense_gradient_at_the_stored_slots(dtype, rows, case):
    granularity = case.split()[0]
    dense = pruned_linear(granularity, dtype=dtype, seed=8)
    sparse = SparseLinear.from_dense(dense, nm=4 if case.endswith("4:8") else None)
    assert sparse.nm == 4
    twin = sparse.to_dense()  # plain Linear: a gradient at every weight, stored slots or not
    g = torch.Generator().manual_seed(9)
    x = torch.randn(rows, IN, generator=g, dtype=dtype)
    grad_out = torch.randn(rows, OUT, generator=g, dtype=dtype)

    leaf = x.clone().requires_grad_()
    sparse(leaf).backward(grad_out)
    assert sparse.values.grad.shape == sparse.values.shape
    values_grad = sparse.values.grad.reshape(OUT, -1)
    columns = slot_columns(sparse)

    twin_leaf = x.clone().requires_grad_()
    twin(twin_leaf).backward(grad_out)
    if dtype == torch.float64:
        tight = dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(values_grad, twin.weight.grad.gather(1, columns), **tight)
        torch.testing.assert_close(leaf.grad, twin_leaf.grad, **tight)
        torch.testing.assert_close(sparse.bias.grad, twin.bias.grad, **tight)
    else:
        (_, gx, gw), (_, mx, mw), (_, tx, tw) = layer_grad_references(twin, x, grad_out)
        assert_close_bounded(leaf.grad, gx, mx, tx, dtype, "grad x")
        assert_close_bounded(values_grad, gw.gather(1, columns), mw.gather(1, columns), tw.gather(1, columns),
                             dtype, "grad values")
        torch.testing.assert_close(sparse.bias.grad, twin.bias.grad)
    assert sparse.col_idx.grad is None and sparse.row_ptr.grad is None


def test_fine_tuning_keeps_the_format_and_moves_only_the_stored_values():
    dense = pruned_linear("2:4", seed=10)
    sparse = SparseLinear.from_dense(dense)
    row_ptr, col_idx = sparse.row_ptr.clone(), sparse.col_idx.clone()
    start = sparse.dense_weight().clone()
    values = sparse.values
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    g = torch.Generator().manual_seed(11)
    x, target = torch.randn(32, IN, generator=g), torch.randn(32, OUT, generator=g)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = F.mse_loss(sparse(x), target)
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < losses[0]
    assert sparse.values is values and values.shape == (OUT * IN // 2,)
    assert torch.equal(sparse.row_ptr, row_ptr) and torch.equal(sparse.col_idx, col_idx)
    assert_nm_layout(sparse, 4)
    weight = sparse.dense_weight()
    mask = dense.weight_mask
    assert (weight[~mask] == 0).all()
    assert (weight[mask] != start[mask]).all()  # every stored value moved
    rebuilt = nn.Linear(IN, OUT)
    with torch.no_grad():
        rebuilt.weight.copy_(weight)
        rebuilt.bias.copy_(sparse.bias)
    assert_layer_close(sparse(x), rebuilt, x)
    assert torch.equal(sparse.to_dense().weight, weight)


# ---------------------------------------------------------------------------------------------
# accessors, repr, tp.sparsity, tp.summary


def test_nnz_sparsity_format_dense_weight_and_to_dense():
    dense = pruned_linear("2:4", seed=12)
    sparse = SparseLinear.from_dense(dense)
    assert sparse.nnz == OUT * IN // 2 == sparse.values.numel() == int(dense.weight_mask.sum())
    assert sparse.sparsity == pytest.approx(0.5, abs=1e-12)
    assert sparse.dense_shape == (OUT, IN)
    assert sparse.format == "nm 4:8 (int32 codes)"
    text = repr(sparse)
    assert "format=nm 4:8 (int32 codes)" in text and f"nnz={sparse.nnz}" in text and "sparsity=0.500" in text
    assert "format=nm 4:8 (int32 codes)" in sparse.extra_repr()
    assert torch.equal(sparse.dense_weight(), effective_weight(dense))
    back = sparse.to_dense()
    assert type(back) is nn.Linear and back.weight.dtype == torch.float32
    assert torch.equal(back.weight, effective_weight(dense)) and torch.equal(back.bias, dense.bias)
    assert tp.sparsity(sparse) == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(AttributeError, match="dense_weight"):
        sparse.weight  # noqa: B018
    one = SparseLinear.from_dense(pruned_linear("1:8"), nm=1)
    assert one.format == "nm 1:8 (int32 codes)" and "format=nm 1:8 (int32 codes)" in repr(one)
    assert one.sparsity == pytest.approx(7 / 8, abs=1e-12)


def test_padding_slots_count_as_stored():
    """A 2:8 layer forced into 4 slots a window stores 4 per window: sparsity 0.5, while its
    weight (tp.sparsity counts zeros) is 0.75 sparse."""
    dense = pruned_linear("2:8", seed=13)
    sparse = SparseLinear.from_dense(dense, nm=4)
    assert sparse.nnz == OUT * IN // 2
    assert sparse.sparsity == pytest.approx(0.5, abs=1e-12)
    assert int((sparse.values == 0).sum()) == OUT * IN // 4  # the padding slots store zeros
    assert tp.sparsity(sparse) == pytest.approx(0.75, abs=1e-12)
    assert torch.equal(sparse.dense_weight(), effective_weight(dense))
    assert "sparsity=0.500" in repr(sparse)
    # from_dense's own choice for a nearly full 2:4 mask pads too
    mask = nm_mask(OUT, IN, 2, 4, seed=14)
    mask[0, mask[0].nonzero()[0]] = False
    auto = SparseLinear.from_dense(masked_linear(IN, OUT, mask))
    assert auto.nm == 4 and auto.nnz == OUT * IN // 2 == int(mask.sum()) + 1


def test_the_summary_notes_the_n_8_kernel():
    model = make_mlp()
    tp.prune(model, scope={"0": 0.5}, granularity="weight")  # layer 0: unstructured
    tp.prune(model[2], granularity="2:4")
    tp.prune(model[4], granularity="1:4")
    sparse = tp.sparsify(model, min_sparsity=0.0)
    assert [sparse[i].nm for i in (0, 2, 4)] == [0, 4, 0]  # 1:4 stays CSR unless asked
    sparse[4] = SparseLinear.from_dense(model[4], nm=2)
    rows = {row["name"]: row for row in tp.summary(sparse).rows}
    assert rows["0"]["note"] == "sparse kernel (CSR)"
    assert rows["2"]["note"] == "N:8 sparse kernel (4:8)"
    assert rows["4"]["note"] == "N:8 sparse kernel (2:8)"
    assert rows["2"]["sparsity"] == pytest.approx(0.5) and rows["4"]["sparsity"] == pytest.approx(0.75)
    assert rows["2"]["weight_shape"] == [24, 32]
    assert "N:8 sparse kernel (4:8)" in str(tp.summary(sparse))
    assert tp.sparsity(sparse) == pytest.approx(tp.sparsity(model), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# state_dict across formats, saving


def nm_source(granularity="2:4", seed=15):
    dense = pruned_linear(granularity, seed=seed)
    return SparseLinear.from_dense(dense, nm=nm_slots(dense.weight_mask))


def test_nm_state_dict_round_trip_into_a_fresh_module():
    source = nm_source()
    state = through_bytes(source.state_dict())
    assert set(state) == {"values", "row_ptr", "col_idx", "bias", "_extra_state"}
    assert state["_extra_state"] == {"format": "nm", "shape": [OUT, IN], "n": 4}
    assert state["values"].shape == (OUT * IN // 2,) and state["col_idx"].dtype == torch.int32
    fresh = SparseLinear(IN, OUT)  # CSR by default
    assert fresh.nm == 0
    values = fresh.values
    fresh.load_state_dict(state)
    assert fresh.values is values  # the same Parameter (optimizers keep their reference)
    assert_nm_layout(fresh, 4)
    assert fresh.get_extra_state() == state["_extra_state"]
    x = torch.randn(3, IN)
    assert torch.equal(fresh(x), source(x))
    assert torch.equal(fresh.dense_weight(), source.dense_weight())
    again = fresh.state_dict()
    for key in ("values", "row_ptr", "col_idx", "bias"):
        assert again[key].dtype == state[key].dtype and torch.equal(again[key], state[key]), key
    assert again["_extra_state"] == state["_extra_state"]


def test_an_nm_module_adopts_csr_bsr_and_other_n_checkpoints():
    target = nm_source(seed=16)
    x = torch.randn(4, IN)
    csr = SparseLinear.from_dense(pruned_linear("weight", sparsity=0.6, seed=17))
    assert csr.format == "csr (int16 col_idx)"
    target.load_state_dict(through_bytes(csr.state_dict()))
    assert target.nm == 0 and target.format == "csr (int16 col_idx)"
    assert target.values.shape == csr.values.shape and target.row_ptr.shape == (OUT + 1,)
    assert torch.equal(target(x), csr(x))
    assert target.get_extra_state() == {"format": "csr", "shape": [OUT, IN]}

    target = nm_source(seed=16)
    bsr = SparseLinear.from_dense(pruned_linear("block:4x1", sparsity=0.5, seed=18))
    assert bsr.format == "bsr 4x1 (int16 col_idx)"
    target.load_state_dict(through_bytes(bsr.state_dict()))
    assert target.nm == 0 and target.block_rows == 4 and target.format == "bsr 4x1 (int16 col_idx)"
    assert torch.equal(target(x), bsr(x))

    target = nm_source(seed=16)
    two = nm_source("1:4", seed=19)
    target.load_state_dict(two.state_dict())
    assert_nm_layout(target, 2)
    assert torch.equal(target(x), two(x))
    # and back to 4:8
    four = nm_source(seed=20)
    target.load_state_dict(four.state_dict())
    assert_nm_layout(target, 4)
    assert torch.equal(target(x), four(x))


@pytest.mark.parametrize("target_kind", ["csr", "bsr"])
def test_csr_and_bsr_modules_adopt_an_nm_checkpoint(target_kind):
    source = nm_source()
    if target_kind == "csr":
        target = SparseLinear.from_dense(pruned_linear("weight", sparsity=0.8, seed=21))
    else:
        target = SparseLinear.from_dense(pruned_linear("block:8x1", sparsity=0.5, seed=21))
        assert target.block_rows == 8
    target.load_state_dict(through_bytes(source.state_dict()))
    assert_nm_layout(target, 4)
    x = torch.randn(3, IN)
    assert torch.equal(target(x), source(x))
    assert target.state_dict()["_extra_state"] == {"format": "nm", "shape": [OUT, IN], "n": 4}


def test_whole_nm_modules_through_torch_save_deepcopy_and_dtype_moves():
    source = nm_source()
    x = torch.randn(5, IN)
    expected = source(x)
    loaded = through_bytes(source, weights_only=False)
    copied = copy.deepcopy(source)
    for other in (loaded, copied):
        assert_nm_layout(other, 4)
        assert torch.equal(other(x), expected)
    assert copied.values is not source.values and copied.values.data_ptr() != source.values.data_ptr()
    with torch.no_grad():  # the copy is independent
        copied.values.add_(1.0)
    assert torch.equal(source(x), expected)
    for moved in (copy.deepcopy(source).double(), copy.deepcopy(source).to(torch.float64)):
        assert_nm_layout(moved, 4)
        assert moved.values.dtype == torch.float64 and moved.col_idx.dtype == torch.int32
        x64 = x.double()
        out = moved(x64)
        assert out.dtype == torch.float64
        assert_layer_close(out, moved.to_dense(), x64)
        torch.testing.assert_close(out.float(), expected, rtol=1e-5, atol=1e-5)
    bf16 = copy.deepcopy(source).to(torch.bfloat16)
    assert_nm_layout(bf16, 4)
    assert_layer_close(bf16(x.bfloat16()), bf16.to_dense(), x.bfloat16())


def test_whole_sparsified_model_through_torch_save_and_tp_save(tmp_path):
    model = tp.prune(make_mlp(), granularity="2:4")
    sparse = tp.sparsify(model, min_sparsity=0.3)
    x = torch.randn(5, 16)
    expected = sparse(x)
    path = os.path.join(tmp_path, "whole.pt")
    torch.save(sparse, path)
    loaded = torch.load(path, weights_only=False)
    for other in (loaded, copy.deepcopy(sparse)):
        assert all(other[i].format == "nm 4:8 (int32 codes)" for i in (0, 2, 4))
        assert torch.equal(other(x), expected)
    # its state_dict into a CSR-sparsified model of other weights and sparsity
    csr = tp.sparsify(tp.prune(make_mlp(seed=1), sparsity=0.7), min_sparsity=0.0)
    assert all(csr[i].nm == 0 for i in (0, 2, 4))
    csr.load_state_dict(through_bytes(sparse.state_dict()))
    assert all(csr[i].nm == 4 for i in (0, 2, 4))
    assert torch.equal(csr(x), expected)
    # tp.save / tp.load into a model sparsified the same way (other weights)
    file = os.path.join(tmp_path, "tp.pt")
    tp.save(sparse, file)
    target = tp.sparsify(tp.prune(make_mlp(seed=2), granularity="2:4"), min_sparsity=0.3)
    assert not torch.equal(target(x), expected)
    assert tp.load(file, target) is target
    assert all(target[i].format == "nm 4:8 (int32 codes)" for i in (0, 2, 4))
    assert torch.equal(target(x), expected)


def with_extra(**extra):
    return lambda s: dict(s, _extra_state={"format": "nm", "shape": [OUT, IN], **extra})


def without(key):
    return lambda s: {k: v for k, v in s.items() if k != key}


def swap_first_two_positions(state):
    """col_idx with the first window's first two positions swapped (descending)."""
    codes = state["col_idx"].clone()
    code = int(codes[0])
    p0, p1 = code & 7, (code >> 3) & 7
    assert p0 < p1
    codes[0] = (code & ~0x3F) | p1 | (p0 << 3)
    return dict(state, col_idx=codes)


def repeat_first_position(state):
    codes = state["col_idx"].clone()
    code = int(codes[0])
    codes[0] = (code & ~0x38) | ((code & 7) << 3)
    return dict(state, col_idx=codes)


def with_row_ptr(change):
    def apply(state):
        row_ptr = state["row_ptr"].clone()
        change(row_ptr)
        return dict(state, row_ptr=row_ptr)
    return apply


EXTRA = r"'_extra_state' must be a \{'format': 'csr'"


@pytest.mark.parametrize("change,message", [
    (with_extra(n=0), EXTRA),
    (with_extra(n=9), EXTRA),
    (with_extra(n=-4), EXTRA),
    (with_extra(n=True), EXTRA),
    (with_extra(n=4.0), EXTRA),
    (with_extra(n="4"), EXTRA),
    (with_extra(), EXTRA),
    (lambda s: dict(s, _extra_state={"format": "csr", "shape": [OUT, IN], "n": 4}), EXTRA),
    (with_extra(n=4, block=[4, 1]), EXTRA),
    (lambda s: dict(s, _extra_state={"format": "bsr", "shape": [OUT, IN], "block": [4, 1], "n": 4}), EXTRA),
    (with_extra(n=4, shape=[OUT, IN + 8]), "dense shape"),
    (with_extra(n=2), r"'values' must be floating point with 384 entries"),
    (lambda s: dict(s, values=s["values"][:-1]), r"'values' must be floating point with 768 entries"),
    (lambda s: dict(s, values=torch.cat([s["values"], s["values"][:8]])), r"'values' must be floating point"),
    (lambda s: dict(s, values=s["values"].to(torch.int32)), r"'values' must be floating point"),
    (lambda s: dict(s, values=s["values"].reshape(OUT, -1)), "'values' must be a 1-D tensor"),
    (lambda s: dict(s, col_idx=s["col_idx"].to(torch.int16)), r"'col_idx' must be int32 codes with 96 entries"),
    (lambda s: dict(s, col_idx=s["col_idx"].to(torch.int64)), r"'col_idx' must be int32 codes"),
    (lambda s: dict(s, col_idx=s["col_idx"][:-1]), r"'col_idx' must be int32 codes with 96 entries"),
    (lambda s: dict(s, col_idx=torch.cat([s["col_idx"], s["col_idx"][:4]])), r"'col_idx' must be int32 codes"),
    (with_row_ptr(lambda r: r.__setitem__(1, 31)), r"'row_ptr' must be int32 \[0, 32, 64, \.\.\.\]"),
    (with_row_ptr(lambda r: r.__setitem__(-1, 0)), r"'row_ptr' must be int32 \[0, 32"),
    (lambda s: dict(s, row_ptr=s["row_ptr"].long()), r"'row_ptr' must be int32 \[0, 32"),
    (lambda s: dict(s, row_ptr=s["row_ptr"][:-1]), r"'row_ptr' must be int32 \[0, 32"),
    (lambda s: dict(s, row_ptr=torch.zeros(OUT + 1, dtype=torch.int32)), r"'row_ptr' must be int32 \[0, 32"),
    (swap_first_two_positions, "'col_idx': .*positions must ascend"),
    (repeat_first_position, "'col_idx': .*positions must ascend"),
    (lambda s: dict(s, col_idx=s["col_idx"] | (1 << 28)), "'col_idx': .*bits set beyond"),
    (without("values"), "must be loaded together.*missing 'values'"),
    (without("row_ptr"), "must be loaded together.*missing 'row_ptr'"),
    (without("col_idx"), "must be loaded together.*missing 'col_idx'"),
], ids=["n 0", "n 9", "n -4", "n bool", "n float", "n str", "n missing", "csr with n", "nm with block",
        "bsr with n", "shape", "n 2 for 4-slot tensors", "values short", "values long", "values int",
        "values 2-D", "col_idx int16", "col_idx int64", "col_idx short", "col_idx long", "row_ptr step",
        "row_ptr end", "row_ptr int64", "row_ptr short", "row_ptr zeros", "codes descending", "codes repeated",
        "codes high bits", "no values", "no row_ptr", "no col_idx"])
@pytest.mark.parametrize("target_kind", ["nm", "csr"])
def test_bad_nm_checkpoints_are_refused_naming_the_key_and_change_nothing(change, message, target_kind):
    state = nm_source().state_dict()
    if target_kind == "nm":
        target = nm_source("1:4", seed=22)
        assert target.nm == 2
    else:
        target = SparseLinear.from_dense(pruned_linear("weight", sparsity=0.7, seed=22))
    before = sparse_state(target)
    x = torch.randn(3, IN)
    out = target(x)
    with pytest.raises(RuntimeError, match=message):
        target.load_state_dict(change(state))
    assert_sparse_unchanged(target, before)
    assert torch.equal(target(x), out)


def test_an_nm_checkpoint_for_in_features_not_a_multiple_of_8_is_refused():
    """A hand-made nm checkpoint for a 16 x 36 layer: the format needs whole windows."""
    target = SparseLinear.from_dense(pruned_linear("2:4", in_features=36, out_features=16, seed=23))
    assert target.nm == 0
    state = target.state_dict()
    slots = 36 // 8 * 4
    bad = dict(state, _extra_state={"format": "nm", "shape": [16, 36], "n": 4},
               values=torch.randn(16 * slots), col_idx=torch.zeros(16 * 2, dtype=torch.int32),
               row_ptr=torch.arange(17, dtype=torch.int32) * slots)
    before = sparse_state(target)
    with pytest.raises(RuntimeError, match=EXTRA + ".*in_features a multiple of 8"):
        target.load_state_dict(bad)
    assert_sparse_unchanged(target, before)


def test_an_nm_checkpoint_of_another_layer_shape_is_refused():
    state = nm_source().state_dict()
    for target in (SparseLinear(IN, OUT + 8), SparseLinear(IN + 8, OUT), SparseLinear(IN * 2, OUT, nm=4)):
        before = sparse_state(target)
        with pytest.raises(RuntimeError, match="dense shape"):
            target.load_state_dict(state)
        assert_sparse_unchanged(target, before)


# ---------------------------------------------------------------------------------------------
# tp.sparsify


def test_sparsify_swaps_in_nm_layers_with_the_same_outputs():
    model = tp.prune(make_mlp(), granularity="2:4")
    before = snapshot(model)
    sparse = tp.sparsify(model, min_sparsity=0.3)
    assert_unchanged(model, before)
    for i, (in_features, out_features) in zip((0, 2, 4), ((16, 32), (32, 24), (24, 4))):
        assert isinstance(sparse[i], SparseLinear), i
        assert_nm_layout(sparse[i], 4, in_features, out_features)
    assert tp.sparsity(sparse) == pytest.approx(tp.sparsity(model), abs=1e-12)
    x = torch.randn(7, 16)
    assert_same_function(model, sparse, x)
    assert_layer_close(sparse[0](x), model[0], x)
    decisions = plan(model, min_sparsity=0.3)
    assert all(d.swap for d in decisions.values())
    # above the threshold nothing is swapped
    assert not any(isinstance(m, SparseLinear) for m in tp.sparsify(model, min_sparsity=0.6).modules())


def test_sparsify_timed_on_example_inputs_still_computes_the_same():
    model = tp.prune(make_mlp(), granularity="2:4")
    sparse = tp.sparsify(model, example_inputs=torch.randn(1, 16))
    for layer in sparse.modules():
        if isinstance(layer, SparseLinear):
            assert layer.nm == 4
    decisions = plan(model, example_inputs=torch.randn(1, 16))
    assert set(decisions) == {"0", "2", "4"}
    assert all(d.reason.startswith("timed") for d in decisions.values())
    assert_same_function(model, sparse, torch.randn(5, 16))


def test_sparsify_kind_of_a_layer():
    kind = sparsify_module._kind
    assert kind(pruned_linear("2:4")) == "linear_nm"
    assert kind(pruned_linear("1:8")) == "linear"  # stays CSR unless asked (see NM_AUTO_SLOTS)
    assert kind(zeroed_linear(nm_mask(OUT, IN, 2, 4, seed=24))) == "linear_nm"
    assert kind(pruned_linear("block:4x1", sparsity=0.875)) == "linear_block"
    assert kind(pruned_linear("block:8x1", sparsity=0.5)) == "linear_block"
    assert kind(pruned_linear("weight", sparsity=0.5)) == "linear"
    assert kind(masked_linear(IN, OUT, nm_mask(OUT, IN, 6, 8))) == "linear"
    assert kind(pruned_linear("2:4", in_features=36, out_features=16)) == "linear"


@pytest.mark.skipif("linear_nm" not in BREAK_EVEN, reason="BREAK_EVEN has no 'linear_nm' entry yet")
def test_sparsify_by_the_cost_model_handles_nm_layers():
    model = tp.prune(make_mlp(), granularity="2:4")
    decisions = plan(model)
    assert set(decisions) == {"0", "2", "4"}
    assert all(d.reason.startswith("cost model") and "linear_nm" in d.reason for d in decisions.values())
    sparse = tp.sparsify(model)
    for name, decision in decisions.items():
        layer = sparse.get_submodule(name)
        assert isinstance(layer, SparseLinear) == decision.swap, name
        assert not decision.swap or layer.nm == 4, name
    assert_same_function(model, sparse, torch.randn(5, 16))


def test_sparsify_mixes_formats_by_mask():
    model = make_mlp()
    tp.prune(model, scope={"0": 0.75})  # unstructured
    tp.prune(model[2], granularity="2:4")
    tp.prune(model[4], sparsity=0.5, granularity="block:4x1")
    sparse = tp.sparsify(model, min_sparsity=0.0)
    assert [sparse[i].format for i in (0, 2, 4)] == ["csr (int16 col_idx)", "nm 4:8 (int32 codes)",
                                                    "bsr 4x1 (int16 col_idx)"]
    assert_same_function(model, sparse, torch.randn(4, 16))
