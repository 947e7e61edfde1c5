"""block_sparse_linear (csrc/cpu/block_sparse_linear.cpp, bsr_avx2.cpp; autograd in
csrc/autograd/sparse_ops.cpp) and the Python side of the R x 1 block format (torchprune/ops/bsr.py).

Forward: the fp32 AVX2 kernels (R = 4 and 8) on the shapes that pick their code paths -- batch 1
(block gather-dot) and batch > 1 (Xᵀ panels 16 wide for R = 4, 8 wide for R = 8, a ragged last
tile, groups of 8 output features stored by transposes and partial groups stored by scalars,
K-blocks of 384 columns once K > 512, 512-feature row chunks), 16-bit columns above 32767 (stored
as negative int16) and 32-bit columns -- and the portable loop (other R, float64, and the AVX2
kernels switched off by TORCHPRUNE_PORTABLE=1 / TORCHPRUNE_NO_AVX2=1 in a subprocess). Tolerances
come from the rounding bound of each dot product (tests/error_bounds.py) against float64
references, with the number of stored terms of each output as the dot length. Backward: gradcheck
and gradgradcheck in float64, and the float32 gradients against those of the dense F.linear.
"""


import pytest
import torch
import torch.nn.functional as F

from torchprune import ops as _ops
from torchprune.ops.bsr import block_pattern_rows, check_bsr, pack_bsr, unpack_bsr

from conftest import avx2_kernels_on, run_op_switched
from error_bounds import assert_close, assert_close_bounded, bilinear_references

OPS = torch.ops.torchprune


