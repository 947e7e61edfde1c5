"""The ``compact`` op: index_select of many tensors along their own dims in one C++ call.

Structured pruning slices every tensor a removed channel touches (a conv's filters, the next
BatchNorm's vectors, the next conv's input channels, ...); one call copies them all. The schema is in
``csrc/torchprune.cpp``, the kernels in ``csrc/cpu/compact.cpp`` and ``csrc/cuda/`` (their shared
argument checks in ``csrc/common/compact_checks.h``); here, the typed wrapper sits above the fake
kernel, which gives output shapes without running the kernel (the schema fragment names this module).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

__all__ = ["compact"]


def _length_message(tensors, dims, indices) -> str:
    return (f"compact: `tensors`, `dims` and `indices` must have the same length, got {len(tensors)}, "
            f"{len(dims)} and {len(indices)}")


def compact(tensors: Sequence[Tensor], dims: Sequence[int], indices: Sequence[Tensor]) -> List[Tensor]:
    """``[t.index_select(d, i) for t, d, i in zip(tensors, dims, indices)]`` in one call.

    Every output is a new contiguous tensor of the input's dtype; ``indices`` are int64 1-D CPU
    tensors with entries in ``[0, t.size(d))`` (repeats and any order allowed, empty allowed).

    >>> w, b = torch.randn(8, 4), torch.randn(8)
    >>> keep = torch.tensor([0, 2, 5])
    >>> [t.shape for t in compact([w, b, w], [0, 0, 1], [keep, keep, keep])]
    [torch.Size([3, 4]), torch.Size([3]), torch.Size([8, 3])]
    """
    tensors, dims, indices = list(tensors), [int(d) for d in dims], list(indices)
    if not (len(tensors) == len(dims) == len(indices)):
        raise ValueError(_length_message(tensors, dims, indices))
    if not tensors:
        return []
    return torch.ops.torchprune.compact(tensors, dims, indices)


@torch.library.register_fake("torchprune::compact")
def _compact_fake(tensors: List[Tensor], dims: List[int], indices: List[Tensor]) -> List[Tensor]:
    torch._check(len(dims) == len(tensors) and len(indices) == len(tensors),
                 lambda: _length_message(tensors, dims, indices))
    out = []
    for i, (t, d, index) in enumerate(zip(tensors, dims, indices)):
        torch._check(t.dim() >= 1,
                     lambda: f"compact: `tensors[{i}]` must have at least 1 dimension, got a 0-D tensor")
        torch._check(-t.dim() <= d < t.dim(),
                     lambda: f"compact: `dims[{i}]` must be in [{-t.dim()}, {t.dim() - 1}], got {d}")
        torch._check(index.dim() == 1, lambda: f"compact: `indices[{i}]` must be 1-D, got {index.dim()}-D")
        sizes = list(t.shape)
        sizes[d % t.dim()] = index.shape[0]
        out.append(t.new_empty(sizes))
    return out
