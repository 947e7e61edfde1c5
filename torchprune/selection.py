"""Turning importance scores into keep-masks: per layer, global, by threshold, or N:M.

All routines take the scores of each layer and the layer's current mask (true = kept; None means
nothing is pruned yet) and return the new masks; a weight that is already pruned stays pruned, so
calling prune() again prunes further among the survivors.

Ties are broken deterministically, exactly as a *stable* sort would: among equal scores the weight
with the lower flat index (row-major order of the weight) is pruned first, and in a global ranking
the layer that comes first in ``named_modules`` order is pruned first.

A ratio never empties a layer: `by_ratio` prunes at most all but one of a layer's weights, and
`by_global_ratio` keeps each layer's best weight, so a layer whose scores are all tiny next to the
others' still passes something on. Only an explicit `by_threshold` may prune a whole layer.

Memory: no routine concatenates the layers' scores or sorts a large tensor. Beyond ``_SORT_LIMIT``
(65,536) scores in all, the k-th lowest is found by a radix select over order-preserving integer keys of the
scores (4 histogram passes of 16 bits for float64, 2 for float32 and narrower), visiting the
scores in blocks of whole rows of at most ``_CHUNK`` elements; the result is the same mask as the
stable sort, bit for bit (tested), with O(chunk) extra memory besides the masks it returns.
Scores may also be a `RowScores`, made a block of rows at a time, so that no score tensor exists.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

__all__ = ["RowScores", "pruned_shares", "by_ratio", "by_row_ratio", "by_global_ratio", "by_threshold", "n_of_m",
           "group_input_last", "regrown"]

#: At most this many candidate scores are ranked with one stable sort; beyond, by radix select.
_SORT_LIMIT = 1 << 16
#: Elements per block visited at once (whole rows; a single longer row is one block).
_CHUNK = 1 << 16

_HALF = (torch.float16, torch.bfloat16)


class RowScores:
    """Scores made a block of output rows at a time by ``rows(start, stop)``, for criteria that
    score each weight from its own value (magnitude): a global ranking then never holds every
    layer's scores at once. Has just what the routines here use of a tensor."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, rows: Callable[[int, int], torch.Tensor]):
        self.shape, self.dtype, self._rows = torch.Size(shape), dtype, rows

    def numel(self) -> int:
        return self.shape.numel()

    def dim(self) -> int:
        return len(self.shape)

    def detach(self) -> "RowScores":
        return self

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        return self._rows(start, stop).detach()