def block_weight(n, k, r, sparsity, g, dtype=torch.float32, empty_block_rows=()):
    """A weight [n, k] whose nonzeros are whole r x 1 blocks (each kept with probability
    1 - sparsity; the listed block rows empty) and that pattern as a bool mask."""
    keep = torch.rand(n // r, k, generator=g) >= sparsity
    for b in empty_block_rows:
        if b < n // r:
            keep[b] = False
    keep = keep.repeat_interleave(r, 0)
    w = torch.randn(n, k, generator=g, dtype=dtype) * keep
    return w, keep


def references(x, w, keep, b=None):
    """The float64 F.linear, its magnitude (every product taken positive) and the number of terms
    each output really sums (the stored products, plus the bias)."""
    x64, w64 = x.detach().double(), w.detach().double()
    b64 = None if b is None else b.detach().double()
    expected = F.linear(x64, w64, b64)
    magnitude = F.linear(x64.abs(), w64.abs(), None if b is None else b64.abs())
    terms = F.linear(torch.ones_like(x64), keep.double(), None if b is None else torch.ones_like(b64))
    return expected, magnitude, terms


def assert_bounded(y, x, w, keep, b=None, msg="output"):
    """y is x @ w.T + b within the rounding bound of y.dtype (halves: accumulated in float32)."""
    expected, magnitude, terms = references(x, w, keep, b)
    assert_close_bounded(y, expected, magnitude, terms, y.dtype, msg)


def run(x, w, keep, r, b=None):
    packed = pack_bsr(w, r, keep)
    return _ops.block_sparse_linear(x, *packed, w.shape[1], b)


# ---------------------------------------------------------------------------------------------
# Forward vs float64

BLOCK_ROWS = [1, 2, 3, 4, 8]
BATCHES = [1, 2, 7, 8, 9, 15, 16, 17, 33, 130]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
# in_features: one column, fewer than 8, one K-block (<= 512), just past the split (513: two
# K-blocks), three K-blocks the last of them one column wide (769 = 2 * 384 + 1), four K-blocks
COLUMNS = [1, 5, 64, 300, 513, 769, 1500]
BLOCK_ROW_COUNTS = [1, 2, 3, 5, 16, 33, 70]  # odd counts leave R = 4 a partial group of 8


@pytest.mark.parametrize("m", BATCHES)
@pytest.mark.parametrize("r", BLOCK_ROWS)
def test_forward_matches_float64(r, m):
    """Every sparsity for each (R, batch), with in_features rotating over COLUMNS across the batches
    (so every (R, in_features, sparsity) is run), and always one layer with several K-blocks."""
    g = torch.Generator().manual_seed(100 * r + m)
    shift = BATCHES.index(m)
    cases = [(COLUMNS[(j + shift) % len(COLUMNS)], sparsity) for j, sparsity in enumerate(SPARSITIES)]
    for i, (k, sparsity) in enumerate(cases + [(1500, 0.9)]):
        blocks = BLOCK_ROW_COUNTS[(i + shift) % len(BLOCK_ROW_COUNTS)]
        w, keep = block_weight(r * blocks, k, r, sparsity, g, empty_block_rows=(1,) if blocks > 2 else ())
        x = torch.randn(m, k, generator=g)
        b = torch.randn(r * blocks, generator=g) if (i + shift) % 2 else None
        y = run(x, w, keep, r, b)
        assert y.shape == (m, r * blocks)
        assert_bounded(y, x, w, keep, b, f"r={r} m={m} k={k} sparsity={sparsity} bias={b is not None}")


@pytest.mark.parametrize("m", [1, 9, 33])
@pytest.mark.parametrize("r", [4, 8])
def test_more_than_one_row_chunk_and_several_k_blocks(r, m):
    """1060 (R = 4: 265 block rows, a partial last group) or 1064 features: three 512-feature row
    chunks, each carried through three K-blocks; the batch leaves a ragged last tile."""
    g = torch.Generator().manual_seed(r + m)
    n = 1060 if r == 4 else 1064
    w, keep = block_weight(n, 1100, r, 0.8, g, empty_block_rows=(0, 130, 264))
    x, b = torch.randn(m, 1100, generator=g), torch.randn(n, generator=g)
    assert_bounded(run(x, w, keep, r, b), x, w, keep, b)
    assert_bounded(run(x, w, keep, r), x, w, keep)


@pytest.mark.parametrize("k", [40000, 65535])
@pytest.mark.parametrize("r", [3, 4, 8])
def test_16_bit_columns_above_32767(r, k):
    """int16 col_idx holds an unsigned column: 32768 .. 65534 are stored negative."""
    g = torch.Generator().manual_seed(k + r)
    n = 8 * r
    keep = torch.zeros(n // r, k, dtype=torch.bool)
    keep[:, torch.randint(0, k, (60,), generator=g)] = True
    keep[:, [32767, 32768, k - 1]] = True
    keep[2] = False
    keep = keep.repeat_interleave(r, 0)
    w = torch.randn(n, k, generator=g) * keep
    packed = pack_bsr(w, r, keep)
    assert packed[1].dtype == torch.int16 and int(packed[1].min()) < 0
    for m in (1, 2, 17):
        x, b = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
        assert_bounded(_ops.block_sparse_linear(x, *packed, k, b), x, w, keep, b, f"m={m}")


@pytest.mark.parametrize("r", [2, 4, 8])
def test_wide_layer_with_32_bit_columns(r):
    g = torch.Generator().manual_seed(4 + r)
    k, n = 70000, 4 * r
    keep = torch.zeros(n // r, k, dtype=torch.bool)
    keep.scatter_(1, torch.randint(0, k, (n // r, 50), generator=g), True)
    keep[:, [0, 65535, 65536, k - 1]] = True  # around the 16-bit limit and the last column
    keep = keep.repeat_interleave(r, 0)
    w = torch.randn(n, k, generator=g) * keep
    packed = pack_bsr(w, r, keep)
    assert packed[1].dtype == torch.int32
    for m in (1, 2, 9, 17):
        x, b = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
        assert_bounded(_ops.block_sparse_linear(x, *packed, k, b), x, w, keep, b, f"m={m}")


def non_contiguous_inputs(shape, g):
    """x of `shape`, laid out four ways that are not contiguous."""
    *lead, k = shape
    yield "every other column", torch.randn(*lead, 2 * k, generator=g)[..., ::2]
    yield "transposed", torch.randn(*reversed(shape), generator=g).permute(*reversed(range(len(shape))))
    yield "row-sliced", torch.randn(*lead[:-1], 2 * lead[-1], k, generator=g)[..., ::2, :]
    yield "expanded", torch.randn(*lead[:-1], 1, k, generator=g).expand(shape)


@pytest.mark.parametrize("r", [3, 4, 8])
def test_leading_dims_and_non_contiguous_input(r):
    g = torch.Generator().manual_seed(5 + r)
    for k in (70, 600):
        w, keep = block_weight(8 * r, k, r, 0.7, g, empty_block_rows=(2,))
        b = torch.randn(16 * r, generator=g)[::2]  # a strided bias too
        for shape in ((2, 3, k), (1, k), (2, 9, k)):
            x = torch.randn(shape, generator=g)
            y = run(x, w, keep, r, b)
            assert y.shape == (*shape[:-1], 8 * r)
            assert_bounded(y, x, w, keep, b, f"shape {shape}")
            for how, x in non_contiguous_inputs(shape, g) if shape[-2] > 1 else ():
                assert not x.is_contiguous()
                assert_bounded(run(x, w, keep, r, b), x, w, keep, b, f"{how} {shape}")


# ---------------------------------------------------------------------------------------------
# Empty shapes

@pytest.mark.parametrize("m", [1, 5, 20])
@pytest.mark.parametrize("r", [3, 4, 8])
def test_empty_shapes(r, m):
    g = torch.Generator().manual_seed(r * m)
    # no output features: block_ptr = [0], values [0, R]
    packed = pack_bsr(torch.zeros(0, 10), r)
    assert packed[0].tolist() == [0] and packed[2].shape == (0, r)
    y = _ops.block_sparse_linear(torch.randn(m, 10, generator=g), *packed, 10, torch.zeros(0))
    assert y.shape == (m, 0)
    # no input features: the output is the bias (zeros without one)
    packed = pack_bsr(torch.zeros(4 * r, 0), r)
    b = torch.randn(4 * r, generator=g)
    assert torch.equal(_ops.block_sparse_linear(torch.randn(m, 0), *packed, 0, b), b.expand(m, -1))
    assert torch.equal(_ops.block_sparse_linear(torch.randn(m, 0), *packed, 0), torch.zeros(m, 4 * r))
    # nothing stored, every block row empty: bias exactly
    packed = pack_bsr(torch.zeros(4 * r, 700), r)
    assert packed[2].shape == (0, r)
    x = torch.randn(m, 700, generator=g)
    assert torch.equal(_ops.block_sparse_linear(x, *packed, 700, b), b.expand(m, -1))
    assert torch.equal(_ops.block_sparse_linear(x, *packed, 700), torch.zeros(m, 4 * r))


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("r", [3, 4, 8])
def test_empty_shapes_backward(r, create_graph):
    """No output features, no input features, nothing stored: x's gradient is zero, the bias's the
    column sums of the upstream gradient, the value gradient [0, R]."""
    g = torch.Generator().manual_seed(r)
    for n, k in ((0, 10), (4 * r, 0), (4 * r, 700)):
        block_ptr, col_idx, values = pack_bsr(torch.zeros(n, k), r)
        for m in (1, 5, 20):
            x = torch.randn(m, k, generator=g, requires_grad=True)
            v, b = values.clone().requires_grad_(), torch.randn(n, generator=g, requires_grad=True)
            y = _ops.block_sparse_linear(x, block_ptr, col_idx, v, k, b)
            grad = torch.randn(y.shape, generator=g)
            gx, gv, gb = torch.autograd.grad(y, (x, v, b), grad, create_graph=create_graph)
            assert torch.equal(gx, torch.zeros(m, k)), (n, k, m)
            assert gv.shape == (0, r)
            assert_close_bounded(gb, grad.double().sum(0), grad.double().abs().sum(0), m, torch.float32, "grad_bias")


@pytest.mark.parametrize("r", [3, 4, 8])
def test_empty_batch(r):
    g = torch.Generator().manual_seed(r)
    w, keep = block_weight(4 * r, 30, r, 0.5, g)
    packed = pack_bsr(w, r, keep)
    for shape in ((0, 30), (2, 0, 30)):
        x = torch.randn(shape, generator=g, requires_grad=True)
        values = packed[2].clone().requires_grad_()
        b = torch.randn(4 * r, generator=g, requires_grad=True)
        y = _ops.block_sparse_linear(x, *packed[:2], values, 30, b)
        assert y.shape == (*shape[:-1], 4 * r)
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(values.grad, torch.zeros_like(values))
        assert torch.equal(b.grad, torch.zeros_like(b))


# ---------------------------------------------------------------------------------------------
# Other dtypes

@pytest.mark.parametrize("m", [1, 9, 40])
@pytest.mark.parametrize("r", [1, 4, 8])
def test_float64(r, m):
    g = torch.Generator().manual_seed(r + m)
    for k, sparsity in ((33, 0.5), (700, 0.9)):
        w, keep = block_weight(8 * r, k, r, sparsity, g, torch.float64, empty_block_rows=(3,))
        x, b = torch.randn(m, k, generator=g, dtype=torch.float64), torch.randn(8 * r, generator=g, dtype=torch.float64)
        y = run(x, w, keep, r, b)
        assert y.dtype == torch.float64
        assert_bounded(y, x, w, keep, b, f"k={k}")


@pytest.mark.parametrize("m", [1, 9, 40])
@pytest.mark.parametrize("r", [3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(dtype, r, m):
    """The float32 op on the same (converted) inputs, rounded once: bit for bit."""
    g = torch.Generator().manual_seed(r + m)
    w, keep = block_weight(8 * r, 600, r, 0.8, g, empty_block_rows=(1,))
    w, x, b = w.to(dtype), torch.randn(m, 600, generator=g).to(dtype), torch.randn(8 * r, generator=g).to(dtype)
    packed = pack_bsr(w, r, keep)
    y = _ops.block_sparse_linear(x, *packed, 600, b)
    assert y.dtype == dtype
    as_float = _ops.block_sparse_linear(x.float(), *packed[:2], packed[2].float(), 600, b.float())
    assert torch.equal(y, as_float.to(dtype))
    assert_bounded(y, x, w, keep, b)


# ---------------------------------------------------------------------------------------------
# Threads

@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m", [1, 70])
@pytest.mark.parametrize("r", [3, 4, 8])
def test_any_thread_count_gives_the_same_bits(r, m, threads):
    """Threads split block rows, never a dot product: the result cannot depend on them. The layer
    is large enough for the op to use more than one thread."""
    g = torch.Generator().manual_seed(3 + r)
    n = 1024 if m == 1 else 520
    w, keep = block_weight(n - n % r, 777, r, 0.5 if m == 1 else 0.8, g, empty_block_rows=(0, 7))
    x, b = torch.randn(m, 777, generator=g), torch.randn(w.shape[0], generator=g)
    packed = pack_bsr(w, r, keep)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ops.block_sparse_linear(x, *packed, 777, b)
        torch.set_num_threads(threads)
        assert torch.equal(_ops.block_sparse_linear(x, *packed, 777, b), one)
    finally:
        torch.set_num_threads(before)
    assert_bounded(one, x, w, keep, b)


# ---------------------------------------------------------------------------------------------
# The portable loop (AVX2 kernels switched off) agrees with the AVX2 kernels

PORTABLE_CASES = [  # (r, m, n, k, sparsity)
    (4, 1, 64, 700, 0.5), (8, 1, 64, 700, 0.5), (4, 17, 44, 300, 0.7), (8, 9, 40, 1100, 0.9),
    (4, 33, 600, 900, 0.8), (8, 2, 24, 40000, 0.999), (4, 3, 8, 70000, 0.999), (3, 5, 12, 50, 0.5),
]


@pytest.mark.parametrize("switch", ["TORCHPRUNE_PORTABLE", "TORCHPRUNE_NO_AVX2"])
def test_portable_loop_matches_avx2(switch, tmp_path):
    g = torch.Generator().manual_seed(6)
    cases, dense = [], []
    for r, m, n, k, sparsity in PORTABLE_CASES:
        w, keep = block_weight(n, k, r, sparsity, g, empty_block_rows=(1,))
        x, b = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
        cases.append((x, *pack_bsr(w, r, keep), k, b))
        dense.append((w, keep))
    portable = run_op_switched("block_sparse_linear", cases, switch, tmp_path)
    differs = False
    for (x, *packed, k, b), (w, keep), y_portable, case in zip(cases, dense, portable, PORTABLE_CASES):
        y = _ops.block_sparse_linear(x, *packed, k, b)
        assert_bounded(y, x, w, keep, b, f"AVX2 {case}")
        assert_bounded(y_portable, x, w, keep, b, f"{switch}=1 {case}")
        differs |= not torch.equal(y, y_portable)
    if avx2_kernels_on():
        # The two paths sum in different orders (batch 1: four accumulators vs one) and round
        # differently (FMA): if every bit agreed, the switch would not have reached the op.
        assert differs, f"{switch}=1 gave the AVX2 kernels' bits on every case: the switch had no effect"


# ---------------------------------------------------------------------------------------------
# Gradients

def gradcheck_args(r, bias, g):
    w, keep = block_weight(3 * r, 6, r, 0.5, g, torch.float64, empty_block_rows=(1,))
    block_ptr, col_idx, values = pack_bsr(w, r, keep)
    assert values.shape[0] > 0
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3 * r, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    return x, block_ptr, col_idx, values.requires_grad_(), b


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("r", [2, 4])
def test_gradcheck(r, bias):
    g = torch.Generator().manual_seed(r)
    x, block_ptr, col_idx, values, b = gradcheck_args(r, bias, g)
    fn = lambda x_, v_, *b_: _ops.block_sparse_linear(x_, block_ptr, col_idx, v_, 6, *b_)  # noqa: E731
    inputs = (x, values, b) if bias else (x, values)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def dense_gradient_check(r, x, w, keep, b, g, create_graph=False):
    """x.grad, values.grad and bias.grad of the op vs the float64 gradients of F.linear with the
    dense weight (the value gradient at the stored positions, in block order), within the float32
    rounding bounds."""
    block_ptr, col_idx, values = pack_bsr(w, r, keep)
    xs, vs, bs = x.clone().requires_grad_(), values.clone().requires_grad_(), b.clone().requires_grad_()
    y = _ops.block_sparse_linear(xs, block_ptr, col_idx, vs, w.shape[1], bs)
    grad = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, (xs, vs, bs), grad, create_graph=create_graph)
    (_, want), (_, mags), (_, terms) = bilinear_references(F.linear, (x, w, b), grad)

    def at_stored(dense):  # the dense weight gradient [N, K] in the layout of values [blocks, R]
        return pack_bsr(dense, r, keep)[2]

    check = assert_close(torch.float32)
    check(grads[0], want[0], mags[0], terms[0], "grad_x")
    check(grads[1], at_stored(want[1]), at_stored(mags[1]), at_stored(terms[1]), "grad_values")
    check(grads[2], want[2], mags[2], terms[2], "grad_bias")


@pytest.mark.parametrize("m", [1, 17, 64])
@pytest.mark.parametrize("r", [3, 4, 8])
def test_gradients_match_dense(r, m):
    g = torch.Generator().manual_seed(7 * r + m)
    for n, k, sparsity in ((8 * r, 33, 0.5), (70 * r, 600, 0.9), (4 * r, 20, 1.0)):
        w, keep = block_weight(n, k, r, sparsity, g, empty_block_rows=(2,))
        dense_gradient_check(r, torch.randn(m, k, generator=g), w, keep, torch.randn(n, generator=g), g)


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("r", [4, 8])
def test_gradients_with_leading_dims_and_wide_columns(r, create_graph):
    """x [2, 3, K]; K = 40000 (int16 columns above 32767) and 70000 (int32): the backward's CSR
    form and, with create_graph, its differentiable dense form, keep the columns right."""
    g = torch.Generator().manual_seed(r)
    for k in (50, 40000, 70000):
        keep = torch.zeros(4, k, dtype=torch.bool)
        keep.scatter_(1, torch.randint(0, k, (4, 30), generator=g), True)
        keep[:, [0, k - 1]] = True
        keep[1] = False
        keep = keep.repeat_interleave(r, 0)
        w = torch.randn(4 * r, k, generator=g) * keep
        dense_gradient_check(r, torch.randn(2, 3, k, generator=g), w, keep, torch.randn(4 * r, generator=g), g,
                             create_graph)


@pytest.mark.parametrize("wanted", ["x", "values", "bias", "x+bias"])
def test_only_the_gradients_asked_for(wanted):
    """Each gradient on its own (the others' inputs not requiring grad) equals the one computed
    with all three, and nothing is computed for the rest."""
    g = torch.Generator().manual_seed(8)
    w, keep = block_weight(32, 50, 4, 0.5, g)
    block_ptr, col_idx, values = pack_bsr(w, 4, keep)
    x, b = torch.randn(9, 50, generator=g), torch.randn(32, generator=g)
    grad = torch.randn(9, 32, generator=g)
    inputs = dict(x=x, values=values, bias=b)
    leaves = {name: t.clone().requires_grad_() for name, t in inputs.items()}
    _ops.block_sparse_linear(leaves["x"], block_ptr, col_idx, leaves["values"], 50, leaves["bias"]).backward(grad)
    some = {name: t.clone().requires_grad_(name in wanted.split("+")) for name, t in inputs.items()}
    _ops.block_sparse_linear(some["x"], block_ptr, col_idx, some["values"], 50, some["bias"]).backward(grad)
    for name in inputs:
        if name in wanted.split("+"):
            assert torch.equal(some[name].grad, leaves[name].grad), name
        else:
            assert some[name].grad is None, name


@pytest.mark.parametrize("m", [1, 9, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_backward_is_the_equivalent_csr_backward(dtype, m):
    """The backward runs sparse_linear's on the CSR form of the blocks: with no zero inside a stored
    block, pack_csr of the unpacked weight is that CSR, so the gradients agree bit for bit (the
    value gradient taken back to block order)."""
    g = torch.Generator().manual_seed(m)
    r, k = 4, 300
    w, keep = block_weight(12 * r, k, r, 0.7, g, dtype, empty_block_rows=(3,))
    block_ptr, col_idx, values = pack_bsr(w, r, keep)
    row_ptr, csr_col, csr_values = _ops.pack_csr(w)
    assert csr_values.numel() == values.numel()
    x, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(12 * r, generator=g).to(dtype)
    grad = torch.randn(m, 12 * r, generator=g).to(dtype)
    bsr = [t.clone().requires_grad_() for t in (x, values, b)]
    csr = [t.clone().requires_grad_() for t in (x, csr_values, b)]
    y = _ops.block_sparse_linear(bsr[0], block_ptr, col_idx, bsr[1], k, bsr[2])
    y.backward(grad)
    _ops.sparse_linear(csr[0], row_ptr, csr_col, csr[1], k, csr[2]).backward(grad)
    assert y.dtype == dtype and bsr[1].grad.dtype == dtype
    assert torch.equal(bsr[0].grad, csr[0].grad)
    assert torch.equal(bsr[2].grad, csr[2].grad)
    # CSR entries in row-major order of the dense weight; block values as the layout says
    back = torch.zeros_like(w)
    back[keep] = csr[1].grad
    assert torch.equal(bsr[1].grad, pack_bsr(back, r, keep)[2])


# ---------------------------------------------------------------------------------------------
# pack_bsr / unpack_bsr / check_bsr / block_pattern_rows

@pytest.mark.parametrize("r", [1, 2, 3, 4, 8])
def test_pack_unpack_round_trip(r):
    g = torch.Generator().manual_seed(r)
    for k in (1, 37, 40000, 70000):
        w, keep = block_weight(6 * r, k, r, 0.99 if k > 1000 else 0.5, g, torch.float64, empty_block_rows=(2,))
        block_ptr, col_idx, values = pack_bsr(w, r)
        assert block_ptr.dtype == torch.int32 and block_ptr.shape == (7,)
        assert col_idx.dtype == (torch.int32 if k >= 65536 else torch.int16)
        assert values.shape == (int(keep[::r].sum()), r) and values.dtype == torch.float64
        assert block_ptr[2] == block_ptr[3]  # the empty block row
        check_bsr(block_ptr, col_idx, values, k)
        assert torch.equal(unpack_bsr(block_ptr, col_idx, values, k), w)
        # the layout itself: values[j, i] = W[b * R + i, col_idx[j]]
        columns = col_idx.long() & 0xFFFF if col_idx.dtype == torch.int16 else col_idx.long()
        for b in range(6):
            for j in range(int(block_ptr[b]), int(block_ptr[b + 1])):
                assert torch.equal(values[j], w[b * r:(b + 1) * r, columns[j]])
            cols = columns[int(block_ptr[b]):int(block_ptr[b + 1])]
            assert torch.equal(cols, keep[b * r].nonzero().flatten())  # ascending, all kept


def test_pack_docstring_example():
    block_ptr, col_idx, values = pack_bsr(torch.tensor([[0.0, 2.0], [0.0, 3.0]]), 2)
    assert (block_ptr.tolist(), col_idx.tolist(), values.tolist()) == ([0, 1], [1], [[2.0, 3.0]])


def test_pack_with_mask_stores_kept_zero_blocks():
    w = torch.tensor([[0.0, 1.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 2.0],
                      [0.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, False, True, False],
                         [True, False, True, False],
                         [False, False, False, True],
                         [False, False, False, True]])
    block_ptr, col_idx, values = pack_bsr(w, 2, mask)
    assert block_ptr.tolist() == [0, 2, 3]
    assert col_idx.tolist() == [0, 2, 3]  # the all-zero kept blocks, and not the unkept nonzeros
    assert values.tolist() == [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    # without a mask: every block holding a nonzero, its zeros included
    block_ptr, col_idx, values = pack_bsr(w, 2)
    assert block_ptr.tolist() == [0, 2, 2]
    assert col_idx.tolist() == [1, 3]
    assert values.tolist() == [[1.0, 0.0], [0.0, 2.0]]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda w: pack_bsr(w, 2, torch.eye(4, 6, dtype=torch.bool)), "block"),  # half-kept blocks
        (lambda w: pack_bsr(w, 3), "divide"),
        (lambda w: pack_bsr(w, 0), "block_rows"),
        (lambda w: pack_bsr(w, -2), "block_rows"),
        (lambda w: pack_bsr(w, 2.0), "block_rows"),
        (lambda w: pack_bsr(w.flatten(), 2), "2-D"),
        (lambda w: pack_bsr(w.reshape(2, 2, 6), 2), "2-D"),
        (lambda w: pack_bsr(w, 2, torch.ones(4, 5, dtype=torch.bool)), "mask"),
        (lambda w: pack_bsr(w, 2, torch.ones(4, 6)), "mask"),
    ],
)
def test_pack_refuses(call, message):
    w = torch.randn(4, 6)
    with pytest.raises(ValueError, match=message):
        call(w)


def valid_bsr():
    w = torch.zeros(8, 6)
    w[0:4, [1, 3, 4]] = 1.0
    w[4:8, [0, 5]] = 2.0
    return pack_bsr(w, 4)  # block_ptr [0, 3, 5], col_idx [1, 3, 4, 0, 5]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: (p[0], p[1][[1, 0, 2, 3, 4]], p[2]), "ascend"),  # unsorted within a block row
        (lambda p: (p[0], torch.tensor([1, 3, 6, 0, 5], dtype=torch.int16), p[2]), "in_features"),
        (lambda p: (p[0], torch.tensor([1, 3, 4, 0, -1], dtype=torch.int16), p[2]), "in_features"),
        (lambda p: (torch.tensor([0, 3, 4], dtype=torch.int32), p[1], p[2]), "end at"),
        (lambda p: (p[0], p[1], p[2].flatten()), "2-D"),
        (lambda p: (p[0], p[1], p[2][:, :, None]), "2-D"),
        (lambda p: (p[0], p[1][:4], p[2]), "one entry per stored block"),
    ],
)
def test_check_bsr_refuses(change, message):
    block_ptr, col_idx, values = valid_bsr()
    check_bsr(block_ptr, col_idx, values, 6)  # the valid one passes
    with pytest.raises(ValueError, match=message):
        check_bsr(*change((block_ptr, col_idx, values)), 6)


def test_block_pattern_rows():
    g = torch.Generator().manual_seed(0)
    eight = (torch.rand(4, 30, generator=g) < 0.5).repeat_interleave(8, 0)
    assert block_pattern_rows(eight) == 8
    four = eight.clone()
    four[4:8] = ~four[4:8]  # whole 4 x 1 blocks, no longer whole 8 x 1 ones
    assert block_pattern_rows(four) == 4
    assert block_pattern_rows((torch.rand(4, 30, generator=g) < 0.5).repeat_interleave(4, 0)[4:]) == 4  # N = 12
    assert block_pattern_rows(torch.rand(32, 30, generator=g) < 0.5) is None
    assert block_pattern_rows(torch.ones(32, 30, dtype=torch.bool)) is None
    one_off = eight.clone()
    one_off[3, 0] = ~one_off[3, 0]
    assert block_pattern_rows(one_off) is None
    assert block_pattern_rows(eight, candidates=(4,)) == 4


# ---------------------------------------------------------------------------------------------
# Argument errors (C++): each names the argument

def error_args():
    w = torch.zeros(8, 6)
    w[0:4, [1, 3]] = 1.0
    w[4:8, 5] = 2.0
    block_ptr, col_idx, values = pack_bsr(w, 4)
    return dict(x=torch.ones(3, 6), block_ptr=block_ptr, col_idx=col_idx, values=values, in_features=6, bias=None)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(block_ptr=lambda a: a["block_ptr"].long()), "`block_ptr` must have dtype"),
        (dict(block_ptr=lambda a: a["block_ptr"][None]), "`block_ptr` must be 1-D"),
        (dict(block_ptr=lambda a: torch.tensor([0, 2, 2], dtype=torch.int32)), "`block_ptr` must start at 0 and end"),
        (dict(values=lambda a: a["values"].flatten()), "`values` must be 2-D"),
        (dict(values=lambda a: a["values"].double()), "`values` must have the same dtype as `x`"),
        (dict(values=lambda a: a["values"][:2]), "`col_idx` and `values` must have one entry per stored block"),
        (dict(values=lambda a: a["values"][:, :0]), "`values` must be \\[blocks, R\\] with R >= 1"),
        (dict(values=lambda a: a["values"].t().contiguous().t()), "`block_ptr`, `col_idx` and `values` must be contig"),
        (dict(col_idx=lambda a: a["col_idx"].int()), "`col_idx` must have dtype"),
        (dict(x=lambda a: torch.ones(3, 5)), "`x` must have in_features = 6"),
        (dict(x=lambda a: torch.ones(3, 6, dtype=torch.int64)), "`x` must be a floating point"),
        (dict(bias=lambda a: torch.ones(7)), "`bias` must have shape \\[8\\]"),
        (dict(bias=lambda a: torch.ones(1, 8)), "`bias` must have shape \\[8\\]"),
        (dict(bias=lambda a: torch.ones(8, dtype=torch.float64)), "`bias` must have the same dtype as `x`"),
        (dict(x=lambda a: torch.ones(())), "`x` must have in_features = 6"),
        (dict(in_features=lambda a: -1), "`in_features` must be >= 0"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_argument_errors_name_the_argument(change, message):
    args = error_args()
    args.update({name: make(args) for name, make in change.items()})
    with pytest.raises(RuntimeError, match="block_sparse_linear: " + message):
        OPS.block_sparse_linear(*args.values())


# ---------------------------------------------------------------------------------------------
# torch.compile / fake tensors

def opcheck_samples(r):
    g = torch.Generator().manual_seed(r)
    x, block_ptr, col_idx, values, b = gradcheck_args(r, True, g)
    yield x, block_ptr, col_idx, values, 6, b
    yield x.detach(), block_ptr, col_idx, values.detach(), 6, None
    # float32 through the AVX2 panel kernel (R = 4) and the portable loop (R = 2)
    w, keep = block_weight(8 * r, 40, r, 0.5, g)
    packed = pack_bsr(w, r, keep)
    yield torch.randn(20, 40, generator=g, requires_grad=True), *packed[:2], packed[2].requires_grad_(), 40, None


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("r", [2, 4])
def test_opcheck_schema_autograd_registration_and_fake(r):
    for args in opcheck_samples(r):
        torch.library.opcheck(OPS.block_sparse_linear, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("r", [2, 4])
def test_opcheck(r):
    for args in opcheck_samples(r):
        torch.library.opcheck(OPS.block_sparse_linear, args)


def compile_args():
    g = torch.Generator().manual_seed(0)
    w, keep = block_weight(32, 40, 4, 0.5, g)
    block_ptr, col_idx, values = pack_bsr(w, 4, keep)
    x = torch.randn(2, 9, 40, generator=g, requires_grad=True)
    v, b = values.clone().requires_grad_(), torch.randn(32, generator=g, requires_grad=True)

    def fn(x_, v_, b_):
        return _ops.block_sparse_linear(x_, block_ptr, col_idx, v_, 40, b_).relu().sum()

    return fn, (x, v, b)


@pytest.mark.usefixtures("one_thread")
def test_compile_fullgraph_forward_matches_eager():
    fn, args = compile_args()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(*args), fn(*args))


@pytest.mark.usefixtures("one_thread")
def test_compile_fullgraph_backward_matches_eager():
    fn, args = compile_args()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager = torch.autograd.grad(fn(*args), args)
    traced = torch.autograd.grad(compiled(*args), args)
    for a, e in zip(traced, eager):
        assert torch.equal(a, e)
