"""masked_linear / masked_conv2d (csrc/cpu/masked_ops.cpp, torchprune/ops/masked.py) vs plain PyTorch.

The reference is F.linear / F.conv2d with ``weight * mask``: the same function, same gradients for
x and bias, and a weight gradient that is exactly zero wherever the mask is false. The CUDA kernels
(csrc/cuda/masked.cu, register_masked.cpp) are checked against the CPU ones on the same cases, at
the end of this file, whenever a GPU is there.
"""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchprune import ops as _ops

from error_bounds import assert_close_bounded, assert_op_close, bilinear_references

OPS = torch.ops.torchprune
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12)}  # float32: the rounding bound of error_bounds.py


def make_mask(shape, density, generator):
    """A bool mask with about `density` of its entries true (exactly none for 0, all for 1)."""
    return torch.rand(shape, generator=generator) < density


def make_x(shape, layout, dtype, generator):
    """A random input of `shape`: contiguous, or a non-contiguous view with the same values."""
    if layout == "contiguous":
        return torch.randn(shape, generator=generator, dtype=dtype)
    if layout == "transposed":  # last dim not unit stride
        base = torch.randn((shape[-1], *shape[:-1]), generator=generator, dtype=dtype)
        return base.movedim(0, -1)
    if layout == "strided":  # every other element of the last dim
        base = torch.randn((*shape[:-1], 2 * shape[-1]), generator=generator, dtype=dtype)
        return base[..., ::2]
    if layout == "channels_last":
        x = torch.randn(shape, generator=generator, dtype=dtype)
        return x.contiguous(memory_format=torch.channels_last)
    raise ValueError(layout)


def upstream_gradient(y, seed):
    """The fixed random upstream gradient for an output like ``y``."""
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype).to(y.device)


def run_with_grads(fn, x, weight, bias, grad_out_seed):
    """fn(x, weight, bias) forward plus backward with a fixed random upstream gradient."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    y = fn(x, weight, bias)
    y.backward(upstream_gradient(y, grad_out_seed))
    return y, x.grad, weight.grad, None if bias is None else bias.grad


def assert_matches_reference(op, reference, x, weight, mask, bias, dtype):
    """op's output and gradients vs autograd through reference(x, weight * mask, bias) in float64
    on the same inputs and upstream gradient: within TOL for float64, within the rounding bound of
    each reduction (tests/error_bounds.py) for float32, whose kernels sum in another order."""
    ours = run_with_grads(lambda x_, w_, b_: op(x_, w_, mask, b_), x, weight, bias, 0)
    grad_out = upstream_gradient(ours[0], 0)
    (y, grads), (y_mag, grads_mag), (y_terms, grads_terms) = bilinear_references(
        lambda x_, w_, b_: reference(x_, torch.where(mask, w_, 0), b_), (x, weight, bias), grad_out)
    names = ("output", "grad_x", "grad_weight", "grad_bias")
    for name, a, b, mag, terms in zip(names, ours, (y, *grads), (y_mag, *grads_mag), (y_terms, *grads_terms)):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == dtype and a.shape == b.shape, name
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, **TOL[dtype], msg=name)
        else:
            assert_close_bounded(a, b, mag, terms, dtype, msg=name)
    grad_weight = ours[2]
    assert (grad_weight[~mask] == 0).all(), "grad_weight must be exactly 0 where mask is false"


# ---------------------------------------------------------------------------------------------
# masked_linear vs F.linear

def linear_cases():
    fixed = [
        # leading dims, in, out, density, dtype, bias, layout
        ((0,), 5, 3, 0.5, torch.float32, True, "contiguous"),  # batch 0
        ((0, 4), 6, 2, 0.5, torch.float64, False, "contiguous"),
        ((), 7, 4, 0.5, torch.float32, True, "contiguous"),  # x is 1-D
        ((5,), 6, 3, 0.0, torch.float32, True, "contiguous"),  # all pruned
        ((5,), 6, 3, 1.0, torch.float64, True, "contiguous"),  # nothing pruned
        ((2, 3), 6, 5, 0.3, torch.float32, False, "transposed"),  # 3-D x, non-contiguous
        ((4,), 9, 7, 0.7, torch.float64, True, "strided"),
        ((2, 3, 2), 4, 6, 0.5, torch.float32, True, "strided"),  # 4-D x
        ((4,), 6, 0, 0.5, torch.float32, True, "contiguous"),  # no outputs
        ((4,), 0, 3, 0.5, torch.float64, True, "contiguous"),  # no inputs
        # large enough for the kernels to cut the weight into several cache-sized tiles
        ((1,), 2048, 300, 0.3, torch.float32, True, "contiguous"),
        ((3,), 1030, 517, 0.5, torch.float64, False, "transposed"),
        ((70,), 1100, 130, 0.9, torch.float32, True, "contiguous"),  # tiles as wide as the batch
        ((2, 150), 600, 40, 0.5, torch.float32, True, "strided"),  # one tile, batch > outputs
        ((1100,), 2048, 64, 0.5, torch.float32, False, "contiguous"),  # grad_x by weight columns
    ]
    rng = random.Random(0)
    random_cases = []
    for _ in range(22):
        leading = tuple(rng.randint(1, 5) for _ in range(rng.randint(0, 3)))
        random_cases.append((
            leading, rng.randint(1, 33), rng.randint(1, 33), rng.choice([0.0, 0.1, 0.5, 0.9, 1.0]),
            rng.choice([torch.float32, torch.float64]), rng.random() < 0.5,
            rng.choice(["contiguous", "transposed", "strided"]),
        ))
    return fixed + random_cases


def linear_inputs(case_id, case):
    """x, weight, mask, bias and dtype of one of linear_cases(), drawn from the case's own seed."""
    leading, in_features, out_features, density, dtype, has_bias, layout = case
    generator = torch.Generator().manual_seed(case_id)
    x = make_x((*leading, in_features), layout, dtype, generator)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=dtype)
    mask = make_mask(weight.shape, density, generator)
    bias = torch.randn(out_features, generator=generator, dtype=dtype) if has_bias else None
    return x, weight, mask, bias, dtype


