"""The masked ops: a dense weight times its bool mask, without storing the masked copy.

:func:`masked_linear` and :func:`masked_conv2d` are the forward of torchprune's masked layers
(``MaskedLinear``, ``MaskedConv2d``). Pruned entries count as exactly 0, even where the stored
weight holds inf/nan, and the weight gradient is exactly 0 there. Schemas in
``csrc/torchprune.cpp``, kernels in ``csrc/cpu/masked_ops.cpp`` and ``csrc/cuda/``, autograd in
``csrc/autograd/masked_ops.cpp``; here, each op's typed wrapper sits above its fake kernels, which
give output shapes and strides for tracing (the schema fragment names this module).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .csr import IntPair, pair

__all__ = ["masked_linear", "masked_conv2d"]


def _check(condition, message: Callable[[], str]) -> None:
    torch._check(condition, message)  # raises RuntimeError, like TORCH_CHECK in the kernels


def _shape(sizes) -> str:
    return "[" + ", ".join(str(size) for size in sizes) + "]"


def _check_mask(op: str, weight: Tensor, mask: Tensor) -> None:
    _check(
        mask.dtype == torch.bool,
        lambda: f"{op}: `mask` must be a bool tensor (torch.bool) with the shape of `weight`, "
        f"got {mask.dtype}",
    )
    _check(
        mask.shape == weight.shape,
        lambda: f"{op}: `mask` must have the same shape as `weight` {_shape(weight.shape)}, "
        f"got {_shape(mask.shape)}",
    )


# ---------------------------------------------------------------------------------------------
# masked_linear


def masked_linear(
    x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """``x @ where(mask, weight, 0).T + bias`` without storing a second, masked copy of ``weight``.

    ``x`` has shape ``(..., in_features)`` (any number of leading dims, including size 0),
    ``weight`` ``(out_features, in_features)``, ``mask`` a bool tensor of ``weight``'s shape and
    ``bias`` ``(out_features,)`` or None. Pruned entries count as exactly 0 (even if the stored
    weight holds inf/nan), and the gradient w.r.t. ``weight`` is exactly 0 there.

    >>> w = torch.randn(8, 4); mask = w.abs() > 0.5
    >>> y = masked_linear(torch.randn(2, 4), w, mask)
    >>> y.shape
    torch.Size([2, 8])
    """
    return torch.ops.torchprune.masked_linear(x, weight, mask, bias)


def _check_linear(op: str, x: Tensor, weight: Tensor, mask: Tensor) -> None:
    _check(
        weight.dim() == 2,
        lambda: f"{op}: `weight` must be 2-D, got a {weight.dim()}-D tensor of shape "
        f"{_shape(weight.shape)}",
    )
    _check(
        x.dim() >= 1,
        lambda: f"{op}: `x` must have at least 1 dimension (..., in_features), got a 0-D tensor",
    )
    _check(
        x.shape[-1] == weight.shape[1],
        lambda: f"{op}: `x` must have last dimension in_features = weight.size(1) = "
        f"{weight.shape[1]}, got shape {_shape(x.shape)}",
    )
    _check_mask(op, weight, mask)


@torch.library.register_fake("torchprune::masked_linear")
def _masked_linear_fake(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor]) -> Tensor:
    _check_linear("masked_linear", x, weight, mask)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("torchprune::masked_linear_backward")
def _masked_linear_backward_fake(
    grad_out: Tensor, x: Tensor, weight: Tensor, mask: Tensor, output_mask: List[bool]
) -> Tuple[Tensor, Tensor, Tensor]:
    _check_linear("masked_linear_backward", x, weight, mask)
    grad_x = x.new_empty(x.shape) if output_mask[0] else x.new_empty(0)
    grad_weight = x.new_empty(weight.shape) if output_mask[1] else x.new_empty(0)
    grad_bias = x.new_empty(weight.shape[0]) if output_mask[2] else x.new_empty(0)
    return grad_x, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# masked_conv2d


def masked_conv2d(
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = (1, 1),
    padding: IntPair = (0, 0),
    dilation: IntPair = (1, 1),
    groups: int = 1,
) -> Tensor:
    """``F.conv2d(x, where(mask, weight, 0), bias, ...)`` with no stored masked copy of ``weight``.

    ``x`` is ``(N, C_in, H, W)`` (N may be 0), ``weight`` ``(C_out, C_in / groups, kH, kW)``,
    ``mask`` a bool tensor of ``weight``'s shape, ``bias`` ``(C_out,)`` or None. ``stride``,
    ``padding`` (zeros) and ``dilation`` take an int or a pair of ints. The gradient w.r.t.
    ``weight`` is exactly 0 where ``mask`` is false.

    >>> w = torch.randn(16, 3, 3, 3); mask = w.abs() > 0.5
    >>> y = masked_conv2d(torch.randn(2, 3, 32, 32), w, mask, padding=1)
    >>> y.shape
    torch.Size([2, 16, 32, 32])
    """
    op = "masked_conv2d"
    return torch.ops.torchprune.masked_conv2d(
        x, weight, mask, bias, pair(stride, "stride", op), pair(padding, "padding", op),
        pair(dilation, "dilation", op), groups
    )


def _check_conv2d(op: str, x: Tensor, weight: Tensor, mask: Tensor, groups: int) -> None:
    _check(
        x.dim() == 4,
        lambda: f"{op}: `x` must be 4-D (N, C, H, W), got a {x.dim()}-D tensor of shape "
        f"{_shape(x.shape)}",
    )
    _check(groups >= 1, lambda: f"{op}: `groups` must be >= 1, got {groups}")
    _check_mask(op, weight, mask)


# The kernels convolve with a fresh contiguous masked weight; ATen's own meta functions for that
# convolution give the output strides (channels_last in, channels_last out), so reuse them.
@torch.library.register_fake("torchprune::masked_conv2d")
def _masked_conv2d_fake(
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> Tensor:
    _check_conv2d("masked_conv2d", x, weight, mask, groups)
    return torch.ops.aten.convolution(
        x, weight.contiguous(), bias, stride, padding, dilation, False, [0, 0], groups
    )


@torch.library.register_fake("torchprune::masked_conv2d_backward")
def _masked_conv2d_backward_fake(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    output_mask: List[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    _check_conv2d("masked_conv2d_backward", x, weight, mask, groups)
    bias_sizes = [weight.shape[0]] if output_mask[2] else None
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_out, x, weight.contiguous(), bias_sizes, stride, padding, dilation, False, [0, 0],
        groups, output_mask,
    )
    return (
        grad_x if output_mask[0] else x.new_empty(0),
        grad_weight.contiguous() if output_mask[1] else x.new_empty(0),
        grad_bias if output_mask[2] else x.new_empty(0),
    )
