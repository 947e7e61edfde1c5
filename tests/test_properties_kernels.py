"""Property-based tests (hypothesis) of the C++ ops against dense ATen references.

Every case draws shapes (sizes 0 included, extra leading dims, batch 0), a dtype, a mask density
(exactly 0 and exactly 1 included, and masks with whole empty rows) and memory layouts
(contiguous, transposed, sliced, channels_last), then checks:

* masked_linear / masked_conv2d: forward and every gradient equal autograd through
  ``F.linear`` / ``F.conv2d`` with ``where(mask, weight, 0)``; the weight gradient is exactly 0
  where the mask is false; pruned weights holding NaN/Inf change nothing;
* sparse_linear / sparse_conv2d on ``pack_csr(weight, mask)``: forward and gradients (input,
  stored values, bias) equal the dense reference (stride / padding / dilation drawn);
* pack_csr / unpack_csr: an exact round trip, a valid structure (check_csr), ascending columns,
  values in row-major order, int16 columns below 65,536 inputs;
* compact equals ``index_select`` for any dtype, dim, layout and index (repeats, empty).

References run in float64 on the very same (rounded) inputs. Tolerances follow the summation
error of a dot product of K terms, each |term| <= 1 (inputs are drawn in [-1, 1]): float32 and
float64 get atol = 8 * K * u and rtol = 8 * sqrt(K) * u (u: the dtype's unit roundoff; about
2e-5 for K = 40 in float32). float16 / bfloat16 accumulate in float32 and round once at the end
(the sparse ops by design, ATen's CPU half matmul/convolution likewise), so the error is about
one rounding of the result: rtol = 4u, plus atol = 4u * sqrt(K) for results near 0.

Settings are reproducible for CI: derandomize=True, no example database, no deadline, and a
bounded number of examples per property.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st

from torchprune import ops as _ops

from property_settings import SETTINGS, examples

OPS = torch.ops.torchprune

FLOATS = [torch.float32, torch.float64]
HALVES = [torch.float16, torch.bfloat16]
ALL_DTYPES = FLOATS + HALVES


def tol(dtype: torch.dtype, terms: int) -> dict:
    """rtol / atol for a sum of ``terms`` products of numbers in [-1, 1] computed in ``dtype``."""
    eps = torch.finfo(dtype).eps / 2  # unit roundoff
    k = max(terms, 1)
    if dtype in HALVES:
        return dict(rtol=4 * eps, atol=4 * eps * math.sqrt(k))
    return dict(rtol=8 * eps * math.sqrt(k), atol=8 * eps * k)


def uniform(shape, dtype, gen) -> torch.Tensor:
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A fresh copy of ``t`` in a memory layout (a view that is not contiguous, for all but
    "contiguous")."""
    if layout == "contiguous" or t.dim() == 0:
        return t.clone(memory_format=torch.contiguous_format)
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "channels_last" and t.dim() == 4:
        return t.clone(memory_format=torch.channels_last)
    # "sliced": every other element of a tensor twice as long in the last dim
    base = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
    base[..., ::2] = t
    return base[..., ::2]