@pytest.mark.parametrize("case_id,case", list(enumerate(linear_cases())))
def test_masked_linear_matches_reference(case_id, case):
    x, weight, mask, bias, dtype = linear_inputs(case_id, case)
    assert_matches_reference(_ops.masked_linear, F.linear, x, weight, mask, bias, dtype)


# ---------------------------------------------------------------------------------------------
# masked_conv2d vs F.conv2d

def conv_cases():
    fixed = [
        # N, C_in, C_out, (H, W), (kH, kW), stride, padding, dilation, groups, density, dtype, bias,
        # layout
        (0, 3, 4, (8, 8), (3, 3), 1, 1, 1, 1, 0.5, torch.float32, True, "contiguous"),  # batch 0
        (2, 3, 4, (8, 8), (3, 3), 1, 0, 1, 1, 0.0, torch.float32, True, "contiguous"),
        (2, 3, 4, (8, 8), (3, 3), 1, 0, 1, 1, 1.0, torch.float64, False, "contiguous"),
        (2, 6, 6, (9, 7), (3, 3), 1, 1, 1, 6, 0.5, torch.float32, True, "contiguous"),  # depthwise
        # depthwise with a channel multiplier of 2
        (1, 4, 8, (9, 9), (3, 3), 2, 1, 1, 4, 0.5, torch.float64, True, "contiguous"),
        (2, 4, 6, (10, 12), (3, 1), (2, 1), (1, 0), (2, 1), 2, 0.4, torch.float32, False,
         "contiguous"),
        (2, 4, 4, (8, 8), (3, 3), 1, 1, 1, 1, 0.5, torch.float32, True, "channels_last"),
        (2, 4, 4, (8, 8), (3, 3), 1, 1, 1, 2, 0.5, torch.float64, True, "strided"),
        (3, 2, 5, (5, 5), (5, 5), 1, 0, 1, 1, 0.5, torch.float32, True, "contiguous"),  # 1x1 out
        (2, 8, 4, (6, 6), (1, 1), 1, 0, 1, 4, 0.5, torch.float32, False, "contiguous"),  # 1x1 conv
    ]
    rng = random.Random(1)
    random_cases = []
    for _ in range(20):
        groups = rng.choice([1, 1, 2, 3])
        c_in, c_out = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
        kernel = (rng.randint(1, 3), rng.randint(1, 3))
        dilation = (rng.randint(1, 2), rng.randint(1, 2))
        padding = (rng.randint(0, 2), rng.randint(0, 2))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        size = tuple(dilation[d] * (kernel[d] - 1) + 1 + rng.randint(0, 6) for d in range(2))
        random_cases.append((
            rng.randint(0, 3), c_in, c_out, size, kernel, stride, padding, dilation, groups,
            rng.choice([0.0, 0.3, 0.7, 1.0]), rng.choice([torch.float32, torch.float64]),
            rng.random() < 0.5, rng.choice(["contiguous", "strided", "channels_last"]),
        ))
    return fixed + random_cases


