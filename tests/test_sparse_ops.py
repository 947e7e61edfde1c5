"""sparse_linear / sparse_conv2d (csrc/cpu/sparse_*.cpp, spmm.cpp) vs F.linear / F.conv2d.

The reference runs the dense weight that pack_csr packed; the value gradient must equal the dense
weight gradient at the stored positions (and nothing is stored anywhere else).
"""

import random

import pytest
import torch
import torch.nn.functional as F

from torchprune import _ops

OPS = torch.ops.torchprune
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def sparse_weight(shape, sparsity, dtype, g, empty_rows=()):
    w = torch.randn(shape, generator=g, dtype=dtype)
    w[torch.rand(shape, generator=g) < sparsity] = 0
    for r in empty_rows:
        if r < shape[0]:
            w[r] = 0
    return w


def make_input(shape, dtype, g, contiguous):
    if contiguous:
        return torch.randn(shape, generator=g, dtype=dtype)
    base = torch.randn((*shape[:-1], 2 * shape[-1]), generator=g, dtype=dtype)
    return base[..., ::2]  # every other element: not contiguous


def check_against_dense(op, reference, x, w2d, bias, dtype, g):
    """Forward and every gradient of op(x, packed(w2d), bias) vs reference(x, w2d, bias)."""
    row_ptr, col_idx, values = _ops.pack_csr(w2d)
    stored = w2d != 0
    xs, vs = x.detach().clone().requires_grad_(), values.clone().requires_grad_()
    bs = None if bias is None else bias.clone().requires_grad_()
    y = op(xs, row_ptr, col_idx, vs, bs)
    xr, wr = x.detach().clone().requires_grad_(), w2d.clone().requires_grad_()
    br = None if bias is None else bias.clone().requires_grad_()
    y_ref = reference(xr, wr, br)
    assert y.shape == y_ref.shape and y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    grad = torch.randn(y.shape, generator=g, dtype=dtype)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(xs.grad, xr.grad, **TOL[dtype])
    torch.testing.assert_close(vs.grad, wr.grad[stored], **TOL[dtype])
    if bias is not None:
        torch.testing.assert_close(bs.grad, br.grad, **TOL[dtype])


def linear_cases(count=60):
    rng = random.Random(1)
    cases = [  # edge cases first
        ((1, 1), (1, 1), 0.0), ((3, 4), (5, 4), 1.0), ((0, 8), (6, 8), 0.5), ((4, 6), (0, 6), 0.5),
        ((3, 0), (5, 0), 0.0), ((2, 3, 7), (9, 7), 0.7), ((5, 1), (33, 1), 0.2), ((1, 65), (1, 65), 0.5),
    ]
    while len(cases) < count:
        m = rng.choice([1, 1, 2, 3, 8, 31, 32, 33, 64, 130])
        n, k = rng.randint(1, 150), rng.randint(1, 150)
        cases.append(((m, k), (n, k), rng.choice([0.0, 0.5, 0.9, 0.99, 1.0])))
    return cases