def _kept(mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``mask`` on the CPU, or an all-true mask shaped like ``like`` when it is None."""
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool)
    return mask.to(device="cpu", dtype=torch.bool)


def row_blocks(numel: int, rows: int) -> Iterator[Tuple[int, int]]:
    """Row ranges ``[r0, r1)`` covering ``rows`` rows of ``numel // rows`` elements, ~_CHUNK each."""
    if numel == 0:
        return
    per_row = numel // rows
    step = max(1, _CHUNK // max(per_row, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _blocks(scores: torch.Tensor, mask: Optional[torch.Tensor], reserved: Optional[int] = None):
    """Yields (flat offset, flat scores, flat kept, flat candidates) blocks of whole rows, in flat
    order, on the CPU. Candidates are the kept weights less ``reserved`` (a flat index held back
    from the ranking)."""
    scores = scores.detach()
    rows = scores.shape[0] if scores.dim() else 1
    per_row = scores.numel() // max(rows, 1)
    for r0, r1 in row_blocks(scores.numel(), rows):
        offset = r0 * per_row
        flat = scores[r0:r1].reshape(-1).to("cpu")
        kept = (torch.ones(flat.numel(), dtype=torch.bool) if mask is None
                else mask[r0:r1].reshape(-1).to(device="cpu", dtype=torch.bool))
        candidates = kept
        if reserved is not None and offset <= reserved < offset + flat.numel():
            candidates = kept.clone()
            candidates[reserved - offset] = False
        yield offset, flat, kept, candidates


def _count_kept(mask: Optional[torch.Tensor], numel: int) -> int:
    return numel if mask is None else int(torch.count_nonzero(mask))


def _key_width(scores: List[torch.Tensor]) -> int:
    """32-bit keys when every score tensor fits float32 exactly, else 64-bit."""
    return 32 if all(s.dtype in (torch.float32,) + _HALF for s in scores) else 64


def _keys(flat: torch.Tensor, width: int) -> torch.Tensor:
    """Order-preserving int64 keys of float scores: a < b exactly when key(a) < key(b).

    -0.0 becomes +0.0 first (a sort treats them as equal, so they must tie here too); negative
    floats have their magnitude bits flipped so that larger magnitudes sort lower.
    """
    if width == 32:
        bits = (flat.to(torch.float32) + 0.0).view(torch.int32)
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        return bits.to(torch.int64)
    bits = (flat.to(torch.float64) + 0.0).view(torch.int64)
    return bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)


def _radix_threshold(scores, masks, reserved, count: int, width: int) -> Tuple[int, int]:
    """The key of the ``count``-th lowest candidate score (1-based), and how many candidates equal
    to it are pruned: 16 bits of the key per pass, top digit first (sign-adjusted)."""
    prefix = None
    remaining = count
    for shift in range(width - 16, -1, -16):
        hist = torch.zeros(1 << 16, dtype=torch.int64)
        for s, m, r in zip(scores, masks, reserved):
            for _, flat, _, candidates in _blocks(s, m, r):
                keys = _keys(flat[candidates], width)
                if prefix is not None:
                    keys = keys[(keys >> (shift + 16)) == prefix]
                digits = (keys >> shift) & 0xFFFF
                if prefix is None:
                    digits ^= 0x8000  # the top digit holds the sign: negative keys first
                hist += torch.bincount(digits, minlength=1 << 16)
        cumulative = hist.cumsum(0)
        digit = int(torch.searchsorted(cumulative, torch.tensor(remaining)))
        remaining -= int(cumulative[digit - 1]) if digit else 0
        if prefix is None:
            top = digit ^ 0x8000
            prefix = top - (1 << 16) if top >= 1 << 15 else top  # the signed value of key >> shift
        else:
            prefix = prefix * (1 << 16) + digit
    return prefix, remaining


def _prune_lowest(scores: List[torch.Tensor], masks: List[Optional[torch.Tensor]], count: int,
                  reserved: Optional[List[Optional[int]]] = None) -> List[torch.Tensor]:
    """New keep-masks: among the candidates (kept and not reserved) of all tensors, the ``count``
    lowest are pruned, ties in (tensor order, flat index) order as a stable sort would."""
    reserved = reserved or [None] * len(scores)
    total = sum(s.numel() for s in scores)
    out = []
    if count <= 0:
        return [_kept(m, s).clone() if m is not None else _kept(m, s) for s, m in zip(scores, masks)]
    if total <= _SORT_LIMIT:
        flats, kepts = [], []
        for s, m, r in zip(scores, masks, reserved):
            parts = list(_blocks(s, m, r))
            flats.append(torch.cat([p[1].double() for p in parts]) if parts else torch.zeros(0, dtype=torch.float64))
            kepts.append(torch.cat([p[3] for p in parts]) if parts else torch.zeros(0, dtype=torch.bool))
        candidates = torch.cat([f[k] for f, k in zip(flats, kepts)])
        where = torch.cat([k.nonzero().flatten() + sum(x.numel() for x in flats[:i]) for i, k in enumerate(kepts)])
        order = torch.sort(candidates, stable=True).indices
        pruned = torch.zeros(total, dtype=torch.bool)
        pruned[where[order[:count]]] = True
        start = 0
        for s, m in zip(scores, masks):
            part = pruned[start : start + s.numel()].view(s.shape)
            out.append(_kept(m, s) & ~part)
            start += s.numel()
        return out
    width = _key_width(scores)
    threshold, ties_left = _radix_threshold(scores, masks, reserved, count, width)
    for s, m, r in zip(scores, masks, reserved):
        keep = torch.empty(s.shape, dtype=torch.bool)
        flat_keep = keep.view(-1)
        for offset, flat, kept, candidates in _blocks(s, m, r):
            keys = _keys(flat, width)
            drop = candidates & (keys < threshold)
            if ties_left > 0:
                tie = candidates & (keys == threshold)
                rank = tie.cumsum(0)
                drop |= tie & (rank <= ties_left)
                ties_left -= min(int(rank[-1]), ties_left)
            flat_keep[offset : offset + flat.numel()] = kept & ~drop
        out.append(keep)
    return out


def _target_count(sparsity: float, numel: int, already: int) -> int:
    """How many weights end up pruned: round(sparsity * numel), never fewer than already pruned."""
    return max(int(round(sparsity * numel)), already)


def _best_kept(scores: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[int]:
    """Flat index of the kept weight a stable ascending sort puts last (the highest score, the
    highest index among equals), or None if nothing is kept."""
    best, best_index = None, None
    for offset, flat, kept, _ in _blocks(scores, mask):
        values = flat.double()[kept]
        if values.numel() == 0:
            continue
        top = values.max()
        if best is None or top >= best:
            positions = kept.nonzero().flatten()
            best, best_index = top, offset + int(positions[(values == top).nonzero().flatten()[-1]])
    return best_index


def pruned_shares(masks: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Each mask's pruned fraction (0 for an empty one): how a global ranking's masks become the
    per-layer sparsities of a dict scope, for callers that prune layer by layer afterwards."""
    return {name: 1.0 - float(mask.sum()) / mask.numel() if mask.numel() else 0.0 for name, mask in masks.items()}


def by_ratio(scores: torch.Tensor, mask: Optional[torch.Tensor], sparsity: float) -> torch.Tensor:
    """One layer pruned to ``sparsity`` (within half a weight), lowest scores first; at least one
    weight stays unless the layer had lost them all already."""
    numel = scores.numel()
    already = numel - _count_kept(mask, numel)
    target = min(_target_count(sparsity, numel, already), max(numel - 1, already))
    return _prune_lowest([scores], [mask], target - already)[0]


def by_row_ratio(scores: torch.Tensor, mask: Optional[torch.Tensor], sparsity: float) -> torch.Tensor:
    """Every output row (neuron or filter) pruned to ``sparsity`` on its own, lowest scores first:
    round(sparsity * row length) per row, never fewer than the row already lost (Wanda's rule), and
    never the row's last weight. Rows are ranked in blocks, so memory stays bounded."""
    scores = scores.detach()
    rows = scores.shape[0]
    length = scores.numel() // rows if rows else 0
    keep = torch.empty(scores.shape, dtype=torch.bool)
    want = int(round(sparsity * length))
    for r0, r1 in row_blocks(scores.numel(), rows):
        block = scores[r0:r1].reshape(r1 - r0, length).to(device="cpu", dtype=torch.float64)
        kept = _kept(None if mask is None else mask[r0:r1], block).reshape(r1 - r0, length)
        block = block.masked_fill(~kept, float("-inf"))
        already = (~kept).sum(1)
        count = torch.minimum(torch.clamp(already, min=want), torch.clamp(already, min=length - 1))
        order = torch.sort(block, dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(length).expand_as(order).contiguous())
        keep[r0:r1] = ((rank >= count[:, None]) & kept).view(keep[r0:r1].shape)
    return keep


def by_global_ratio(scores: List[torch.Tensor], masks: List[Optional[torch.Tensor]],
                    sparsity: float) -> List[torch.Tensor]:
    """All layers ranked together; the total pruned count is round(sparsity * total weights), but
    every layer keeps its best weight (so at most all but one weight per layer goes)."""
    total = sum(s.numel() for s in scores)
    kept = [_count_kept(m, s.numel()) for s, m in zip(scores, masks)]
    already = total - sum(kept)
    reserved = [_best_kept(s, m) if k else None for s, m, k in zip(scores, masks, kept)]
    available = sum(kept) - sum(r is not None for r in reserved)
    count = min(_target_count(sparsity, total, already) - already, available)
    return _prune_lowest(scores, masks, count, reserved)


def by_threshold(scores: torch.Tensor, mask: Optional[torch.Tensor], threshold: float) -> torch.Tensor:
    """Every weight whose score is strictly below ``threshold`` is pruned (whole layers too)."""
    keep = torch.empty(scores.shape, dtype=torch.bool)
    flat_keep = keep.view(-1)
    for offset, flat, kept, _ in _blocks(scores, mask):
        flat_keep[offset : offset + flat.numel()] = (flat.double() >= threshold) & kept  # threshold not rounded
    return keep


def regrown(drop_scores, grow_scores: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
            count: int) -> Tuple[torch.Tensor, int]:
    """``after`` with ``count`` of its kept weights swapped for weights that were already pruned in
    ``before`` (RigL's drop and grow): the kept weights with the lowest ``drop_scores`` are pruned,
    and as many of ``before``'s pruned weights with the highest ``grow_scores`` come back, so the
    number kept does not change. A weight pruned only in ``after`` (just now) cannot come back.

    ``count`` is capped by the weights there are to drop and to grow (at least one weight stays
    kept); returns (mask, weights swapped). Among equal scores the lower flat index goes first, in
    the drop and in the growth (stable sorts)."""
    kept = after.reshape(-1).to(device="cpu", dtype=torch.bool)
    candidates = ~before.reshape(-1).to(device="cpu", dtype=torch.bool)
    count = max(0, min(int(count), int(kept.sum()) - 1, int(candidates.sum())))
    if count == 0:
        return after.clone(), 0
    drop = drop_scores[0:drop_scores.shape[0]].detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    drop = drop.masked_fill(~kept, float("inf"))
    grow = grow_scores.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    grow = grow.masked_fill(~candidates, float("-inf"))
    out = kept.clone()
    out[torch.sort(drop, stable=True).indices[:count]] = False
    out[torch.sort(grow, stable=True, descending=True).indices[:count]] = True
    return out.view(after.shape).to(after.device), count


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


def n_of_m(scores: torch.Tensor, mask: Optional[torch.Tensor], n: int, m: int) -> torch.Tensor:
    """In every group of ``m`` consecutive weights along the input dimension, keep the ``n`` best.

    The input size must be divisible by ``m`` (checked by the caller). Groups that are already
    sparser than n:m stay as they are. Output rows are handled in blocks (groups never span rows).
    """
    scores = scores.detach()
    keep = torch.empty(scores.shape, dtype=torch.bool)
    dims = scores.dim()
    for r0, r1 in row_blocks(scores.numel(), scores.shape[0] if dims else 1):
        kept = _kept(None if mask is None else mask[r0:r1], scores[r0:r1])
        ranked = scores[r0:r1].to(device="cpu", dtype=torch.float64).masked_fill(~kept, float("-inf"))
        grouped = group_input_last(ranked)
        shape = grouped.shape
        groups = grouped.reshape(-1, m)
        order = torch.sort(groups, dim=1, stable=True).indices
        block = torch.ones_like(groups, dtype=torch.bool)
        block.scatter_(1, order[:, : m - n], False)
        keep[r0:r1] = _restore_input_dim(block.view(shape), dims) & kept
    return keep


# ---------------------------------------------------------------------------------------------
# Block granularity: R x 1 blocks (R consecutive output rows, one input position) kept or pruned
# whole. The selection routines above run unchanged on the block level: scores pooled per block
# (mean, so that a threshold stays in units of one weight's score), masks pooled (a block counts as
# kept only when all of it is), and the chosen block mask expanded back to the weight's shape.


def _pool(tensor: torch.Tensor, rows: int, reduce) -> torch.Tensor:
    """``[N, ...]`` as ``[N // rows, ...]``, reduced over each block's rows."""
    shape = tensor.shape
    return reduce(tensor.reshape(shape[0] // rows, rows, shape[1:].numel()), 1).reshape(shape[0] // rows, *shape[1:])


def block_scores(scores, rows: int):
    """``[N, ...]`` scores as ``[N // rows, ...]`` block means; `RowScores` stay lazy (block rows
    made from their weight rows when asked), so a block ranking still never holds a layer-sized
    score tensor."""
    if isinstance(scores, RowScores):
        shape = torch.Size((scores.shape[0] // rows, *scores.shape[1:]))
        return RowScores(shape, scores.dtype,
                         lambda start, stop: _pool(scores[start * rows:stop * rows], rows, torch.mean))
    return _pool(scores.detach(), rows, torch.mean)


def block_kept(mask: Optional[torch.Tensor], rows: int) -> Optional[torch.Tensor]:
    """A weight mask pooled to blocks: kept only where every entry of the block is kept."""
    return None if mask is None else _pool(mask, rows, torch.all)


def expand_blocks(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """A block mask ``[N // rows, ...]`` as the weight mask ``[N, ...]``."""
    return mask.repeat_interleave(rows, dim=0)


def by_blocks(select: Callable, scores: Dict, current: Dict, rows: int) -> Dict[str, torch.Tensor]:
    """``select(scores, current)`` (dicts by layer name, returning masks by name) run on R x 1
    blocks: scores and current masks pooled, the chosen block masks expanded back."""
    masks = select({k: block_scores(v, rows) for k, v in scores.items()},
                   {k: block_kept(current[k], rows) for k in scores})
    return {k: expand_blocks(mask, rows) for k, mask in masks.items()}

