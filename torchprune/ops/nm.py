"""The N:8 op: a weight whose every group of 8 input columns stores n entries, and the product.

An N:8 weight ``[out_features, in_features]`` (``in_features`` a multiple of 8) is two tensors
(``csrc/common/nm.h``): ``values`` ``[out_features, S]`` with ``S = in_features // 8 * n`` slots per
row, and ``codes`` (int32 ``[out_features, ceil(S / 8)]``) holding each slot's position in its
window of 8 columns, 3 bits a slot, 8 slots a code. Positions ascend within a window. Any N:M mask
with M in {2, 4, 8} packs with ``n = 8 * N // M`` (2:4 and 4:8 as n = 4, 1:4 and 2:8 as n = 2);
so does any mask with at most n kept weights in every window (the other slots store zeros).

Why: 4.5 bytes per fp32 weight instead of CSR's 6, no row pointers, and a kernel that needs no
gathers (one 8-column load of x per window, permuted by the positions in a register). Measured at
batch 1 on 2:4 weights (benchmarks/README.md): about 2x F.linear and 1.0-1.6x torchprune's CSR on
the same weight. The fp32 AVX2 kernel exists for n in {1, 2, 4} and serves up to 4 rows of x per
pass over the weight; from 16 rows of x on, the op rewrites the weight as CSR (O(slots)) and runs
``sparse_linear``'s tiled kernel, which reuses each weight across many rows. Other n, fp64 and CPUs
without AVX2 run a portable loop (correct, not fast).

:func:`pack_nm`, :func:`unpack_nm` and :func:`check_nm` are tensor code. :func:`nm_sparse_linear`
is the C++ op ``torch.ops.torchprune.nm_sparse_linear``, differentiable w.r.t. ``x``, ``values``
and ``bias``; its fake kernel sits below its wrapper.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .csr import weight_and_mask

__all__ = ["pack_nm", "unpack_nm", "check_nm", "nm_sparse_linear", "nm_slots", "WINDOW"]

#: Input columns per window: one AVX2 register of fp32 x.
WINDOW = 8
_BITS = 3
_SHIFTS = torch.arange(WINDOW) * _BITS


def _windows(tensor: Tensor) -> Tensor:
    """``[N, K]`` as ``[N, K // 8, 8]``."""
    return tensor.reshape(tensor.shape[0], tensor.shape[1] // WINDOW, WINDOW)


def nm_slots(keep: Tensor) -> Optional[int]:
    """The slots per window the bool pattern ``keep [N, K]`` needs (its most kept weights in any
    aligned group of 8 input columns, at least 1), or None when K is not a multiple of 8 or the
    pattern is dense (nothing pruned)."""
    if keep.dim() != 2 or keep.shape[1] % WINDOW or keep.shape[1] == 0 or bool(keep.all()):
        return None
    return max(1, int(_windows(keep).sum(-1).max())) if keep.numel() else 1


def pack_nm(weight: Tensor, n: Optional[int] = None, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Packs a 2-D weight ``[out_features, in_features]`` in the N:8 format as ``(codes, values)``.

    The kept weights are ``mask``'s (bool, the weight's shape) or, without it, the nonzeros; every
    window of 8 columns must hold at most ``n`` of them (None: the fewest slots that fit, see
    :func:`nm_slots`). A window with fewer fills its free slots with zeros at its lowest unused
    positions.

    >>> codes, values = pack_nm(torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0]]), 4)
    >>> values.tolist(), [(int(codes[0, 0]) >> (3 * i)) & 7 for i in range(4)]
    ([[0.0, 1.0, 2.0, 3.0]], [0, 1, 3, 4])
    """
    weight = weight_and_mask("pack_nm", weight, mask)
    rows, cols = weight.shape
    if cols % WINDOW:
        raise ValueError(f"pack_nm: in_features = {cols} must be a multiple of {WINDOW} (the format's windows)")
    keep = mask if mask is not None else weight != 0
    most = int(_windows(keep).sum(-1).max()) if keep.numel() else 0
    if n is None:
        n = max(1, most)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= WINDOW:
        raise ValueError(f"pack_nm: `n` must be an int in 1..{WINDOW} (slots per window of {WINDOW}), got {n!r}")
    if most > n:
        raise ValueError(f"pack_nm: a window of {WINDOW} input columns keeps {most} weights, more than n = {n} "
                         f"slots: prune with granularity='{n}:{WINDOW}' (or an N:M with N/M <= {n}/{WINDOW}), "
                         "or pack it as CSR (pack_csr)")
    windows = _windows(keep)
    order = torch.arange(WINDOW, device=weight.device)
    # kept positions first, then the lowest free ones; ascending within the window
    score = windows.to(torch.int64) * WINDOW + (WINDOW - 1 - order)
    positions = score.topk(n, dim=-1).indices.sort(-1).values  # [N, K/8, n]
    kept_values = torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    values = _windows(kept_values).gather(-1, positions).reshape(rows, cols // WINDOW * n)
    slots = values.shape[1]
    chunks = -(-slots // WINDOW)
    flat = positions.reshape(rows, slots)
    flat = torch.cat([flat, flat.new_zeros(rows, chunks * WINDOW - slots)], 1).reshape(rows, chunks, WINDOW)
    codes = (flat << _SHIFTS.to(flat.device)).sum(-1).to(torch.int32)
    return codes.contiguous(), values.contiguous()


def _positions(codes: Tensor, slots: int) -> Tensor:
    """The window position of every slot, ``[out_features, slots]`` (int64)."""
    shifts = _SHIFTS.to(codes.device)
    positions = (codes.long().unsqueeze(-1) >> shifts) & (WINDOW - 1)
    return positions.reshape(codes.shape[0], codes.shape[1] * WINDOW)[:, :slots]


def unpack_nm(codes: Tensor, values: Tensor, in_features: int) -> Tensor:
    """The dense ``[out_features, in_features]`` weight that :func:`pack_nm` packed."""
    n = check_nm(codes, values, in_features)
    rows, slots = values.shape
    dense = values.new_zeros(rows, in_features)
    if slots:
        window = torch.arange(slots, device=values.device) // n * WINDOW
        dense.scatter_(1, _positions(codes, slots) + window, values.detach())
    return dense


def check_nm(codes: Tensor, values: Tensor, in_features: int) -> int:
    """Raises a ValueError naming the problem unless the tensors are a valid N:8 weight (shapes,
    dtypes, positions ascending within every window, unused code bits zero); returns n (0 when
    ``in_features`` is 0)."""
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 0 or in_features % WINDOW:
        raise ValueError(f"`in_features` must be an int >= 0 and a multiple of {WINDOW}, got {in_features!r}")
    if not isinstance(values, Tensor) or values.dim() != 2 or not values.is_floating_point():
        raise ValueError(f"`values` must be a 2-D floating-point [out_features, slots] tensor, got "
                         f"{getattr(values, 'shape', values)!r}")
    rows, slots = values.shape
    windows = in_features // WINDOW
    n = slots // windows if windows else 0
    if (windows and (slots % windows or not 1 <= n <= WINDOW)) or (not windows and slots):
        raise ValueError(f"`values` must be [out_features, in_features / 8 * n] with 1 <= n <= 8; with in_features = "
                         f"{in_features} got shape {list(values.shape)}")
    chunks = -(-slots // WINDOW)
    if not isinstance(codes, Tensor) or codes.dtype != torch.int32 or list(codes.shape) != [rows, chunks]:
        raise ValueError(f"`codes` must be an int32 [out_features, ceil(slots / 8)] = [{rows}, {chunks}] tensor, got "
                         f"{getattr(codes, 'dtype', type(codes).__name__)} {list(getattr(codes, 'shape', []))}")
    if codes.numel():
        used = torch.full((chunks,), WINDOW * _BITS, dtype=torch.int64, device=codes.device)
        used[-1] = (slots - (chunks - 1) * WINDOW) * _BITS
        if bool(((codes.long() & 0xFFFFFFFF) >> used).any()):
            raise ValueError("`codes` has bits set beyond its slots' positions (3 bits a slot, 8 slots a code)")
    if slots and n > 1:
        steps = _positions(codes, slots).reshape(rows, windows, n).diff(dim=-1)
        if bool((steps <= 0).any()):
            raise ValueError("`codes`: positions must ascend within every window of 8 columns (each column once)")
    return n


def nm_sparse_linear(x: Tensor, codes: Tensor, values: Tensor, in_features: int,
                     bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W.T + bias`` with ``W`` packed by :func:`pack_nm`; ``x`` is ``(..., in_features)``.
    float32 and float64 natively; float16 and bfloat16 compute in float32."""
    return torch.ops.torchprune.nm_sparse_linear(x, codes, values, in_features, bias)


@torch.library.register_fake("torchprune::nm_sparse_linear")
def _nm_sparse_linear_fake(x, codes, values, in_features, bias):
    op = "nm_sparse_linear"
    torch._check(in_features % WINDOW == 0,
                 lambda: f"{op}: `in_features` must be a multiple of 8 (the format's windows are 8 input "
                 f"columns), got {in_features}")
    torch._check(codes.dim() == 2 and codes.dtype == torch.int32,
                 lambda: f"{op}: `codes` must be a 2-D torch.int32 tensor")
    torch._check(values.dim() == 2, lambda: f"{op}: `values` must be a 2-D [out_features, slots] tensor")
    torch._check(x.dim() >= 1 and x.shape[-1] == in_features,
                 lambda: f"{op}: `x` must have in_features = {in_features} entries in its "
                 f"last dimension, got shape {list(x.shape)}")
    return x.new_empty((*x.shape[:-1], values.shape[0]))