@pytest.mark.parametrize("case", linear_cases(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_linear_matches_dense(case, dtype):
    x_shape, w_shape, sparsity = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    w = sparse_weight(w_shape, sparsity, dtype, g, empty_rows=(0, 3))
    x = make_input(x_shape, dtype, g, contiguous=hash(case) % 3 != 0)
    bias = torch.randn(w_shape[0], generator=g, dtype=dtype) if hash(case) % 2 else None
    k = w_shape[1]
    check_against_dense(
        lambda x_, r, c, v, b: _ops.sparse_linear(x_, r, c, v, k, b), F.linear, x, w, bias, dtype, g
    )


def test_sparse_linear_wide_input_uses_int32_columns():
    g = torch.Generator().manual_seed(0)
    w = sparse_weight((3, 70000), 0.99, torch.float64, g)
    x = torch.randn(2, 70000, generator=g, dtype=torch.float64)
    check_against_dense(
        lambda x_, r, c, v, b: _ops.sparse_linear(x_, r, c, v, 70000, b), F.linear, x, w, None,
        torch.float64, g,
    )


@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_linear_is_the_same_on_any_thread_count(threads):
    g = torch.Generator().manual_seed(0)
    w = sparse_weight((512, 384), 0.8, torch.float32, g)
    x = torch.randn(70, 384, generator=g)
    packed = _ops.pack_csr(w)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y = _ops.sparse_linear(x, *packed, 384)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, F.linear(x, w), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(dtype):
    g = torch.Generator().manual_seed(0)
    w = sparse_weight((16, 24), 0.7, torch.float32, g).to(dtype)
    x = torch.randn(5, 24, generator=g).to(dtype)
    y = _ops.sparse_linear(x, *_ops.pack_csr(w), 24)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=1e-2)


def conv_cases():
    rng = random.Random(2)
    cases = [
        ((2, 3, 5, 5), 4, (3, 3), 1, 1, 1, 0.5), ((1, 8, 6, 7), 5, (1, 1), 1, 0, 1, 0.3),
        ((0, 3, 5, 5), 2, (3, 3), 1, 1, 1, 0.5), ((2, 4, 9, 9), 3, (3, 2), 2, 1, 2, 1.0),
        ((1, 2, 3, 3), 2, (3, 3), 1, 0, 1, 0.0), ((3, 5, 8, 8), 6, (1, 1), 2, 0, 1, 0.9),
        # output rows of 32 pixels or more take the per-row path, shorter ones the wrapped tiles
        ((1, 3, 4, 40), 5, (3, 3), 1, 1, 1, 0.5), ((2, 2, 5, 150), 3, (3, 5), 2, 2, 2, 0.7),
        ((1, 4, 6, 70), 4, (1, 1), 1, 1, 1, 0.6),
    ]
    while len(cases) < 23:
        kh, kw = rng.choice([(1, 1), (3, 3), (5, 5), (1, 3)])
        shape = (rng.randint(1, 3), rng.randint(1, 9), rng.randint(kh + 2, 12), rng.randint(kw + 2, 12))
        cases.append((shape, rng.randint(1, 12), (kh, kw), rng.choice([1, 2]), rng.choice([0, 1, 2]),
                      rng.choice([1, 2]), rng.choice([0.0, 0.6, 0.9, 1.0])))
    return cases


@pytest.mark.parametrize("case", conv_cases(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_conv2d_matches_dense(case, dtype):
    x_shape, out_channels, kernel, stride, padding, dilation, sparsity = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    w = sparse_weight((out_channels, x_shape[1], *kernel), sparsity, dtype, g)
    x = torch.randn(x_shape, generator=g, dtype=dtype)
    if hash(case) % 2:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(out_channels, generator=g, dtype=dtype) if hash(case) % 3 else None
    check_against_dense(
        lambda x_, r, c, v, b: _ops.sparse_conv2d(x_, r, c, v, kernel, b, stride, padding, dilation),
        lambda x_, w_, b: F.conv2d(x_, w_.view(w.shape), b, stride, padding, dilation),
        x, w.reshape(out_channels, -1), bias, dtype, g,
    )


def small_linear_args(bias=True):
    g = torch.Generator().manual_seed(0)
    w = sparse_weight((5, 4), 0.5, torch.float64, g, empty_rows=(2,))
    row_ptr, col_idx, values = _ops.pack_csr(w)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    return x, row_ptr, col_idx, values.requires_grad_(), b


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_sparse_linear(bias):
    x, r, c, v, b = small_linear_args(bias)
    fn = lambda x_, v_, *b_: _ops.sparse_linear(x_, r, c, v_, 4, *b_)  # noqa: E731
    inputs = (x, v, b) if bias else (x, v)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_sparse_conv2d(bias):
    g = torch.Generator().manual_seed(0)
    w = sparse_weight((3, 2, 3, 3), 0.5, torch.float64, g)
    r, c, v = _ops.pack_csr(w.reshape(3, -1))
    x = torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda x_, v_, *b_: _ops.sparse_conv2d(x_, r, c, v_, 3, *b_, stride=(2, 1), padding=1)  # noqa: E731
    inputs = (x, v.requires_grad_(), b) if bias else (x, v.requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_opcheck():
    x, r, c, v, b = small_linear_args()
    torch.library.opcheck(OPS.sparse_linear, (x, r, c, v, 4, b))
    torch.library.opcheck(OPS.sparse_linear, (x.detach(), r, c, v.detach(), 4, None))
    g = torch.Generator().manual_seed(0)
    w = sparse_weight((3, 2, 3, 3), 0.5, torch.float64, g)
    packed = _ops.pack_csr(w.reshape(3, -1))
    xc = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(OPS.sparse_conv2d, (xc, *packed, [3, 3], None, [1, 1], [1, 1], [1, 1]))
    torch.library.opcheck(OPS.unpack_csr, (*packed, 18))


def test_compile_fullgraph_matches_eager():
    x, r, c, v, b = small_linear_args()

    def fn(x_, v_, b_):
        return _ops.sparse_linear(x_, r, c, v_, 4, b_).relu().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager = torch.autograd.grad(fn(x, v, b), (x, v, b))
    traced = torch.autograd.grad(compiled(x, v, b), (x, v, b))
    for a, e in zip(traced, eager):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(x=torch.ones(2, 5)), "`x` must have in_features = 4"),
        (dict(x=torch.ones(2, 4, dtype=torch.int64)), "`x` must be a floating point"),
        (dict(values=None), "`values` must have the same dtype as `x`"),
        (dict(bias=torch.ones(3)), "`bias` must have shape \\[5\\]"),
        (dict(in_features=-1), "`in_features` must be >= 0"),
    ],
)
def test_sparse_linear_errors(args, message):
    w = torch.tensor([[1.0, 0, 0, 2], [0, 0, 0, 0], [0, 3, 0, 0], [0, 0, 4, 0], [5, 0, 0, 6]])
    r, c, v = _ops.pack_csr(w)
    call = dict(x=torch.ones(2, 4), values=v, bias=None, in_features=4)
    call.update(args)
    if call["values"] is None:
        call["values"] = v.double()
    with pytest.raises(RuntimeError, match="sparse_linear: " + message):
        _ops.sparse_linear(call["x"], r, c, call["values"], call["in_features"], call["bias"])


def test_sparse_conv2d_errors():
    r, c, v = _ops.pack_csr(torch.ones(2, 3 * 3 * 3))
    with pytest.raises(RuntimeError, match="sparse_conv2d: `x` must be 4-D"):
        _ops.sparse_conv2d(torch.ones(3, 5, 5), r, c, v, 3)
    with pytest.raises(RuntimeError, match="sparse_conv2d: `col_idx` must have dtype"):
        _ops.sparse_conv2d(torch.ones(1, 3, 5, 5), r, c.int(), v, 3)
    with pytest.raises(RuntimeError, match="at least as large as the dilated kernel"):
        _ops.sparse_conv2d(torch.ones(1, 3, 2, 2), r, c, v, 3)
    with pytest.raises(TypeError, match="sparse_conv2d: `stride` must be an int or a pair"):
        _ops.sparse_conv2d(torch.ones(1, 3, 5, 5), r, c, v, 3, stride=(1, 2, 3))


def test_portable_kernels_match_too():
    """The AVX-512 kernels are chosen at run time; TORCHPRUNE_NO_AVX512=1 forces the portable ones."""
    import os
    import subprocess
    import sys

    script = (
        "import torch, torch.nn.functional as F\n"
        "from torchprune import _ops\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for m, n, k in [(1, 37, 70), (5, 64, 33), (40, 9, 128), (70, 33, 20)]:\n"
        "    for dtype in (torch.float32, torch.float64):\n"
        "        w = torch.randn(n, k, generator=g, dtype=dtype)\n"
        "        w[torch.rand(n, k, generator=g) < 0.7] = 0\n"
        "        x = torch.randn(m, k, generator=g, dtype=dtype)\n"
        "        y = _ops.sparse_linear(x, *_ops.pack_csr(w), k)\n"
        "        torch.testing.assert_close(y, F.linear(x, w), rtol=1e-4, atol=1e-4)\n"
        "w = torch.randn(6, 3, 3, 3, generator=g)\n"
        "w[torch.rand(w.shape, generator=g) < 0.5] = 0\n"
        "x = torch.randn(2, 3, 9, 7, generator=g)\n"
        "y = _ops.sparse_conv2d(x, *_ops.pack_csr(w.reshape(6, -1)), 3, padding=1)\n"
        "torch.testing.assert_close(y, F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TORCHPRUNE_NO_AVX512="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
