"""Rounding-error bounds for comparing a reduction (dot product, matmul, convolution) with a
float64 reference, whatever order the kernel summed in.

Why: two correct kernels that sum the same K products in different orders (ours vs ATen,
AVX-512 vs AVX2 blocking, 1 vs 16 threads) differ by an error that follows the *summed
magnitudes* sum_k |a_k * b_k|, not the result: an output near zero can carry an error of
K * u * 700 after cancellation. A tolerance of the form atol + rtol * |result| is then either
too tight (it failed on AVX-512 Xeons at K = 1100) or so loose that it hides real bugs.

The bound used here is the classical deterministic one for a sum of K products computed in any
order (Higham, "Accuracy and Stability of Numerical Algorithms", sec. 3.1):

    |computed - exact| <= gamma_K(u_acc) * magnitude + u_out * |exact|,
    gamma_K(u) = K * u / (1 - K * u),   u = finfo(dtype).eps / 2,

where ``magnitude`` is the same op applied to |inputs| (computed in float64), ``u_acc`` is the
unit roundoff of the accumulation type and ``u_out`` that of the output (zero when they are the
same: the sum's own rounding is already inside gamma_K). float16 / bfloat16 kernels accumulate
in float32 and round once at the end. ``exact`` is the float64 reference on the very same
(already rounded) inputs; its own error is negligible next to float32's.

A wrong kernel still fails: leaving out one masked-in product x_j * w_ij of a row moves the
result by |x_j * w_ij|, typically 1e4 times the bound's gamma_K * magnitude for K ~ 1000.

float64 kernels keep their tests' tight rtol/atol where they had one (assert_close(float64)); where
a float64 layer is checked here, the bound is doubled, the reference being float64 too.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence, Union

import torch

HALVES = (torch.float16, torch.bfloat16)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2, the largest relative error of one rounding to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def gamma(terms: Union[int, torch.Tensor], u: float) -> Union[float, torch.Tensor]:
    """gamma_K = K u / (1 - K u): the relative error bound of a K-term sum of products."""
    if isinstance(terms, torch.Tensor):
        terms = terms.to(torch.float64).clamp(min=1)
        largest = float(terms.max()) if terms.numel() else 1.0
    else:
        terms = largest = max(int(terms), 1)
    if largest * u >= 0.5:
        raise ValueError(f"gamma_K is only meaningful for K * u < 1/2, got K = {largest}, u = {u}")
    return terms * u / (1 - terms * u)


def error_bound(expected64: torch.Tensor, magnitude64: torch.Tensor, terms: Union[int, torch.Tensor],
                dtype: torch.dtype, accumulate: Optional[torch.dtype] = None) -> torch.Tensor:
    """The elementwise bound on |computed - expected64| for a ``terms``-term reduction computed
    in ``dtype`` (accumulated in ``accumulate``: float32 for float16 / bfloat16 by default)."""
    if accumulate is None:
        accumulate = torch.float32 if dtype in HALVES else dtype
    u_acc, u_out = unit_roundoff(accumulate), unit_roundoff(dtype)
    bound = gamma(terms, u_acc) * magnitude64.to(torch.float64)
    if accumulate != dtype:  # the float32 sum is rounded once more, to dtype
        bound = bound * (1 + u_out) + u_out * expected64.to(torch.float64).abs()
    if dtype == torch.float64:  # the reference carries a float64 rounding error of its own
        bound = 2 * bound
    # a result below the smallest normal number is rounded to the subnormal spacing, not to u
    return bound + torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


def assert_close_bounded(actual: torch.Tensor, expected64: torch.Tensor, magnitude64: torch.Tensor,
                         terms: Union[int, torch.Tensor], dtype: torch.dtype, msg: str = "",
                         accumulate: Optional[torch.dtype] = None) -> None:
    """``actual`` (computed in ``dtype``) is within error_bound() of the float64 ``expected64``;
    NaN and +-Inf must match exactly. Fails naming the worst element and its bound."""
    assert actual.dtype == dtype, f"{msg}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected64.shape, f"{msg}: shape {tuple(actual.shape)} vs {tuple(expected64.shape)}"
    got, want = actual.detach().to("cpu", torch.float64), expected64.detach().to("cpu", torch.float64)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{msg}: NaN where the reference has none (or vice versa)"
    assert torch.equal(got[torch.isinf(want)], want[torch.isinf(want)]), f"{msg}: infinities differ"
    bound = error_bound(want, magnitude64.detach().to("cpu"), terms, dtype, accumulate)
    error = (got - want).abs()
    over = (error > bound) & finite
    if over.any():
        ratio = torch.where(finite, error / bound, torch.zeros_like(error))
        worst = int(ratio.flatten().argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), want.shape))
        raise AssertionError(
            f"{msg}: {int(over.sum())} of {want.numel()} elements exceed the rounding bound; worst at "
            f"{index}: got {got[index].item():.9g}, expected {want[index].item():.9g}, error "
            f"{error[index].item():.3g} > bound {bound[index].item():.3g} (magnitude "
            f"{magnitude64.flatten()[worst].item():.4g}, {dtype})")


def assert_close(dtype: torch.dtype, float64_tol: Optional[dict] = None) -> Callable:
    """check(actual, expected64, magnitude64, terms, what): assert_close_bounded for float32 and
    halves; for float64, torch.testing.assert_close within ``float64_tol`` (default rtol 1e-10,
    atol 1e-10), the strict check those tests always had."""
    def check(actual, expected64, magnitude64, terms, what):
        if dtype == torch.float64:
            assert actual.dtype == dtype, what
            torch.testing.assert_close(actual.detach().cpu(), expected64, msg=what,
                                       **(float64_tol or dict(rtol=1e-10, atol=1e-10)))
        else:
            assert_close_bounded(actual, expected64, magnitude64, terms, dtype, what)
    return check


def run_with_grads(fn: Callable, inputs: Sequence[Optional[torch.Tensor]], grad_out: Optional[torch.Tensor]):
    """fn(*inputs) on fresh leaves; with ``grad_out``, backward too. Returns (output, grads),
    a grad None for an input that is None."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    if grad_out is not None:
        out.backward(grad_out)
    return out.detach(), [None if t is None else t.grad for t in leaves]


