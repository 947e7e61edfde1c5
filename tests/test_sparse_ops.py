"""sparse_linear / sparse_conv2d (csrc/cpu/sparse_*.cpp, spmm.cpp) vs F.linear / F.conv2d.

The reference runs the dense weight that pack_csr packed; the value gradient must equal the dense
weight gradient at the stored positions (and nothing is stored anywhere else). Tests that take a
`device` also run the CUDA kernels (csrc/cuda/spmm.cu, sparse_conv.cu) whenever torch sees a GPU,
always against the reference computed on the CPU (no TF32 there).
"""

import random

import pytest
import torch
import torch.nn.functional as F

from torchprune import ops as _ops

from error_bounds import assert_close, assert_op_close, bilinear_references

OPS = torch.ops.torchprune
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"))
DEVICES = ["cpu", CUDA]


def on(device, t):
    """A fresh leaf copy of t on `device` with t's strides (a sliced or channels_last input stays
    one; clone() would make a sliced one contiguous)."""
    if t is None:
        return None
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).copy_(t.detach())


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


def check_against_dense(op, reference, x, w2d, bias, dtype, g, device="cpu"):
    """Forward and every gradient of op(x, packed(w2d), bias) on `device` vs reference(x, w2d, bias)
    in float64 on the CPU: within TOL for float64, within the rounding bound of each reduction
    (tests/error_bounds.py) for float32. The weight is packed on `device` too."""
    row_ptr, col_idx, values = _ops.pack_csr(w2d.to(device))
    stored = w2d != 0
    xs, vs = on(device, x).requires_grad_(), values.clone().requires_grad_()
    bs = None if bias is None else on(device, bias).requires_grad_()
    y = op(xs, row_ptr, col_idx, vs, bs)
    assert y.dtype == dtype and y.device.type == device
    grad = torch.randn(y.shape, generator=g, dtype=dtype)
    y.backward(grad.to(device))
    (y_ref, grads), (y_mag, mags), (y_terms, terms) = bilinear_references(reference, (x, w2d, bias), grad)
    check = assert_close(dtype)
    check(y, y_ref, y_mag, y_terms, "output")
    check(xs.grad, grads[0], mags[0], terms[0], "grad_x")
    check(vs.grad, grads[1][stored], mags[1][stored], terms[1][stored], "grad_values")
    if bias is not None:
        check(bs.grad, grads[2], mags[2], terms[2], "grad_bias")


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", linear_cases(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_linear_matches_dense(case, dtype, device):
    x_shape, w_shape, sparsity = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    w = sparse_weight(w_shape, sparsity, dtype, g, empty_rows=(0, 3))
    x = make_input(x_shape, dtype, g, contiguous=hash(case) % 3 != 0)
    bias = torch.randn(w_shape[0], generator=g, dtype=dtype) if hash(case) % 2 else None
    k = w_shape[1]
    check_against_dense(
        lambda x_, r, c, v, b: _ops.sparse_linear(x_, r, c, v, k, b),
        F.linear, x, w, bias, dtype, g, device,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_linear_wide_input_uses_int32_columns(device):
    g = torch.Generator().manual_seed(0)
    w = sparse_weight((3, 70000), 0.99, torch.float64, g)
    x = torch.randn(2, 70000, generator=g, dtype=torch.float64)
    check_against_dense(
        lambda x_, r, c, v, b: _ops.sparse_linear(x_, r, c, v, 70000, b), F.linear, x, w, None,
        torch.float64, g, device,
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
    assert_op_close(y, F.linear, (x, w))


@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_linear_forwards_that_reuse_the_panel_buffer_stay_right(threads):
    # The fp32 forwards pack x into a buffer each thread keeps between calls (scratch_panels):
    # calls that need more, then less, then more of it, in a block-sparse forward too, and
    # calls from two Python threads at once, must each equal F.linear, and an output kept from
    # an earlier call must not change.
    import threading

    g = torch.Generator().manual_seed(0)
    cases = [((96, 384), 300), ((64, 1536), 1024), ((40, 72), 9), ((96, 384), 300), ((24, 200), 517)]
    weights = [sparse_weight(shape, 0.9, torch.float32, g) for shape, _ in cases]
    inputs = [torch.randn(m, shape[1], generator=g) for (shape, m) in cases]
    blocks = torch.rand(16, 1, 384, generator=g).gt(0.8).expand(16, 4, 384).reshape(64, 384)  # whole 4x1 blocks
    block = torch.randn(64, 384, generator=g) * blocks
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        kept = []
        for w, x in zip(weights, inputs):
            y = _ops.sparse_linear(x, *_ops.pack_csr(w), w.shape[1])
            assert_op_close(y, F.linear, (x, w))
            kept.append((y.clone(), y))
            y = _ops.block_sparse_linear(inputs[0], *_ops.pack_bsr(block, 4), 384)
            assert_op_close(y, F.linear, (inputs[0], block))
        assert all(torch.equal(copy, y) for copy, y in kept)

        failures = []

        def run(order):
            for i in order * 20:
                y = _ops.sparse_linear(inputs[i], *_ops.pack_csr(weights[i]), weights[i].shape[1])
                try:
                    assert_op_close(y, F.linear, (inputs[i], weights[i]))
                except AssertionError as error:
                    failures.append(error)

        workers = [threading.Thread(target=run, args=(order,)) for order in ([0, 1, 2], [1, 4, 3])]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert failures == []
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [5, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(dtype, batch, device):
    g = torch.Generator().manual_seed(0)
    w = sparse_weight((16, 24), 0.7, torch.float32, g).to(dtype)
    x = torch.randn(batch, 24, generator=g).to(dtype)
    y = _ops.sparse_linear(x.to(device), *_ops.pack_csr(w.to(device)), 24)
    assert y.dtype == dtype and y.device.type == device
    assert_op_close(y, F.linear, (x, w))  # accumulated in float32, rounded once


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", conv_cases(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_conv2d_matches_dense(case, dtype, device):
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
        x, w.reshape(out_channels, -1), bias, dtype, g, device,
    )


# Larger shapes, on the GPU only (the CPU runs the cases above): every CUDA code path (gather
# groups, int32 columns, several batch tiles, 1..4 pixels per lane, the 1x1 backward) in every
# dtype, against a float64 reference on the CPU, by relative error.
REL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def assert_rel_close(actual, expected, dtype, name):
    actual, expected = actual.detach().cpu().double(), expected.detach().double()
    assert actual.shape == expected.shape, name
    error = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
    assert error <= REL[dtype], f"{name}: relative error {error:.3g} > {REL[dtype]}"


def check_large(op, reference, x, w2d, bias, dtype, device, g):
    row_ptr, col_idx, values = _ops.pack_csr(w2d.to(dtype).to(device))
    xs = x.to(device=device, dtype=dtype, copy=True).requires_grad_()
    vs = values.clone().requires_grad_()
    bs = bias.to(device=device, dtype=dtype, copy=True).requires_grad_()
    y = op(xs, row_ptr, col_idx, vs, bs)
    assert y.dtype == dtype
    xr = x.to(dtype).double().requires_grad_()
    wr = w2d.to(dtype).double().requires_grad_()
    br = bias.to(dtype).double().requires_grad_()
    y_ref = reference(xr, wr, br)
    grad = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(grad.to(device))
    y_ref.backward(grad.double())
    assert_rel_close(y, y_ref, dtype, "output")
    assert_rel_close(xs.grad, xr.grad, dtype, "grad_x")
    assert_rel_close(vs.grad, wr.grad[w2d.to(dtype) != 0], dtype, "grad_values")
    assert_rel_close(bs.grad, br.grad, dtype, "grad_bias")


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("case", [(1, 64, 4096, 0.5), (3, 200, 3000, 0.9), (8, 33, 70000, 0.99),
                                  (13, 384, 1536, 0.9), (300, 1000, 2000, 0.9), (65, 128, 257, 0.0)],
                         ids=str)
def test_sparse_linear_large_shapes(case, dtype, device):
    m, n, k, sparsity = case
    g = torch.Generator().manual_seed(0)
    w = sparse_weight((n, k), sparsity, torch.float32, g, empty_rows=(1,))
    x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    check_large(lambda x_, r, c, v, b: _ops.sparse_linear(x_, r, c, v, k, b), F.linear, x, w, bias,
                dtype, device, g)


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("case", [((2, 4, 200, 200), 8, (3, 3), 1, 1, 1, 0.7),
                                  ((4, 16, 28, 28), 32, (3, 3), 2, 1, 1, 0.9),
                                  ((3, 64, 14, 14), 48, (1, 1), 1, 0, 1, 0.8),
                                  ((3, 8, 30, 31), 8, (5, 5), 1, 2, 2, 0.5)], ids=str)
def test_sparse_conv2d_large_shapes(case, dtype, device):
    x_shape, out_channels, kernel, stride, padding, dilation, sparsity = case
    g = torch.Generator().manual_seed(0)
    w = sparse_weight((out_channels, x_shape[1], *kernel), sparsity, torch.float32, g)
    x, bias = torch.randn(x_shape, generator=g), torch.randn(out_channels, generator=g)
    check_large(
        lambda x_, r, c, v, b: _ops.sparse_conv2d(x_, r, c, v, kernel, b, stride, padding, dilation),
        lambda x_, w_, b: F.conv2d(x_, w_.view(w.shape), b, stride, padding, dilation),
        x, w.reshape(out_channels, -1), bias, dtype, device, g,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_unaligned_packed_tensors_work(device):
    """Packed tensors that start at an odd offset of their storage (a slice of a larger buffer):
    the GPU kernels fall back from 16-byte vector loads to element loads."""
    g = torch.Generator().manual_seed(0)
    w = sparse_weight((7, 300), 0.5, torch.float32, g)
    row_ptr, col_idx, values = _ops.pack_csr(w.to(device))
    shifted = []
    for t in (col_idx, values):
        buffer = torch.zeros(t.numel() + 1, dtype=t.dtype, device=device)
        buffer[1:] = t
        shifted.append(buffer[1:])
    for m in (1, 3, 40):
        x = torch.randn(m, 300, generator=g)
        y = _ops.sparse_linear(x.to(device), row_ptr, *shifted, 300)
        assert_op_close(y, F.linear, (x, w))


def small_linear_args(bias=True, device="cpu"):
    g = torch.Generator().manual_seed(0)
    w = sparse_weight((5, 4), 0.5, torch.float64, g, empty_rows=(2,))
    row_ptr, col_idx, values = _ops.pack_csr(w.to(device))
    x = torch.randn(3, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = b if bias else None
    return x, row_ptr, col_idx, values.requires_grad_(), b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_sparse_linear(bias, device):
    x, r, c, v, b = small_linear_args(bias, device)
    fn = lambda x_, v_, *b_: _ops.sparse_linear(x_, r, c, v_, 4, *b_)  # noqa: E731
    inputs = (x, v, b) if bias else (x, v)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_sparse_conv2d(bias, device):
    g = torch.Generator().manual_seed(0)
    w = sparse_weight((3, 2, 3, 3), 0.5, torch.float64, g)
    r, c, v = _ops.pack_csr(w.reshape(3, -1).to(device))
    x = torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    fn = lambda x_, v_, *b_: _ops.sparse_conv2d(x_, r, c, v_, 3, *b_, stride=(2, 1), padding=1)  # noqa: E731
    inputs = (x, v.requires_grad_(), b) if bias else (x, v.requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, r, c, v, b = small_linear_args(device=device)
    torch.library.opcheck(OPS.sparse_linear, (x, r, c, v, 4, b))
    torch.library.opcheck(OPS.sparse_linear, (x.detach(), r, c, v.detach(), 4, None))
    g = torch.Generator().manual_seed(0)
    w = sparse_weight((3, 2, 3, 3), 0.5, torch.float64, g)
    packed = _ops.pack_csr(w.reshape(3, -1).to(device))
    xc = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    torch.library.opcheck(OPS.sparse_conv2d, (xc, *packed, [3, 3], None, [1, 1], [1, 1], [1, 1]))
    torch.library.opcheck(OPS.unpack_csr, (*packed, 18))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    x, r, c, v, b = small_linear_args(device=device)

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
@pytest.mark.parametrize("device", DEVICES)
def test_sparse_linear_errors(args, message, device):
    w = torch.tensor([[1.0, 0, 0, 2], [0, 0, 0, 0], [0, 3, 0, 0], [0, 0, 4, 0], [5, 0, 0, 6]])
    r, c, v = _ops.pack_csr(w.to(device))
    call = dict(x=torch.ones(2, 4), values=v, bias=None, in_features=4)
    call.update({k: on(device, t) if isinstance(t, torch.Tensor) else t for k, t in args.items()})
    call["x"] = on(device, call["x"])
    if call["values"] is None:
        call["values"] = v.double()
    with pytest.raises(RuntimeError, match="sparse_linear: " + message):
        _ops.sparse_linear(call["x"], r, c, call["values"], call["in_features"], call["bias"])


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_conv2d_errors(device):
    r, c, v = _ops.pack_csr(torch.ones(2, 3 * 3 * 3, device=device))
    ones = lambda *shape: torch.ones(*shape, device=device)  # noqa: E731
    with pytest.raises(RuntimeError, match="sparse_conv2d: `x` must be 4-D"):
        _ops.sparse_conv2d(ones(3, 5, 5), r, c, v, 3)
    with pytest.raises(RuntimeError, match="sparse_conv2d: `col_idx` must have dtype"):
        _ops.sparse_conv2d(ones(1, 3, 5, 5), r, c.int(), v, 3)
    with pytest.raises(RuntimeError, match="at least as large as the dilated kernel"):
        _ops.sparse_conv2d(ones(1, 3, 2, 2), r, c, v, 3)
    with pytest.raises(TypeError, match="sparse_conv2d: `stride` must be an int or a pair"):
        _ops.sparse_conv2d(ones(1, 3, 5, 5), r, c, v, 3, stride=(1, 2, 3))


@pytest.mark.parametrize("switch", ["TORCHPRUNE_NO_AVX512", "TORCHPRUNE_NO_AVX2", "TORCHPRUNE_PORTABLE"])
def test_portable_kernels_match_too(switch):
    """The AVX-512 and AVX2 kernels are chosen at run time; TORCHPRUNE_NO_AVX512=1 turns off the
    AVX-512 ones, TORCHPRUNE_NO_AVX2=1 the AVX2 one, TORCHPRUNE_PORTABLE=1 every one."""
    import os
    import subprocess
    import sys

    script = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import torch, torch.nn.functional as F\n"
        "from torchprune import ops as _ops\n"
        "from error_bounds import assert_op_close\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for m, n, k in [(1, 37, 70), (5, 64, 33), (40, 9, 128), (70, 33, 20), (20, 17, 600)]:\n"
        "    for dtype in (torch.float32, torch.float64):\n"
        "        w = torch.randn(n, k, generator=g, dtype=dtype)\n"
        "        w[torch.rand(n, k, generator=g) < 0.7] = 0\n"
        "        x = torch.randn(m, k, generator=g, dtype=dtype)\n"
        "        y = _ops.sparse_linear(x, *_ops.pack_csr(w), k)\n"
        "        if dtype == torch.float64:\n"
        "            torch.testing.assert_close(y, F.linear(x, w), rtol=1e-10, atol=1e-10)\n"
        "        else:\n"
        "            assert_op_close(y, F.linear, (x, w))\n"
        "w = torch.randn(6, 3, 3, 3, generator=g)\n"
        "w[torch.rand(w.shape, generator=g) < 0.5] = 0\n"
        "x = torch.randn(2, 3, 9, 7, generator=g)\n"
        "y = _ops.sparse_conv2d(x, *_ops.pack_csr(w.reshape(6, -1)), 3, padding=1)\n"
        "assert_op_close(y, lambda x_, w_: F.conv2d(x_, w_, padding=1), (x, w))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, **{switch: "1"})
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
