"""Turning importance scores into keep-masks: per layer, global, by threshold, or N:M.

All routines take the scores of each layer and the layer's current mask (true = kept) and return the
new masks; a weight that is already pruned stays pruned (its score is treated as -inf, and the new
mask is and-ed with the old one), so calling prune() again prunes further among the survivors.

Ties are broken deterministically: scores are ranked with a *stable* sort, so among equal scores
the weight with the lower flat index (row-major order of the weight) is pruned first, and in a
global ranking the layer that comes first in ``named_modules`` order is pruned first.
"""

from __future__ import annotations

from typing import List

import torch

__all__ = ["by_ratio", "by_row_ratio", "by_global_ratio", "by_threshold", "n_of_m", "group_input_last"]


def _ranked_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flat float64 scores with the already pruned entries at -inf, so they rank first."""
    flat = scores.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    return flat.masked_fill(~mask.reshape(-1).cpu(), float("-inf"))


def _prune_lowest(flat: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask over ``flat`` with the ``count`` lowest entries pruned (stable order for ties)."""
    keep = torch.ones_like(flat, dtype=torch.bool)
    if count > 0:
        order = torch.sort(flat, stable=True).indices
        keep[order[:count]] = False
    return keep


def _target_count(sparsity: float, numel: int, already: int) -> int:
    """How many weights end up pruned: round(sparsity * numel), never fewer than already pruned."""
    return max(int(round(sparsity * numel)), already)


def by_ratio(scores: torch.Tensor, mask: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One layer pruned to ``sparsity`` (within half a weight), lowest scores first."""
    flat = _ranked_scores(scores, mask)
    already = int((~mask).sum())
    keep = _prune_lowest(flat, _target_count(sparsity, flat.numel(), already))
    return keep.view(mask.shape).to(mask.device) & mask


def by_row_ratio(scores: torch.Tensor, mask: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Every output row (neuron or filter) pruned to ``sparsity`` on its own, lowest scores first:
    round(sparsity * row length) per row, never fewer than the row already lost (Wanda's rule)."""
    rows = _ranked_scores(scores, mask).view(mask.shape[0], -1)
    already = rows.isneginf().sum(1)
    count = torch.clamp(already, min=int(round(sparsity * rows.shape[1])))
    order = torch.sort(rows, dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(rows.shape[1]).expand_as(order).contiguous())
    keep = rank >= count[:, None]
    return keep.view(mask.shape).to(mask.device) & mask


def by_global_ratio(scores: List[torch.Tensor], masks: List[torch.Tensor], sparsity: float) -> List[torch.Tensor]:
    """All layers ranked together; the total pruned count is round(sparsity * total weights)."""
    flats = [_ranked_scores(s, m) for s, m in zip(scores, masks)]
    joined = torch.cat(flats)
    already = sum(int((~m).sum()) for m in masks)
    keep = _prune_lowest(joined, _target_count(sparsity, joined.numel(), already))
    out, start = [], 0
    for flat, mask in zip(flats, masks):
        part = keep[start : start + flat.numel()]
        out.append(part.view(mask.shape).to(mask.device) & mask)
        start += flat.numel()
    return out


def by_threshold(scores: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Every weight whose score is strictly below ``threshold`` is pruned."""
    return (scores.detach().double() >= threshold).to(mask.device) & mask  # no rounding of the threshold


def group_input_last(weight_like: torch.Tensor) -> torch.Tensor:
    """A view-compatible permutation that puts the input dimension last.

    Linear (out, in) stays as is; conv (out, in, *kernel) becomes (out, *kernel, in), so that
    consecutive entries along the last dim are consecutive input channels at one kernel position.
    """
    if weight_like.dim() <= 2:
        return weight_like
    return weight_like.movedim(1, -1)


def _restore_input_dim(grouped: torch.Tensor, dims: int) -> torch.Tensor:
    return grouped if dims <= 2 else grouped.movedim(-1, 1)


def n_of_m(scores: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of ``m`` consecutive weights along the input dimension, keep the ``n`` best.

    The input size must be divisible by ``m`` (checked by the caller). Groups that are already
    sparser than n:m stay as they are.
    """
    dims = mask.dim()
    ranked = _ranked_scores(scores, mask).view(mask.shape)
    grouped = group_input_last(ranked)
    shape = grouped.shape
    groups = grouped.reshape(-1, m)
    order = torch.sort(groups, dim=1, stable=True).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, : m - n], False)
    keep = _restore_input_dim(keep.view(shape), dims)
    return keep.contiguous().to(mask.device) & mask

