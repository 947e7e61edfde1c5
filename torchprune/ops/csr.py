"""The packed-sparse (CSR) ops: packing a weight, checking it, and computing with it.

A sparse weight is three tensors in CSR form (``csrc/common/csr.h``): ``row_ptr`` (int32,
``out_features + 1``), ``col_idx`` (one column per stored entry, of dtype :func:`index_dtype`: int16
holding an unsigned 16-bit value when ``in_features < 65536``, else int32) and ``values`` (the stored
entries, in the weight's dtype). :func:`pack_csr` makes them, :func:`unpack_csr` inverts it exactly,
and the compute ops (:func:`sparse_linear`, :func:`sparse_conv2d`) differentiate w.r.t. the input,
the stored ``values`` and the bias. The compute ops trust the structure, which :func:`pack_csr`
guarantees; :func:`check_csr` verifies tensors from anywhere else (a loaded checkpoint, say).

Each op's typed wrapper sits above its fake kernel (output shapes for tracing; the schema fragment
in ``csrc/torchprune.cpp`` names this module). This module also holds the two argument helpers the
op layer and the sparse layers share: :func:`index_dtype` (the column-index width) and :func:`pair`
(a conv's int-or-pair arguments, typed :data:`IntPair`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "IntPair",
    "pair",
    "index_dtype",
    "pack_csr",
    "unpack_csr",
    "check_csr",
    "sparse_linear",
    "sparse_conv2d",
]

#: A conv argument given as one int for both spatial dims or as a pair of ints.
IntPair = Union[int, Sequence[int]]

# Column indices are stored as unsigned 16-bit values below this input size (kMaxShortColumns in
# csrc/common/csr.h), as int32 from it on.
_MAX_SHORT_COLUMNS = 65536


def pair(value: IntPair, name: str, op: str) -> List[int]:
    """An int or a 2-sequence of ints as a list of 2 ints (the schemas' int[2]).

    >>> pair(3, "stride", "sparse_conv2d"), pair((1, 2), "stride", "sparse_conv2d")
    ([3, 3], [1, 2])
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return list(value)
    raise TypeError(f"{op}: `{name}` must be an int or a pair of ints, got {value!r}")


def index_dtype(in_features: int) -> torch.dtype:
    """The dtype of ``col_idx`` for a packed weight with ``in_features`` columns.

    >>> index_dtype(784), index_dtype(70000)
    (torch.int16, torch.int32)
    """
    return torch.int16 if in_features < _MAX_SHORT_COLUMNS else torch.int32


def weight_and_mask(op: str, weight: Tensor, mask: Optional[Tensor]) -> Tensor:
    """The checks every Python packer makes: ``weight`` 2-D, ``mask`` (if given) bool of its shape;
    returns the weight detached. The errors name ``op``."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"{op}: `weight` must be a 2-D tensor, got {getattr(weight, 'shape', weight)!r}")
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != weight.shape or mask.dtype != torch.bool):
        raise ValueError(f"{op}: `mask` must be a bool tensor of the weight's shape {list(weight.shape)}, "
                         f"got {getattr(mask, 'dtype', type(mask).__name__)} {list(getattr(mask, 'shape', []))}")
    return weight.detach()


def _check_packed(op: str, row_ptr: Tensor, col_idx: Tensor, values: Tensor, k: int) -> None:
    torch._check(row_ptr.dim() == 1 and row_ptr.dtype == torch.int32,
                 lambda: f"{op}: `row_ptr` must be a 1-D torch.int32 tensor")
    torch._check(col_idx.dtype == index_dtype(k),
                 lambda: f"{op}: `col_idx` must have dtype {index_dtype(k)}, got {col_idx.dtype}")
    torch._check(col_idx.dim() == 1 and values.dim() == 1,
                 lambda: f"{op}: `col_idx` and `values` must be 1-D")


# ---------------------------------------------------------------------------------------------
# pack_csr, unpack_csr, check_csr


def pack_csr(weight: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Packs a 2-D weight ``[out_features, in_features]`` as ``(row_ptr, col_idx, values)``.

    With ``mask`` (bool, the weight's shape) every allowed entry is stored, even one whose weight
    is 0, so that fine-tuning can still move it; without, the nonzeros are. Columns ascend within
    each row. Pack a conv weight ``[O, C, kh, kw]`` as ``weight.reshape(O, -1)``.

    >>> row_ptr, col_idx, values = pack_csr(torch.tensor([[0.0, 2.0], [3.0, 0.0]]))
    >>> row_ptr.tolist(), col_idx.tolist(), values.tolist()
    ([0, 1, 2], [1, 0], [2.0, 3.0])
    """
    return torch.ops.torchprune.pack_csr(weight.detach(), mask)


@torch.library.register_fake("torchprune::pack_csr")
def _pack_csr_fake(weight: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    torch._check(weight.dim() == 2, lambda: f"pack_csr: `weight` must be 2-D, got {weight.dim()}-D")
    nnz = torch.library.get_ctx().new_dynamic_size()
    rows, cols = weight.shape
    return (
        weight.new_empty(rows + 1, dtype=torch.int32),
        weight.new_empty(nnz, dtype=index_dtype(cols)),
        weight.new_empty(nnz),
    )


def unpack_csr(row_ptr: Tensor, col_idx: Tensor, values: Tensor, in_features: int) -> Tensor:
    """The dense ``[out_features, in_features]`` weight that :func:`pack_csr` packed."""
    return torch.ops.torchprune.unpack_csr(row_ptr, col_idx, values.detach(), in_features)


@torch.library.register_fake("torchprune::unpack_csr")
def _unpack_csr_fake(row_ptr: Tensor, col_idx: Tensor, values: Tensor, in_features: int) -> Tensor:
    _check_packed("unpack_csr", row_ptr, col_idx, values, in_features)
    return values.new_empty(row_ptr.shape[0] - 1, in_features)


def check_csr(row_ptr: Tensor, col_idx: Tensor, values: Tensor, in_features: int) -> None:
    """Raises a RuntimeError naming the problem unless the tensors are a valid packed weight."""
    torch.ops.torchprune.check_csr(row_ptr, col_idx, values.detach(), in_features)


@torch.library.register_fake("torchprune::check_csr")
def _check_csr_fake(row_ptr: Tensor, col_idx: Tensor, values: Tensor, in_features: int) -> None:
    _check_packed("check_csr", row_ptr, col_idx, values, in_features)


# ---------------------------------------------------------------------------------------------
# sparse_linear


def sparse_linear(
    x: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    values: Tensor,
    in_features: int,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """``x @ W.T + bias`` with ``W`` packed by :func:`pack_csr`; ``x`` is ``(..., in_features)``.

    Batch 1 reads each stored entry once (a gather-dot per row); larger batches multiply each
    stored entry into a register tile of the transposed input. float32 and float64 natively;
    float16 and bfloat16 compute in float32.
    """
    return torch.ops.torchprune.sparse_linear(x, row_ptr, col_idx, values, in_features, bias)


@torch.library.register_fake("torchprune::sparse_linear")
def _sparse_linear_fake(x, row_ptr, col_idx, values, in_features, bias):
    _check_packed("sparse_linear", row_ptr, col_idx, values, in_features)
    torch._check(x.dim() >= 1 and x.shape[-1] == in_features,
                 lambda: f"sparse_linear: `x` must have in_features = {in_features} entries in its "
                 f"last dimension, got shape {list(x.shape)}")
    return x.new_empty((*x.shape[:-1], row_ptr.shape[0] - 1))


@torch.library.register_fake("torchprune::sparse_linear_backward")
def _sparse_linear_backward_fake(grad_out, x, row_ptr, col_idx, values, in_features, output_mask):
    _check_packed("sparse_linear_backward", row_ptr, col_idx, values, in_features)
    return (
        x.new_empty(x.shape) if output_mask[0] else x.new_empty(0),
        values.new_empty(values.shape) if output_mask[1] else x.new_empty(0),
        x.new_empty(row_ptr.shape[0] - 1) if output_mask[2] else x.new_empty(0),
    )


# ---------------------------------------------------------------------------------------------
# sparse_conv2d


def sparse_conv2d(
    x: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    values: Tensor,
    kernel_size: IntPair,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> Tensor:
    """``F.conv2d(x, W, bias, stride, padding, dilation)`` (groups=1) with ``W`` packed as
    ``pack_csr(W.reshape(O, -1))``; ``x`` is ``(N, C, H, W)``."""
    op = "sparse_conv2d"
    return torch.ops.torchprune.sparse_conv2d(
        x, row_ptr, col_idx, values, pair(kernel_size, "kernel_size", op), bias,
        pair(stride, "stride", op), pair(padding, "padding", op), pair(dilation, "dilation", op),
    )


def _conv_output_shape(x, row_ptr, kernel_size, stride, padding, dilation):
    sizes = []
    for d in range(2):
        span = dilation[d] * (kernel_size[d] - 1) + 1
        sizes.append((x.shape[2 + d] + 2 * padding[d] - span) // stride[d] + 1)
    return (x.shape[0], row_ptr.shape[0] - 1, *sizes)


@torch.library.register_fake("torchprune::sparse_conv2d")
def _sparse_conv2d_fake(x, row_ptr, col_idx, values, kernel_size, bias, stride, padding, dilation):
    torch._check(x.dim() == 4, lambda: f"sparse_conv2d: `x` must be 4-D, got {x.dim()}-D")
    k = x.shape[1] * kernel_size[0] * kernel_size[1]
    _check_packed("sparse_conv2d", row_ptr, col_idx, values, k)
    return x.new_empty(_conv_output_shape(x, row_ptr, kernel_size, stride, padding, dilation))


@torch.library.register_fake("torchprune::sparse_conv2d_backward")
def _sparse_conv2d_backward_fake(
    grad_out, x, row_ptr, col_idx, values, kernel_size, stride, padding, dilation, output_mask
):
    return (
        x.new_empty(x.shape) if output_mask[0] else x.new_empty(0),
        values.new_empty(values.shape) if output_mask[1] else x.new_empty(0),
        x.new_empty(row_ptr.shape[0] - 1) if output_mask[2] else x.new_empty(0),
    )
