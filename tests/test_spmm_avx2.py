"""The fp32 sparse_linear kernels for more than one row of x (csrc/cpu/spmm_avx2.cpp) on the shapes
that pick their code paths. Forward: the 16- and 32-wide panels and their ragged last tile, groups
of 8 output features and a ragged last group, row panels or whole batch panels split over threads, K cut into 384-column
blocks once K > 512 (partial sums carried between blocks, rows taken 512 at a time), 16- and 32-bit
column indices, bias. Backward: the input gradient runs the forward kernel on Wᵀ (so N > 512 cuts
its K-blocks), the value gradient the SDDMM with 8 entries reduced at once and a ragged remainder
per row, accumulated over batch tiles. On a CPU with AVX-512 the 32-wide panels run the AVX-512
kernel (csrc/cpu/spmm_avx512.cpp); the same cases then run again with TORCHPRUNE_NO_AVX512=1, so
the AVX2 kernel's 32-wide path is covered there too. On a CPU without AVX2 (or with TORCHPRUNE_PORTABLE=1) the
same cases run the portable loops, which must agree too. Tolerances come from the rounding bound
of each dot product (tests/error_bounds.py), against float64 references.
"""
import pytest
import torch
import torch.nn.functional as F

from torchprune import ops as _ops

from conftest import run_op_switched
from error_bounds import assert_close, assert_op_close, bilinear_references

CASES = [  # (m, n, k, sparsity)
    (2, 9, 33, 0.5), (15, 8, 300, 0.9), (16, 17, 64, 0.0), (17, 7, 513, 0.7), (31, 40, 700, 0.9),
    (32, 64, 1100, 0.95), (33, 1, 257, 0.5), (100, 70, 520, 0.8), (65, 24, 2048, 0.99),
    (48, 16, 900, 1.0), (3, 130, 1500, 0.6), (40, 1100, 1100, 0.8),
]


def sparse(n, k, sparsity, g, empty_rows=(0, 5)):
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    for r in empty_rows:
        if r < n:
            w[r] = 0
    return w


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_dense(case, bias):
    m, n, k, sparsity = case
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w, x = sparse(n, k, sparsity, g), torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    y = _ops.sparse_linear(x, *_ops.pack_csr(w), k, b)
    assert_op_close(y, F.linear, (x, w, b) if bias else (x, w))


def test_the_avx2_kernel_matches_where_avx512_would_run(tmp_path):
    """The forward CASES and the input gradients of BACKWARD_CASES (the forward kernel on Wᵀ) in a
    process with the AVX-512 kernels switched off: on an AVX-512 CPU this is the only run of the
    AVX2 32-wide kernel; elsewhere it repeats the default run."""
    forward, reference = [], []
    for m, n, k, sparsity in CASES + BACKWARD_CASES:
        g = torch.Generator().manual_seed(m * 1000 + n + k + 1)
        w, x = sparse(n, k, sparsity, g), torch.randn(m, k, generator=g)
        b = torch.randn(n, generator=g)
        forward.append((x, *_ops.pack_csr(w), k, b))
        reference.append((x, w, b))
    outputs = run_op_switched("sparse_linear", forward, "TORCHPRUNE_NO_AVX512", tmp_path)
    for y, args in zip(outputs, reference):
        assert_op_close(y, F.linear, args)
    backward, backward_reference = [], []
    for m, n, k, sparsity in BACKWARD_CASES:
        g = torch.Generator().manual_seed(m + 7 * n + k + 1)
        w = sparse(n, k, sparsity, g)
        row_ptr, col_idx, values = _ops.pack_csr(w)
        x, grad = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
        backward.append((grad, x, row_ptr, col_idx, values, k, [True, False, False]))
        backward_reference.append((x, w, grad))
    grads = run_op_switched("sparse_linear_backward", backward, "TORCHPRUNE_NO_AVX512", tmp_path)
    for (grad_x, _, _), (x, w, grad) in zip(grads, backward_reference):
        (_, expected), (_, mags), (_, terms) = bilinear_references(F.linear, (x, w), grad)
        assert_close(torch.float32)(grad_x, expected[0], mags[0], terms[0], "grad_x")


@pytest.mark.parametrize("m", [70, 128])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_thread_count_gives_the_same_bits(threads, m):
    """Threads split output features (70 rows: 3 panels of 32, which 2 threads cannot share
    evenly) or whole panels (128 rows: 4 panels, and 70 rows on 3 threads), never a dot product:
    the result cannot depend on them."""
    g = torch.Generator().manual_seed(3)
    w, x = sparse(203, 777, 0.8, g), torch.randn(m, 777, generator=g)
    packed = _ops.pack_csr(w)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ops.sparse_linear(x, *packed, 777)
        assert_op_close(one, F.linear, (x, w))
        torch.set_num_threads(threads)
        assert torch.equal(_ops.sparse_linear(x, *packed, 777), one)
    finally:
        torch.set_num_threads(before)


def test_wide_layer_with_32_bit_columns():
    g = torch.Generator().manual_seed(4)
    k = 70000
    w = torch.zeros(19, k)
    cols = torch.randint(0, k, (19, 40), generator=g)
    w.scatter_(1, cols, torch.randn(19, 40, generator=g))
    w[:, k - 1] = 1.5  # the last column, past every block boundary
    x = torch.randn(20, k, generator=g)
    packed = _ops.pack_csr(w)
    assert packed[1].dtype == torch.int32
    assert_op_close(_ops.sparse_linear(x, *packed, k), F.linear, (x, w))


def test_leading_dims_and_non_contiguous_input():
    g = torch.Generator().manual_seed(5)
    w = sparse(40, 600, 0.9, g)
    x = torch.randn(3, 11, 1200, generator=g)[..., ::2]
    y = _ops.sparse_linear(x, *_ops.pack_csr(w), 600)
    assert y.shape == (3, 11, 40)
    assert_op_close(y, F.linear, (x, w))


BACKWARD_CASES = [  # (m, n, k, sparsity)
    (2, 9, 33, 0.5), (17, 600, 70, 0.8), (40, 1100, 300, 0.9), (33, 13, 40, 0.0), (70, 25, 9, 1.0),
    (100, 530, 530, 0.95),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=str)
def test_gradients_match_dense(case):
    m, n, k, sparsity = case
    g = torch.Generator().manual_seed(m + 7 * n + k)
    w, x = sparse(n, k, sparsity, g), torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g)
    row_ptr, col_idx, values = _ops.pack_csr(w)
    xs, vs, bs = x.clone().requires_grad_(), values.clone().requires_grad_(), b.clone().requires_grad_()
    y = _ops.sparse_linear(xs, row_ptr, col_idx, vs, k, bs)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    (_, grads), (_, mags), (_, terms) = bilinear_references(F.linear, (x, w, b), grad)
    check, stored = assert_close(torch.float32), w != 0
    check(xs.grad, grads[0], mags[0], terms[0], "grad_x")
    check(vs.grad, grads[1][stored], mags[1][stored], terms[1][stored], "grad_values")
    check(bs.grad, grads[2], mags[2], terms[2], "grad_bias")