def conv_inputs(case_id, case):
    """x, weight, mask, bias, dtype and the conv arguments of one of conv_cases(), drawn from the
    case's own seed."""
    (n, c_in, c_out, size, kernel, stride, padding, dilation, groups, density, dtype, has_bias,
     layout) = case
    generator = torch.Generator().manual_seed(100 + case_id)
    x = make_x((n, c_in, *size), layout, dtype, generator)
    weight = torch.randn(c_out, c_in // groups, *kernel, generator=generator, dtype=dtype)
    mask = make_mask(weight.shape, density, generator)
    bias = torch.randn(c_out, generator=generator, dtype=dtype) if has_bias else None
    conv_args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, weight, mask, bias, dtype, conv_args


@pytest.mark.parametrize("case_id,case", list(enumerate(conv_cases())))
def test_masked_conv2d_matches_reference(case_id, case):
    x, weight, mask, bias, dtype, conv_args = conv_inputs(case_id, case)
    assert_matches_reference(
        lambda x_, w_, m_, b_: _ops.masked_conv2d(x_, w_, m_, b_, **conv_args),
        lambda x_, w_, b_: F.conv2d(x_, w_, b_, **conv_args),
        x, weight, mask, bias, dtype,
    )


# ---------------------------------------------------------------------------------------------
# Semantics beyond the reference


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_pruned_inf_and_nan_weights_count_as_zero(bad):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=generator)
    mask = make_mask(weight.shape, 0.5, generator)
    stored = weight.masked_fill(~mask, bad).requires_grad_()
    x = torch.randn(3, 4, generator=generator)
    y = _ops.masked_linear(x, stored, mask)
    assert_op_close(y, F.linear, (x, weight * mask))
    y.sum().backward()
    assert (stored.grad[~mask] == 0).all()

    conv_weight = torch.randn(4, 2, 3, 3, generator=generator)
    conv_mask = make_mask(conv_weight.shape, 0.5, generator)
    image = torch.randn(2, 2, 6, 6, generator=generator)
    y = _ops.masked_conv2d(image, conv_weight.masked_fill(~conv_mask, bad), conv_mask, padding=1)
    assert_op_close(y, lambda x_, w_: F.conv2d(x_, w_, padding=1), (image, conv_weight * conv_mask))


def test_only_the_needed_gradients_are_computed():
    x, weight = torch.randn(3, 4), torch.randn(5, 4, requires_grad=True)
    mask = torch.rand(5, 4) < 0.5
    _ops.masked_linear(x, weight, mask).sum().backward()
    assert x.grad is None and weight.grad is not None

    grad_x, grad_weight, grad_bias = OPS.masked_linear_backward(
        torch.randn(3, 5), x, weight.detach(), mask, [True, False, False]
    )
    assert grad_x.shape == x.shape
    assert grad_weight.shape == (0,) and grad_bias.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(dtype):
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 8, generator=generator), torch.randn(4, 8, generator=generator)
    mask = make_mask(weight.shape, 0.5, generator)
    y = _ops.masked_linear(x.to(dtype), weight.to(dtype), mask)
    assert y.dtype == dtype
    assert_op_close(y, F.linear, (x.to(dtype), (weight * mask).to(dtype)))  # accumulated in float32


@pytest.mark.parametrize("has_bias", [False, True])
def test_gradcheck_masked_linear(has_bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = make_mask(weight.shape, 0.5, generator)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True) if has_bias else None
    assert torch.autograd.gradcheck(lambda *a: _ops.masked_linear(*a), (x, weight, mask, bias))
    assert torch.autograd.gradgradcheck(lambda *a: _ops.masked_linear(*a), (x, weight, mask, bias))