def bilinear_references(reference: Callable, inputs: Sequence[Optional[torch.Tensor]],
                        grad_out: Optional[torch.Tensor] = None):
    """For an op linear in each argument separately (linear, conv2d; bias added): the float64
    reference output and gradients, their magnitudes (the op on |inputs| with |grad_out|: every
    summed product taken positive) and their term counts (the op on all-ones): three pairs
    (output, grads). Without ``grad_out``, forward only (grads None)."""
    def run(transform):
        ins = [None if t is None else transform(t.detach().to("cpu", torch.float64)) for t in inputs]
        upstream = None if grad_out is None else transform(grad_out.detach().to("cpu", torch.float64))
        return run_with_grads(reference, ins, upstream)

    return run(lambda t: t), run(torch.abs), run(torch.ones_like)


def transformed_twin(layer: torch.nn.Module, transform: Callable) -> torch.nn.Module:
    """A float64 copy of ``layer`` whose floating-point parameters went through ``transform``
    (identity, abs or ones_like: the reference, its magnitude, its term count)."""
    twin = copy.deepcopy(layer).double()
    with torch.no_grad():
        for p in twin.parameters():
            if p.is_floating_point():
                p.copy_(transform(p))
    return twin


def layer_references(layer: torch.nn.Module, x: torch.Tensor):
    """For an affine layer (Linear, Conv2d, their masked and sparse forms): its float64 output on
    x, the magnitude (|weights|, |bias| on |x|) and the term count of each output (all ones)."""
    def run(transform):
        with torch.no_grad():
            return transformed_twin(layer, transform)(transform(x.detach().double()))

    return run(lambda t: t), run(torch.abs), run(torch.ones_like)