def ref_leaf(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy of ``t`` for the reference, a leaf that records its gradient."""
    return t.detach().to(torch.float64, copy=True).requires_grad_()


def dense_reference(fn, x, w, mask, b, **args):
    """``fn(x, where(mask, w, 0), b, **args)`` in float64 on fresh leaves (ref_leaf) of x, w and b
    (b may be None): the reference output and the leaves, whose ``.grad`` the caller checks."""
    xr, wr = ref_leaf(x), ref_leaf(w)
    br = ref_leaf(b) if b is not None else None
    return fn(xr, torch.where(mask, wr, 0.0), br, **args), xr, wr, br


def make_mask(shape, mode: str, density: float, gen) -> torch.Tensor:
    """A bool mask: all true ("dense"), all false ("empty"), random, or random with empty rows."""
    event(f"mask {mode}")
    if mode == "dense":
        return torch.ones(shape, dtype=torch.bool)
    if mode == "empty":
        return torch.zeros(shape, dtype=torch.bool)
    mask = torch.rand(shape, generator=gen) < density
    if mode == "empty_rows" and shape[0]:
        rows = torch.rand(shape[0], generator=gen) < 0.5
        mask[rows] = False
    return mask


masks = st.tuples(st.sampled_from(["random", "empty_rows", "dense", "empty"]),
                  st.floats(0.0, 1.0))
seeds = st.integers(0, 2**31 - 1)


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype, terms, what: str) -> None:
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    torch.testing.assert_close(got.double(), expected.double(), **tol(dtype, terms), msg=lambda m: f"{what}: {m}")


def check_grad(leaf: torch.Tensor, expected: torch.Tensor, dtype, terms, what: str) -> None:
    """The gradient ``leaf`` received, if it asked for one; none at all if it did not."""
    if leaf.requires_grad:
        assert leaf.grad is not None, f"{what}: no gradient"
        assert_close(leaf.grad, expected, dtype, terms, what)
    else:
        assert leaf.grad is None, f"{what}: a gradient nobody asked for"


# ---------------------------------------------------------------------------------------------
# masked_linear


@settings(max_examples=examples(60), **SETTINGS)
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    in_f=st.integers(0, 40),
    out_f=st.integers(0, 24),
    dtype=st.sampled_from(ALL_DTYPES),
    mask_spec=masks,
    bias=st.booleans(),
    poison=st.booleans(),
    x_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    w_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    need=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    seed=seeds,
)
def test_masked_linear_matches_dense(lead, in_f, out_f, dtype, mask_spec, bias, poison, x_layout, w_layout, need, seed):
    gen = torch.Generator().manual_seed(seed)
    x = uniform((*lead, in_f), dtype, gen)
    if x.dim() == 1 and x_layout == "transposed":
        x_layout = "sliced"
    w = uniform((out_f, in_f), dtype, gen)
    mask = make_mask(w.shape, *mask_spec, gen)
    b = uniform((out_f,), dtype, gen) if bias else None
    stored = w.clone()
    if poison:  # pruned entries count as exactly 0 whatever they hold
        stored[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf")],
                                     dtype=dtype).repeat(w.numel())[: int((~mask).sum())]
    grad_out = uniform((*lead, out_f), dtype, gen)

    xs = laid_out(x, x_layout).requires_grad_(need[0])
    ws = laid_out(stored, w_layout).requires_grad_(need[1])
    bs = b.clone().requires_grad_(need[2]) if bias else None
    y = _ops.masked_linear(xs, ws, laid_out(mask, w_layout), bs)
    if y.requires_grad:  # the backward computes only the requested gradients
        y.backward(grad_out)

    y_ref, xr, wr, br = dense_reference(F.linear, x, w, mask, b)
    y_ref.backward(grad_out.double())

    batch = math.prod(lead)
    assert_close(y, y_ref, dtype, in_f + 1, "forward")
    check_grad(xs, xr.grad, dtype, out_f, "grad x")
    check_grad(ws, wr.grad, dtype, batch, "grad weight")
    if ws.requires_grad:
        assert bool((ws.grad[~mask] == 0).all()), "grad weight must be exactly 0 where the mask is false"
    if bias:
        check_grad(bs, br.grad, dtype, batch, "grad bias")


# ---------------------------------------------------------------------------------------------
# convolutions: a geometry strategy shared by masked_conv2d and sparse_conv2d


@st.composite
def conv_geometry(draw, grouped: bool):
    groups = draw(st.integers(1, 3)) if grouped else 1
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    size = []
    for d in range(2):
        span = dilation[d] * (kernel[d] - 1) + 1
        size.append(max(1, span - 2 * padding[d]) + draw(st.integers(0, 4)))
    batch = draw(st.integers(0, 3))
    return dict(batch=batch, cin=cin, cout=cout, kernel=kernel, stride=stride, padding=padding,
                dilation=dilation, groups=groups, size=tuple(size))


X4_LAYOUTS = ["contiguous", "channels_last", "sliced", "transposed"]


@settings(max_examples=examples(50), **SETTINGS)
@given(
    geo=conv_geometry(grouped=True),
    dtype=st.sampled_from(ALL_DTYPES),
    mask_spec=masks,
    bias=st.booleans(),
    poison=st.booleans(),
    x_layout=st.sampled_from(X4_LAYOUTS),
    w_layout=st.sampled_from(["contiguous", "channels_last", "sliced"]),
    need=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    seed=seeds,
)
def test_masked_conv2d_matches_dense(geo, dtype, mask_spec, bias, poison, x_layout, w_layout, need, seed):
    gen = torch.Generator().manual_seed(seed)
    g = geo["groups"]
    x = uniform((geo["batch"], geo["cin"], *geo["size"]), dtype, gen)
    w = uniform((geo["cout"], geo["cin"] // g, *geo["kernel"]), dtype, gen)
    mask = make_mask(w.shape, *mask_spec, gen)
    b = uniform((geo["cout"],), dtype, gen) if bias else None
    stored = w.clone()
    if poison:
        stored[~mask] = float("nan")
    args = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"], groups=g)

    y_ref, xr, wr, br = dense_reference(F.conv2d, x, w, mask, b, **args)
    grad_out = uniform(y_ref.shape, dtype, gen)
    y_ref.backward(grad_out.double())

    xs = laid_out(x, x_layout).requires_grad_(need[0])
    ws = laid_out(stored, w_layout).requires_grad_(need[1])
    bs = b.clone().requires_grad_(need[2]) if bias else None
    y = _ops.masked_conv2d(xs, ws, laid_out(mask, w_layout), bs, **args)
    if y.requires_grad:  # the backward computes only the requested gradients
        y.backward(grad_out)

    kh, kw = geo["kernel"]
    terms = geo["cin"] // g * kh * kw
    pixels = y_ref.shape[0] * y_ref.shape[2] * y_ref.shape[3]
    assert_close(y, y_ref, dtype, terms + 1, "forward")
    check_grad(xs, xr.grad, dtype, geo["cout"] // g * kh * kw, "grad x")
    check_grad(ws, wr.grad, dtype, pixels, "grad weight")
    if ws.requires_grad:
        assert bool((ws.grad[~mask] == 0).all()), "grad weight must be exactly 0 where the mask is false"
    if bias:
        check_grad(bs, br.grad, dtype, pixels, "grad bias")


# ---------------------------------------------------------------------------------------------
# sparse_linear / sparse_conv2d on packed weights


def _packed_reference(w2d: torch.Tensor, mask: torch.Tensor, need_values: bool):
    row_ptr, col_idx, values = _ops.pack_csr(w2d, mask)
    assert values.numel() == int(mask.sum())
    return row_ptr, col_idx, values.clone().requires_grad_(need_values)


@settings(max_examples=examples(60), **SETTINGS)
@given(
    lead=st.lists(st.integers(0, 5), min_size=0, max_size=2),
    batch_one=st.booleans(),
    in_f=st.integers(0, 40),
    out_f=st.integers(0, 24),
    dtype=st.sampled_from(ALL_DTYPES),
    mask_spec=masks,
    bias=st.booleans(),
    x_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    need=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    seed=seeds,
)
def test_sparse_linear_matches_dense(lead, batch_one, in_f, out_f, dtype, mask_spec, bias, x_layout, need, seed):
    if batch_one:  # the gather-dot path
        lead = [1] * len(lead)
    gen = torch.Generator().manual_seed(seed)
    x = uniform((*lead, in_f), dtype, gen)
    if x.dim() == 1 and x_layout == "transposed":
        x_layout = "sliced"
    w = uniform((out_f, in_f), dtype, gen)
    mask = make_mask(w.shape, *mask_spec, gen)
    b = uniform((out_f,), dtype, gen) if bias else None
    grad_out = uniform((*lead, out_f), dtype, gen)

    row_ptr, col_idx, values = _packed_reference(w, mask, need[1])
    xs = laid_out(x, x_layout).requires_grad_(need[0])
    bs = b.clone().requires_grad_(need[2]) if bias else None
    y = _ops.sparse_linear(xs, row_ptr, col_idx, values, in_f, bs)
    if y.requires_grad:  # the backward computes only the requested gradients
        y.backward(grad_out)

    y_ref, xr, wr, br = dense_reference(F.linear, x, w, mask, b)
    y_ref.backward(grad_out.double())

    batch = math.prod(lead)
    assert_close(y, y_ref, dtype, in_f + 1, "forward")
    check_grad(xs, xr.grad, dtype, out_f, "grad x")
    check_grad(values, wr.grad[mask], dtype, batch, "grad values")
    if bias:
        check_grad(bs, br.grad, dtype, batch, "grad bias")


@settings(max_examples=examples(50), **SETTINGS)
@given(
    geo=conv_geometry(grouped=False),
    dtype=st.sampled_from(ALL_DTYPES),
    mask_spec=masks,
    bias=st.booleans(),
    x_layout=st.sampled_from(X4_LAYOUTS),
    need=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    seed=seeds,
)
def test_sparse_conv2d_matches_dense(geo, dtype, mask_spec, bias, x_layout, need, seed):
    gen = torch.Generator().manual_seed(seed)
    x = uniform((geo["batch"], geo["cin"], *geo["size"]), dtype, gen)
    w = uniform((geo["cout"], geo["cin"], *geo["kernel"]), dtype, gen)
    mask = make_mask(w.shape, *mask_spec, gen)
    b = uniform((geo["cout"],), dtype, gen) if bias else None
    args = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"])

    y_ref, xr, wr, br = dense_reference(F.conv2d, x, w, mask, b, **args)
    grad_out = uniform(y_ref.shape, dtype, gen)
    y_ref.backward(grad_out.double())

    row_ptr, col_idx, values = _packed_reference(w.reshape(geo["cout"], -1), mask.reshape(geo["cout"], -1), need[1])
    xs = laid_out(x, x_layout).requires_grad_(need[0])
    bs = b.clone().requires_grad_(need[2]) if bias else None
    y = _ops.sparse_conv2d(xs, row_ptr, col_idx, values, geo["kernel"], bs, **args)
    if y.requires_grad:  # the backward computes only the requested gradients
        y.backward(grad_out)

    kh, kw = geo["kernel"]
    pixels = y_ref.shape[0] * y_ref.shape[2] * y_ref.shape[3]
    assert_close(y, y_ref, dtype, geo["cin"] * kh * kw + 1, "forward")
    check_grad(xs, xr.grad, dtype, geo["cout"] * kh * kw, "grad x")
    check_grad(values, wr.grad[mask], dtype, pixels, "grad values")
    if bias:
        check_grad(bs, br.grad, dtype, pixels, "grad bias")


# ---------------------------------------------------------------------------------------------
# pack_csr / unpack_csr / check_csr


def _check_structure(row_ptr, col_idx, values, keep: torch.Tensor, w: torch.Tensor) -> None:
    rows, cols = keep.shape
    assert row_ptr.dtype == torch.int32 and row_ptr.shape == (rows + 1,)
    assert col_idx.dtype == (torch.int16 if cols < 65536 else torch.int32)
    assert values.dtype == w.dtype and values.numel() == col_idx.numel() == int(keep.sum())
    assert row_ptr[0] == 0 and torch.equal(row_ptr.diff().long(), keep.sum(1))
    columns = col_idx.long() & 0xFFFF if col_idx.dtype == torch.int16 else col_idx.long()
    expected_cols = keep.nonzero()[:, 1]  # row-major: ascending columns within each row
    assert torch.equal(columns, expected_cols)
    torch.testing.assert_close(values, w[keep], rtol=0, atol=0, equal_nan=True)  # bit for bit
    _ops.check_csr(row_ptr, col_idx, values, cols)


@settings(max_examples=examples(60), **SETTINGS)
@given(
    rows=st.integers(0, 20),
    cols=st.integers(0, 40),
    dtype=st.sampled_from(ALL_DTYPES),
    with_mask=st.booleans(),
    mask_spec=masks,
    specials=st.booleans(),
    layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    seed=seeds,
)
def test_pack_unpack_round_trip(rows, cols, dtype, with_mask, mask_spec, specials, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    w = uniform((rows, cols), dtype, gen)
    zeros = make_mask(w.shape, *mask_spec, gen)
    w[zeros] = 0.0  # exact zeros, stored (with a mask) or dropped (without)
    if specials and w.numel():  # -0.0 is a zero; NaN / Inf are values like any other
        pick = torch.randint(0, 4, w.shape, generator=gen)
        w[pick == 1] = -0.0
        w[(pick == 2) & ~zeros] = float("nan")
        w[(pick == 3) & ~zeros] = float("inf")
    mask = make_mask(w.shape, "random", 0.5, gen) if with_mask else None
    keep = mask if with_mask else (w != 0)
    row_ptr, col_idx, values = _ops.pack_csr(laid_out(w, layout), None if mask is None else laid_out(mask, layout))
    _check_structure(row_ptr, col_idx, values, keep, w)
    dense = _ops.unpack_csr(row_ptr, col_idx, values, cols)
    expected = torch.where(keep, w, torch.zeros((), dtype=dtype))
    assert dense.dtype == dtype and dense.shape == (rows, cols)
    torch.testing.assert_close(dense, expected, rtol=0, atol=0, equal_nan=True)
    # the sign of zero survives where an entry was stored (bitwise equal)
    assert torch.equal(torch.signbit(dense[keep]), torch.signbit(w[keep]))


@settings(max_examples=examples(12), **SETTINGS)
@given(
    cols=st.sampled_from([32767, 32768, 40000, 65535, 65536, 70001]),
    rows=st.integers(1, 3),
    density=st.floats(0.0, 0.01),
    last_column=st.booleans(),
    seed=seeds,
)
def test_wide_layers_pack_and_multiply(cols, rows, density, last_column, seed):
    """Columns >= 32,768 sit in int16 as negative numbers, >= 65,536 in int32: both round-trip
    and multiply correctly."""
    gen = torch.Generator().manual_seed(seed)
    w = uniform((rows, cols), torch.float32, gen)
    mask = torch.rand(w.shape, generator=gen) < density
    if last_column:
        mask[:, -1] = True
    row_ptr, col_idx, values = _ops.pack_csr(w, mask)
    _check_structure(row_ptr, col_idx, values, mask, w)
    torch.testing.assert_close(_ops.unpack_csr(row_ptr, col_idx, values, cols), torch.where(mask, w, 0.0),
                               rtol=0, atol=0)
    x = uniform((2, cols), torch.float32, gen)
    for batch in (x[:1], x):
        y = _ops.sparse_linear(batch, row_ptr, col_idx, values, cols)
        y_ref = F.linear(batch.double(), torch.where(mask, w, 0.0).double())
        assert_close(y, y_ref, torch.float32, int(mask.sum(1).max()) + 1, "forward")


# ---------------------------------------------------------------------------------------------
# compact


@st.composite
def compact_item(draw):
    dims = draw(st.integers(1, 3))
    shape = draw(st.lists(st.integers(0, 5), min_size=dims, max_size=dims))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                  torch.int64, torch.int32, torch.uint8, torch.bool]))
    dim = draw(st.integers(-dims, dims - 1))
    size = shape[dim]
    count = draw(st.integers(0, 7))
    index = [draw(st.integers(0, size - 1)) for _ in range(count)] if size else []
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    return shape, dtype, dim, index, layout


@settings(max_examples=examples(60), **SETTINGS)
@given(items=st.lists(compact_item(), min_size=1, max_size=4), shared=st.booleans(), seed=seeds)
def test_compact_matches_index_select(items, shared, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors, dims, indices = [], [], []
    for shape, dtype, dim, index, layout in items:
        if dtype.is_floating_point:
            t = uniform(shape, dtype, gen)
        else:
            t = torch.randint(0, 2 if dtype == torch.bool else 100, shape, generator=gen).to(dtype)
        if shared and tensors and tensors[0].shape == t.shape and tensors[0].dtype == t.dtype:
            t = tensors[0]  # the same tensor twice, cut along different dims
        else:
            t = laid_out(t, layout if t.dim() >= 2 or layout != "transposed" else "sliced")
        tensors.append(t)
        dims.append(dim)
        indices.append(torch.tensor(index, dtype=torch.int64))
    before = [t.clone() for t in tensors]
    out = _ops.compact(tensors, dims, indices)
    assert len(out) == len(tensors)
    for t, d, i, o, b in zip(tensors, dims, indices, out, before):
        expected = t.index_select(d, i)
        assert o.dtype == t.dtype and o.shape == expected.shape
        assert o.is_contiguous()
        assert torch.equal(o, expected)
        assert torch.equal(t, b)  # inputs untouched
        if o.numel():
            assert o.data_ptr() != t.data_ptr()  # a new tensor
