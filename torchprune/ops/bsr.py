"""The block-sparse ops: a weight packed in R x 1 blocks (BSR), and the product with it.

A block-sparse weight ``[out_features, in_features]`` is three tensors (``csrc/common/bsr.h``):
``block_ptr`` (int32, ``out_features // R + 1``: block row b covers output rows ``b*R .. b*R+R-1``),
``col_idx`` (the input column of each stored block, of dtype :func:`~torchprune.ops.csr.index_dtype`)
and ``values`` (``[blocks, R]``: ``values[j, i] = W[b*R + i, col_idx[j]]``). R is ``values.shape[1]``.

Why R x 1 (R output rows, one input column): each stored block multiplies one row of the
transposed input into R outputs, so the kernel loads each input row once for R multiply-adds per
batch lane where CSR loads it for one; at batch 1 a block is R contiguous values behind one index.
A 1 x C block would save index bytes but not those loads. The fp32 AVX2 kernels exist for R = 4 and
R = 8; other R and other CPUs run a portable loop (correct, not fast).

:func:`pack_bsr` and :func:`unpack_bsr` are tensor code (no C++ op): packing happens once per layer.
:func:`block_sparse_linear` is the C++ op ``torch.ops.torchprune.block_sparse_linear``,
differentiable w.r.t. ``x``, ``values`` and ``bias``; its fake kernel sits below its wrapper.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .csr import index_dtype, weight_and_mask

__all__ = ["pack_bsr", "unpack_bsr", "check_bsr", "block_sparse_linear", "block_pattern_rows"]


def _blocked(tensor: Tensor, block_rows: int) -> Tensor:
    """``[N, K]`` as ``[N // R, R, K]``."""
    return tensor.reshape(tensor.shape[0] // block_rows, block_rows, tensor.shape[1])


def _whole_blocks(blocks: Tensor) -> bool:
    """Whether every block of ``[N // R, R, K]`` bools is all true or all false."""
    return bool((blocks.all(1) == blocks.any(1)).all())


def block_pattern_rows(keep: Tensor, candidates=(8, 4)) -> Optional[int]:
    """The largest R in ``candidates`` for which the bool pattern ``keep [N, K]`` is made of whole
    R x 1 blocks (all kept or all pruned, R dividing N), or None. A pattern with nothing pruned
    is not counted as blocks (it is dense)."""
    if keep.dim() != 2 or bool(keep.all()):
        return None
    for r in candidates:
        if keep.shape[0] % r == 0 and _whole_blocks(_blocked(keep, r)):
            return r
    return None


def pack_bsr(weight: Tensor, block_rows: int, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Packs a 2-D weight ``[out_features, in_features]`` in ``block_rows`` x 1 blocks as
    ``(block_ptr, col_idx, values)``.

    With ``mask`` (bool, the weight's shape, made of whole blocks) the kept blocks are stored, zeros
    among them included; without, every block holding a nonzero is. Columns ascend within a block row.

    >>> block_ptr, col_idx, values = pack_bsr(torch.tensor([[0.0, 2.0], [0.0, 3.0]]), 2)
    >>> block_ptr.tolist(), col_idx.tolist(), values.tolist()
    ([0, 1], [1], [[2.0, 3.0]])
    """
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"pack_bsr: `block_rows` must be an int >= 1, got {block_rows!r}")
    weight = weight_and_mask("pack_bsr", weight, mask)
    rows, cols = weight.shape
    if rows % block_rows:
        raise ValueError(f"pack_bsr: `block_rows` = {block_rows} must divide out_features = {rows}")
    if mask is not None:
        blocks = _blocked(mask, block_rows)
        kept = blocks.any(1)
        if not _whole_blocks(blocks):
            raise ValueError(
                f"pack_bsr: `mask` is not made of whole {block_rows}x1 blocks (some block is part kept, part "
                f"pruned): prune with granularity='block:{block_rows}x1', or pack it as CSR (pack_csr)"
            )
    else:
        kept = _blocked(weight != 0, block_rows).any(1)
    block_row, column = kept.nonzero(as_tuple=True)  # row-major: block rows in order, columns ascending
    counts = torch.bincount(block_row, minlength=kept.shape[0])
    block_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    values = _blocked(weight, block_rows).transpose(1, 2)[block_row, column]
    dtype = index_dtype(cols)
    if dtype == torch.int16:  # the int16 holds an unsigned 16-bit column (csrc/common/csr.h)
        column = torch.where(column >= 32768, column - 65536, column)
    return block_ptr, column.to(dtype).contiguous(), values.contiguous()


def _columns(col_idx: Tensor) -> Tensor:
    return col_idx.long() & 0xFFFF if col_idx.dtype == torch.int16 else col_idx.long()


def unpack_bsr(block_ptr: Tensor, col_idx: Tensor, values: Tensor, in_features: int) -> Tensor:
    """The dense ``[out_features, in_features]`` weight that :func:`pack_bsr` packed."""
    check_bsr(block_ptr, col_idx, values, in_features)
    block_rows, r = block_ptr.numel() - 1, values.shape[1]
    counts = (block_ptr[1:] - block_ptr[:-1]).long()
    block_row = torch.repeat_interleave(torch.arange(block_rows, device=counts.device), counts)
    dense = values.new_zeros(block_rows, in_features, r)
    dense[block_row, _columns(col_idx)] = values.detach()
    return dense.transpose(1, 2).reshape(block_rows * r, in_features)


def check_bsr(block_ptr: Tensor, col_idx: Tensor, values: Tensor, in_features: int) -> None:
    """Raises a ValueError naming the problem unless the tensors are a valid block-sparse weight
    (the CSR walk over the block rows: pointers monotone, columns ascending and in range)."""
    if not isinstance(values, Tensor) or values.dim() != 2 or values.shape[1] < 1:
        raise ValueError(f"`values` must be a 2-D [blocks, R] tensor with R >= 1, got "
                         f"{getattr(values, 'shape', values)!r}")
    if not isinstance(col_idx, Tensor) or col_idx.dim() != 1 or col_idx.numel() != values.shape[0]:
        raise ValueError(f"`col_idx` must be 1-D with one entry per stored block ({values.shape[0]}), got "
                         f"{getattr(col_idx, 'shape', col_idx)!r}")
    # The block rows are a CSR whose entries carry R values: check_csr walks that structure (its
    # `row_ptr` is block_ptr, its values a stand-in with one entry per block).
    stand_in = values.new_empty(values.shape[0])
    try:
        torch.ops.torchprune.check_csr(block_ptr, col_idx, stand_in, in_features)
    except RuntimeError as error:
        raise ValueError(str(error).replace("check_csr", "check_bsr").replace("row_ptr", "block_ptr")) from None


def block_sparse_linear(
    x: Tensor,
    block_ptr: Tensor,
    col_idx: Tensor,
    values: Tensor,
    in_features: int,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """``x @ W.T + bias`` with ``W`` packed by :func:`pack_bsr`; ``x`` is ``(..., in_features)``.
    float32 and float64 natively; float16 and bfloat16 compute in float32."""
    return torch.ops.torchprune.block_sparse_linear(x, block_ptr, col_idx, values, in_features, bias)


@torch.library.register_fake("torchprune::block_sparse_linear")
def _block_sparse_linear_fake(x, block_ptr, col_idx, values, in_features, bias):
    op = "block_sparse_linear"
    torch._check(block_ptr.dim() == 1 and block_ptr.dtype == torch.int32,
                 lambda: f"{op}: `block_ptr` must be a 1-D torch.int32 tensor")
    torch._check(values.dim() == 2, lambda: f"{op}: `values` must be a 2-D [blocks, R] tensor")
    torch._check(col_idx.dtype == index_dtype(in_features),
                 lambda: f"{op}: `col_idx` must have dtype {index_dtype(in_features)}, got {col_idx.dtype}")
    torch._check(x.dim() >= 1 and x.shape[-1] == in_features,
                 lambda: f"{op}: `x` must have in_features = {in_features} entries in its "
                 f"last dimension, got shape {list(x.shape)}")
    return x.new_empty((*x.shape[:-1], (block_ptr.shape[0] - 1) * values.shape[1]))