@pytest.mark.parametrize("has_bias", [False, True])
def test_gradcheck_masked_conv2d(has_bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 2, 3, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = make_mask(weight.shape, 0.5, generator)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True) if has_bias else None
    conv = lambda x_, w_, b_: _ops.masked_conv2d(x_, w_, mask, b_, (2, 1), 1, (1, 2), 2)  # noqa: E731
    assert torch.autograd.gradcheck(conv, (x, weight, bias))
    assert torch.autograd.gradgradcheck(conv, (x, weight, bias))


@pytest.mark.parametrize("op,reference,shape_x,shape_w", [
    (_ops.masked_linear, F.linear, (4, 6), (5, 6)),
    (lambda x, w, m, b: _ops.masked_conv2d(x, w, m, b, padding=1), lambda x, w, b: F.conv2d(x, w, b, padding=1),
     (2, 2, 5, 5), (3, 2, 3, 3)),
])
def test_gradient_penalty_matches_reference(op, reference, shape_x, shape_w):
    """create_graph=True (WGAN-GP style): the second-order gradients equal plain PyTorch's, and
    the weight's second-order gradient is exactly zero where the mask is false."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape_x, generator=generator, dtype=torch.float64)
    w0 = torch.randn(shape_w, generator=generator, dtype=torch.float64)
    b0 = torch.randn(shape_w[0], generator=generator, dtype=torch.float64)
    mask = make_mask(shape_w, 0.5, generator)

    def penalty_grads(fn):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        (grad_x,) = torch.autograd.grad(torch.tanh(fn(x, w, b)).pow(2).sum(), x, create_graph=True)
        grad_x.pow(2).sum().backward()
        return w.grad, b.grad

    ours = penalty_grads(lambda x, w, b: op(x, w, mask, b))
    ref = penalty_grads(lambda x, w, b: reference(x, w * mask, b))
    torch.testing.assert_close(ours, ref)
    assert (ours[0][~mask] == 0).all()


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck on every op, and torch.compile / torch.export


def opcheck_samples():
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(shape, generator=generator).requires_grad_(grad)

    mask_l = make_mask((5, 4), 0.5, generator)
    mask_c = make_mask((6, 2, 3, 3), 0.5, generator)
    conv = ([2, 1], [1, 1], [1, 1], 2)
    image_cl = rand(2, 4, 7, 7).contiguous(memory_format=torch.channels_last)
    return [
        (OPS.masked_linear.default, (rand(2, 3, 4, grad=True), rand(5, 4, grad=True), mask_l,
                                     rand(5, grad=True))),
        (OPS.masked_linear.default, (rand(3, 4), rand(5, 4, grad=True), mask_l, None)),
        (OPS.masked_linear.default, (rand(0, 4), rand(5, 4), mask_l, rand(5))),
        (OPS.masked_linear_backward.default, (rand(2, 3, 5), rand(2, 3, 4), rand(5, 4), mask_l,
                                              [True, True, True])),
        (OPS.masked_linear_backward.default, (rand(3, 5), rand(3, 4), rand(5, 4), mask_l,
                                              [False, True, False])),
        (OPS.masked_conv2d.default, (rand(2, 4, 7, 7, grad=True), rand(6, 2, 3, 3, grad=True),
                                     mask_c, rand(6, grad=True), *conv)),
        (OPS.masked_conv2d.default, (image_cl, rand(6, 2, 3, 3, grad=True), mask_c, None, *conv)),
        (OPS.masked_conv2d_backward.default, (rand(2, 6, 4, 7), rand(2, 4, 7, 7), rand(6, 2, 3, 3),
                                              mask_c, *conv, [True, True, True])),
        (OPS.masked_conv2d_backward.default, (rand(2, 6, 4, 7), image_cl, rand(6, 2, 3, 3),
                                              mask_c, *conv, [True, True, False])),
    ]


@pytest.mark.parametrize("op,args", opcheck_samples(),
                         ids=lambda v: str(v).split(".")[-2] if hasattr(v, "_schema") else "")
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def linear_fn(x, weight, mask, bias):
    return _ops.masked_linear(x, weight, mask, bias).tanh().sum()


def conv_fn(x, weight, mask, bias):
    return _ops.masked_conv2d(x, weight, mask, bias, stride=2, padding=1, groups=2).tanh().sum()


# aot_eager checks what our ops are responsible for (fake kernels, autograd, tracing);
# inductor (the default backend) additionally compiles the surrounding graph to C++.
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("fn,shapes", [
    (linear_fn, [(2, 3, 4), (5, 4), (5,)]),
    (conv_fn, [(2, 4, 7, 7), (6, 2, 3, 3), (6,)]),
], ids=["linear", "conv2d"])
def test_compile_fullgraph_matches_eager(fn, shapes, backend):
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(s, generator=generator) for s in shapes)
    mask = make_mask(weight.shape, 0.5, generator)
    results = []
    for run in (fn, torch.compile(fn, fullgraph=True, backend=backend)):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = run(leaves[0], leaves[1], mask, leaves[2])
        out.backward()
        results.append([out] + [t.grad for t in leaves])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)
    assert (results[1][2][~mask] == 0).all()


class TinyMaskedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4))
        self.bias = nn.Parameter(torch.randn(5))
        self.register_buffer("mask", torch.rand(5, 4) < 0.5)

    def forward(self, x):
        return _ops.masked_linear(x, self.weight, self.mask, self.bias)


def test_export_traces_masked_linear():
    module = TinyMaskedLinear()
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (torch.randn(3, 4),), dynamic_shapes={"x": {0: batch}})
    targets = [node.target for node in program.graph.nodes]
    assert OPS.masked_linear.default in targets
    x = torch.randn(7, 4)
    torch.testing.assert_close(program.module()(x), module(x))


# ---------------------------------------------------------------------------------------------
# Errors name the argument and what is allowed


def linear_args(**overrides):
    args = dict(x=torch.randn(3, 4), weight=torch.randn(8, 4),
                mask=torch.ones(8, 4, dtype=torch.bool), bias=None)
    args.update(overrides)
    return args


def conv_args(**overrides):
    args = dict(x=torch.randn(2, 4, 6, 6), weight=torch.randn(6, 2, 3, 3),
                mask=torch.ones(6, 2, 3, 3, dtype=torch.bool), bias=None, groups=2)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides,message", [
    (dict(mask=torch.ones(8, 4)),
     r"masked_linear: `mask` must be a bool tensor .*got torch.float32"),
    (dict(mask=torch.ones(4, 8, dtype=torch.bool)),
     r"masked_linear: `mask` must have the same shape as `weight` \[8, 4\], got \[4, 8\]"),
    (dict(x=torch.tensor(1.0)), r"masked_linear: `x` must have at least 1 dimension"),
    (dict(x=torch.randn(3, 5)),
     r"masked_linear: `x` must have last dimension .* = 4, got shape \[3, 5\]"),
    (dict(x=torch.randn(3, 4, dtype=torch.float64)),
     r"masked_linear: `x` must have the same dtype as `weight` \(torch.float32\), "
     r"got torch.float64"),
    (dict(weight=torch.randn(8, 4, 1), mask=torch.ones(8, 4, 1, dtype=torch.bool)),
     r"masked_linear: `weight` must be 2-D"),
    (dict(bias=torch.randn(4)), r"masked_linear: `bias` must have shape \[8\]"),
    (dict(x=torch.ones(3, 4, dtype=torch.long), weight=torch.ones(8, 4, dtype=torch.long)),
     r"masked_linear: `weight` must be a floating point tensor"),
])
def test_masked_linear_errors(overrides, message):
    with pytest.raises(RuntimeError, match=message):
        _ops.masked_linear(**linear_args(**overrides))


@pytest.mark.parametrize("overrides,message", [
    (dict(mask=torch.ones(6, 2, 3, 3, dtype=torch.uint8)), r"masked_conv2d: `mask` must be a bool"),
    (dict(mask=torch.ones(6, 2, 3, dtype=torch.bool)),
     r"masked_conv2d: `mask` must have the same shape as `weight` \[6, 2, 3, 3\], got \[6, 2, 3\]"),
    (dict(x=torch.randn(4, 6, 6)), r"masked_conv2d: `x` must be 4-D \(N, C, H, W\)"),
    (dict(groups=3), r"masked_conv2d: `groups` must divide the input channels x.size\(1\) = 4"),
    (dict(groups=4), r"masked_conv2d: `groups` must divide the output channels"),
    (dict(groups=0), r"masked_conv2d: `groups` must be >= 1, got 0"),
    (dict(groups=1), r"masked_conv2d: `weight` must have x.size\(1\) / groups = 4 input channels"),
    (dict(stride=0), r"masked_conv2d: `stride` must be 2 integers >= 1, got \[0, 0\]"),
    (dict(padding=(1, -1)), r"masked_conv2d: `padding` must be 2 integers >= 0"),
    (dict(x=torch.randn(2, 4, 2, 6)), r"masked_conv2d: `x` must have height \+ 2 \* padding"),
])
def test_masked_conv2d_errors(overrides, message):
    with pytest.raises(RuntimeError, match=message):
        _ops.masked_conv2d(**conv_args(**overrides))


@pytest.mark.parametrize("kwargs,message", [
    (dict(padding="same"), r"`padding` must be an int or a pair of ints, got 'same'"),
    (dict(stride=1.5), r"`stride` must be an int or a pair of ints, got 1.5"),
    (dict(dilation=(1, 1, 1)), r"`dilation` must be an int or a pair of ints"),
])
def test_masked_conv2d_wrapper_argument_errors(kwargs, message):
    weight = torch.randn(2, 3, 3, 3)
    with pytest.raises(TypeError, match=message):
        _ops.masked_conv2d(torch.randn(1, 3, 5, 5), weight, torch.ones_like(weight, dtype=torch.bool), **kwargs)


def test_backward_op_errors():
    with pytest.raises(RuntimeError, match=r"masked_linear_backward: `grad_out` must have"):
        OPS.masked_linear_backward(torch.randn(3, 7), torch.randn(3, 4), torch.randn(8, 4),
                                   torch.ones(8, 4, dtype=torch.bool), [True, True, True])
    with pytest.raises(RuntimeError, match=r"masked_conv2d_backward: `mask` must be a bool"):
        OPS.masked_conv2d_backward(torch.randn(2, 6, 4, 4), torch.randn(2, 4, 6, 6),
                                   torch.randn(6, 2, 3, 3), torch.ones(6, 2, 3, 3), [1, 1], [0, 0],
                                   [1, 1], 2, [True, True, True])


def test_fake_kernels_check_like_the_real_ones():
    """Under fake tensors (what torch.compile traces with) a bad mask fails the same way."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = linear_args(mask=torch.ones(4, 8, dtype=torch.bool))
        message = r"masked_linear: `mask` must have the same shape as `weight` \[8, 4\]"
        with pytest.raises(RuntimeError, match=message):
            OPS.masked_linear(**args)
        args = conv_args(mask=torch.ones(6, 2, 3, 3))
        with pytest.raises(RuntimeError, match=r"masked_conv2d: `mask` must be a bool"):
            _ops.masked_conv2d(**args)