def assert_op_close(actual: torch.Tensor, reference: Callable, inputs: Sequence[Optional[torch.Tensor]],
                    msg: str = "", accumulate: Optional[torch.dtype] = None) -> None:
    """``actual`` equals the bilinear ``reference(*inputs)`` (linear, conv2d) in float64 on the same
    inputs, within the rounding bound of actual.dtype."""
    (expected, _), (magnitude, _), (terms, _) = bilinear_references(reference, inputs)
    assert_close_bounded(actual, expected, magnitude, terms, actual.dtype, msg or "output", accumulate)


def assert_layer_close(actual: torch.Tensor, layer: torch.nn.Module, x: torch.Tensor, msg: str = "") -> None:
    """``actual`` (what some kernel made of ``layer`` on ``x``) equals ``layer`` in float64 on the
    same inputs, within the rounding bound of actual.dtype."""
    expected, magnitude, terms = layer_references(layer, x)
    assert_close_bounded(actual, expected, magnitude, terms, actual.dtype, msg or type(layer).__name__)


def layer_grad_references(layer: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    """layer_references() for the backward pass too: for (expected, magnitude, terms) each a tuple
    (output, grad of x, grad of layer.weight) in float64, with upstream gradient ``grad_out``."""
    def run(transform):
        twin = transformed_twin(layer, transform)
        twin.zero_grad(set_to_none=True)
        leaf = transform(x.detach().double()).requires_grad_()
        out = twin(leaf)
        out.backward(transform(grad_out.detach().double()))
        return out.detach(), leaf.grad, twin.weight.grad

    return run(lambda t: t), run(torch.abs), run(torch.ones_like)


# ---------------------------------------------------------------------------------------------
# Whole models: no magnitude to derive through softmax, normalization and residual adds, so two
# models said to compute the same function (pruned vs masked, sparse vs dense, before vs after
# make_permanent) are compared in float64, on copies. There a different summation order moves a
# result by ~K * 1.1e-16 * magnitude, some 1e-12 of the output scale for these models, far below
# the 1e-9 allowed, while any real difference (a wrong channel, head or weight) is O(1e-3) or more.

MODEL_RTOL = 1e-9


def as_float64(value):
    """``value`` with every floating tensor in it (tuples, lists, dicts) converted to float64."""
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(as_float64(v) for v in value)
    if isinstance(value, dict):
        return {k: as_float64(v) for k, v in value.items()}
    return value


def float64_outputs(module: torch.nn.Module, *inputs, **kwargs):
    """What a float64 copy of ``module`` returns for float64 copies of the inputs (no grad)."""
    with torch.no_grad():
        return copy.deepcopy(module).double()(*as_float64(inputs), **as_float64(kwargs))


def _largest(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.abs().max()) if value.numel() and value.is_floating_point() else 0.0
    if isinstance(value, (tuple, list)):
        return max((_largest(v) for v in value), default=0.0)
    return 0.0


def assert_close_outputs(got, want, msg: str = "") -> None:
    """float64 outputs ``got`` and ``want`` agree to MODEL_RTOL of their scale (see above)."""
    atol = MODEL_RTOL * max(1.0, _largest(want))
    torch.testing.assert_close(got, want, rtol=MODEL_RTOL, atol=atol, msg=(lambda m: f"{msg}: {m}") if msg else None)


def assert_same_function(a: torch.nn.Module, b: torch.nn.Module, *inputs, msg: str = "", **kwargs) -> None:
    """Modules ``a`` and ``b`` compute the same function of ``inputs``: compared in float64, on copies."""
    assert_close_outputs(float64_outputs(a, *inputs, **kwargs), float64_outputs(b, *inputs, **kwargs), msg)