# ---------------------------------------------------------------------------------------------
# CUDA (csrc/cuda/masked.cu + register_masked.cpp) against the CPU kernels, on the same cases.
# The "cuda" parameter is skipped, with the reason, where torch sees no GPU; the CPU runs above
# are unchanged.

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"))


@pytest.fixture
def exact_fp32_on_gpu():
    """TF32 off (cuDNN uses it for fp32 convolutions by default), so fp32 GPU results match the
    CPU's to fp32 tolerance."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# cuBLAS / cuDNN sum in another order than MKL / oneDNN. float64 results are compared with the
# CPU's within DEVICE_TOL; float32 and half ones with the float64 reference on the CPU (the op
# itself in float64), within the rounding bound of each reduction (tests/error_bounds.py).
DEVICE_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10)}


def assert_device_matches_cpu(op, device, x, weight, mask, bias, dtype, accumulate=None):
    """op on `device` (forward and every gradient) equals op on the CPU; the weight gradient is
    exactly zero where the mask is false on both. ``accumulate``: the type the device sums in
    (float32 for halves unless cuBLAS may reduce in half precision)."""
    moved = [None if t is None else t.to(device) for t in (x, weight, mask, bias)]
    cpu = run_with_grads(lambda x_, w_, b_: op(x_, w_, mask, b_), x, weight, bias, 0)
    dev = run_with_grads(lambda x_, w_, b_: op(x_, w_, moved[2], b_), moved[0], moved[1],
                         moved[3], 0)
    (y, grads), (y_mag, grads_mag), (y_terms, grads_terms) = bilinear_references(
        lambda x_, w_, b_: op(x_, w_, mask, b_), (x, weight, bias), upstream_gradient(cpu[0], 0))
    names = ("output", "grad_x", "grad_weight", "grad_bias")
    for name, a, b, ref, mag, terms in zip(names, dev, cpu, (y, *grads), (y_mag, *grads_mag),
                                           (y_terms, *grads_terms)):
        if b is None:
            assert a is None, name
            continue
        assert a.device.type == device and a.dtype == dtype and a.shape == b.shape, name
        if dtype == torch.float64:
            torch.testing.assert_close(a.cpu(), b, **DEVICE_TOL[dtype], msg=name)
        else:
            assert_close_bounded(a, ref, mag, terms, dtype, msg=name, accumulate=accumulate)
    assert (dev[2].cpu()[~mask] == 0).all(), "grad_weight must be exactly 0 where mask is false"


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("case_id,case", list(enumerate(linear_cases())))
def test_masked_linear_device_matches_cpu(device, case_id, case, exact_fp32_on_gpu):
    x, weight, mask, bias, dtype = linear_inputs(case_id, case)
    assert_device_matches_cpu(_ops.masked_linear, device, x, weight, mask, bias, dtype)


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("case_id,case", list(enumerate(conv_cases())))
def test_masked_conv2d_device_matches_cpu(device, case_id, case, exact_fp32_on_gpu):
    x, weight, mask, bias, dtype, conv_args = conv_inputs(case_id, case)
    assert_device_matches_cpu(
        lambda x_, w_, m_, b_: _ops.masked_conv2d(x_, w_, m_, b_, **conv_args),
        device, x, weight, mask, bias, dtype,
    )


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("numel_offset", [(4096 * 3 + 5, 0), (1000, 1), (7, 3)],
                         ids=["tail", "misaligned", "tiny"])
def test_mask_kernel_every_width_and_alignment(device, dtype, numel_offset):
    """The masked weight the GPU multiplies with is where(mask, w, 0) bit for bit: 16-byte vector
    path with a tail (numel not a multiple of the vector), and the scalar path for a weight view
    whose data does not start 16-byte aligned."""
    numel, offset = numel_offset
    generator = torch.Generator().manual_seed(numel)
    base = torch.randn(numel + offset, generator=generator).to(dtype)
    base[offset::97] = float("nan")  # a pruned nan must come back +0, a kept one stays nan
    mask = make_mask((1, numel), 0.5, generator)
    weight = base.to(device)[offset:].view(1, numel)  # contiguous, data starts at `offset`
    # With grad_out = [[1]] and x = ones: grad_x = 1 * where(mask, w, 0) and grad_w = the mask.
    ones = torch.ones(1, numel, dtype=dtype, device=device)
    grad_x, grad_w, _ = OPS.masked_linear_backward(torch.ones(1, 1, dtype=dtype, device=device),
                                                   ones, weight, mask.to(device),
                                                   [True, True, False])
    want = torch.where(mask, base[offset:].view(1, numel), torch.zeros((), dtype=dtype))
    torch.testing.assert_close(grad_x.cpu(), want, rtol=0, atol=0, equal_nan=True)
    assert not torch.signbit(grad_x.cpu()[~mask]).any()  # +0, not -0
    assert torch.equal(grad_w.cpu(), mask.to(dtype))


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_device_matches_cpu(device, dtype):
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(6, 40, generator=generator), torch.randn(24, 40, generator=generator)
    mask = make_mask(weight.shape, 0.5, generator)
    bias = torch.randn(24, generator=generator)
    # cuBLAS may reduce fp16/bf16 products in half precision (allow_fp16_reduced_precision_reduction)
    assert_device_matches_cpu(_ops.masked_linear, device, x.to(dtype), weight.to(dtype), mask,
                              bias.to(dtype), dtype, accumulate=dtype)
    image, conv_w = torch.randn(2, 4, 6, 6, generator=generator), torch.randn(6, 4, 3, 3, generator=generator)
    conv_mask = make_mask(conv_w.shape, 0.5, generator)
    assert_device_matches_cpu(lambda x_, w_, m_, b_: _ops.masked_conv2d(x_, w_, m_, b_, padding=1),
                              device, image.to(dtype), conv_w.to(dtype), conv_mask, None, dtype,
                              accumulate=dtype)


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_pruned_inf_and_nan_weights_count_as_zero_on_device(device, bad, exact_fp32_on_gpu):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=generator)
    mask = make_mask(weight.shape, 0.5, generator)
    stored = weight.masked_fill(~mask, bad).to(device).requires_grad_()
    x = torch.randn(3, 4, generator=generator)
    y = _ops.masked_linear(x.to(device), stored, mask.to(device))
    assert_op_close(y, F.linear, (x, weight * mask))
    y.sum().backward()
    assert (stored.grad.cpu()[~mask] == 0).all()


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("has_bias", [False, True])
def test_gradcheck_on_device(device, has_bias):
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(device).requires_grad_()

    x, weight = leaf(2, 3, 5), leaf(4, 5)
    mask = make_mask(weight.shape, 0.5, generator).to(device)
    bias = leaf(4) if has_bias else None
    assert torch.autograd.gradcheck(lambda *a: _ops.masked_linear(*a), (x, weight, mask, bias))
    assert torch.autograd.gradgradcheck(lambda *a: _ops.masked_linear(*a), (x, weight, mask, bias))

    image, conv_w = leaf(2, 4, 5, 6), leaf(6, 2, 3, 2)
    conv_mask = make_mask(conv_w.shape, 0.5, generator).to(device)
    conv_bias = leaf(6) if has_bias else None
    conv = lambda x_, w_, b_: _ops.masked_conv2d(x_, w_, conv_mask, b_, (2, 1), 1, (1, 2), 2)  # noqa: E731
    assert torch.autograd.gradcheck(conv, (image, conv_w, conv_bias))
    assert torch.autograd.gradgradcheck(conv, (image, conv_w, conv_bias))


@pytest.mark.parametrize("device", [CUDA])
def test_opcheck_on_device(device):
    for op, args in opcheck_samples():
        moved = tuple(a.detach().to(device).requires_grad_(a.requires_grad)
                      if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, moved)


@pytest.mark.parametrize("device", [CUDA])
def test_device_errors_name_the_argument(device):
    args = linear_args()
    with pytest.raises(RuntimeError, match=r"masked_linear: `x` must be on the same device as `weight`"):
        _ops.masked_linear(args["x"], args["weight"].to(device), args["mask"].to(device))
    with pytest.raises(RuntimeError, match=r"masked_linear: `mask` must be on the same device as `weight`"):
        _ops.masked_linear(args["x"].to(device), args["weight"].to(device), args["mask"])
    with pytest.raises(RuntimeError, match=r"masked_linear: `mask` must be a bool tensor"):
        w = args["weight"].to(device)
        _ops.masked_linear(args["x"].to(device), w, torch.ones_like(w))


@pytest.mark.parametrize("key", ["AutocastCPU", "AutocastCUDA"])
@pytest.mark.parametrize("op", ["masked_linear", "masked_conv2d"])
def test_autocast_kernels_are_registered(op, key):
    """Without an autocast kernel a masked layer inside torch.autocast meets fp16 inputs and an
    fp32 weight and fails with a dtype error; the CUDA one is registered in every build."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"torchprune::{op}", key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False")
def test_cuda_autocast_computes_in_half_like_linear():
    torch.manual_seed(0)
    x, w = torch.randn(5, 16, device="cuda"), torch.randn(8, 16, device="cuda")
    mask = torch.rand(8, 16, device="cuda") > 0.5
    with torch.autocast("cuda", dtype=torch.float16):
        out = _ops.masked_linear(x, w, mask, None)
        ref = F.linear(x, w * mask)
    assert out.dtype == ref.dtype == torch.float16
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_float8_weights_are_refused_by_name(op):
    """float8 counts as floating point in ATen, but no masked kernel takes it: a clear error."""
    dtype = torch.float8_e4m3fn
    if op == "linear":
        w, x = torch.zeros(4, 4, dtype=dtype), torch.zeros(2, 4, dtype=dtype)
        call = lambda: _ops.masked_linear(x, w, torch.ones(4, 4, dtype=torch.bool), None)  # noqa: E731
    else:
        w, x = torch.zeros(2, 2, 3, 3, dtype=dtype), torch.zeros(1, 2, 5, 5, dtype=dtype)
        call = lambda: _ops.masked_conv2d(x, w, torch.ones(2, 2, 3, 3, dtype=torch.bool), None)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"`weight` must be a floating point tensor \(float32, float64, float16 or "
                                           r"bfloat16\), got torch.float8_e4m3fn"):
        call()
