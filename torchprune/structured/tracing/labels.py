"""Channel labels: the bookkeeping behind dependency tracing.

Every prunable position of every tensor gets an integer *id*. A layer that creates features (a
conv's output channels, a Linear's outputs, an Embedding's columns, a bare parameter) draws fresh
ids; every other op moves ids around with the data (a transpose moves them, a flatten repeats a
channel's id over its H*W features, a concatenation lays them side by side) and *unifies* ids that
must be removed together (the two operands of a residual add, the input channels of the next
layer). The label of a value is an int64 tensor broadcastable to the value (size 1 along dims
where every position has the same id), with -1 where nothing can be removed (model inputs).

When the trace ends, the connected components of the unification graph are the *units*: sets of
positions that are removed together. Three kinds of evidence are collected on the way:

* ``freeze``: ids that must never be removed (they reach the model output, an unknown op, ...);
* ``check(label, dim)``: "``dim`` of this value must keep its size" (a reshape with a constant, a
  size read, a softmax): a unit whose positions vary along that dim is frozen at the end, once
  every unification is known;
* ``inexact``: ids whose removal is correct in shape but not equal to zeroing them (a LayerNorm
  normalizes over them).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["Labels", "NONE"]

#: The label of a position that no unit owns.
NONE = -1


class Labels:
    """Allocates ids, records unifications, freezes and checks, and resolves units at the end."""

    def __init__(self):
        self.count = 0
        self._edges: List[Tuple[np.ndarray, np.ndarray]] = []
        self._frozen: List[Tuple[torch.Tensor, str]] = []
        self._checks: List[Tuple[torch.Tensor, int, str]] = []
        self._inexact: List[Tuple[torch.Tensor, str]] = []
        self.component: Optional[np.ndarray] = None

    # -- while tracing ------------------------------------------------------------------------

    def fresh(self, shape: Sequence[int]) -> torch.Tensor:
        """New ids, one per position of ``shape``."""
        n = math.prod(shape)
        # (a 0-dim parameter: shape ())
        ids = torch.arange(self.count, self.count + n, dtype=torch.int64).view(tuple(shape))
        self.count += n
        return ids

    def unify(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Unifies the ids of ``a`` and ``b`` position by position (broadcasting); -1 is skipped."""
        if a is b:
            return
        # numpy: these are small int arrays, and numpy's per-call cost is a fraction of torch's
        self.unify_arrays(a.numpy(), b.numpy())

    def unify_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """`unify` of two numpy int arrays."""
        if a.shape != b.shape:
            a, b = np.broadcast_arrays(a, b)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if keep.any():
            self._edges.append((a[keep], b[keep]))

    @property
    def unified(self) -> int:
        """How many position pairs have been unified so far: the size of the graph `resolve`
        works on, which is what tracing costs grow with (one pair per channel for a residual add,
        not one per token and channel)."""
        return sum(len(a) for a, _ in self._edges)

    # (numpy for the small bookkeeping arrays: a few µs less per call than torch's ops)

    def freeze(self, label: torch.Tensor, reason: str) -> None:
        ids = label.numpy()
        ids = ids[ids >= 0]
        if ids.size:
            self._frozen.append((ids, reason))

    def check(self, label: torch.Tensor, dim: int, reason: str) -> None:
        """``dim`` of the value labelled ``label`` must keep its size after pruning."""
        dim = dim % max(label.dim(), 1)
        if label.dim() and label.shape[dim] > 1 and (label.numpy() >= 0).any():
            self._checks.append((label, dim, reason))

    def inexact(self, label: torch.Tensor, reason: str) -> None:
        ids = label.numpy()
        ids = ids[ids >= 0]
        if ids.size:
            self._inexact.append((ids, reason))

    def reduce_to_dim(self, label: torch.Tensor, dim: int, shape: Sequence[int], reason: str) -> torch.Tensor:
        """The ids of each index along ``dim`` of a value of ``shape``, as one vector.

        A layer consumes a whole slice per channel, so all ids of a slice are unified; a slice
        that mixes ids and unowned positions cannot be removed, so its ids are frozen.
        """
        dim = dim % len(shape)
        if label.dim() == len(shape) and label.numel() == label.shape[dim]:
            # one id per index already (the usual channel vector): nothing to unify or freeze
            flat = label.reshape(-1)
            # (labels are never changed in place: a view is enough when it has every index)
            return flat if flat.shape[0] == shape[dim] else flat.expand(shape[dim]).clone()
        # broadcast only along `dim`: the other dims stay as small as the label keeps them
        target = [label.shape[d] if d != dim else shape[d] for d in range(len(shape))]
        full = label.expand(*target).movedim(dim, 0).reshape(shape[dim], -1)
        rep = full.max(dim=1).values
        self.unify(full, rep[:, None])
        mixed = (full < 0).any(dim=1) & (rep >= 0)
        if mixed.any():
            self.freeze(rep[mixed], reason)
        return rep

    # -- after tracing ------------------------------------------------------------------------

    def resolve(self) -> None:
        """Computes the units (connected components) and applies the recorded checks."""
        n = self.count
        if self._edges:
            rows = np.concatenate([a for a, _ in self._edges]).astype(np.int64, copy=False)
            cols = np.concatenate([b for _, b in self._edges]).astype(np.int64, copy=False)
        else:
            rows = cols = np.zeros(0, dtype=np.int64)
        self.component = _components(n, rows, cols)
        frozen = [(self.component[ids], reason) for ids, reason in self._frozen]
        for label, dim, reason in self._checks:
            comp = self.components_of(label).numpy()
            moved = np.moveaxis(comp, dim, -1)
            varies = moved.min(-1) != moved.max(-1)
            if varies.any():
                bad = moved[varies]
                frozen.append((bad[bad >= 0], reason))
        self.frozen_reasons: Dict[int, List[str]] = _reasons_by_component(frozen)
        self.inexact_reasons: Dict[int, List[str]] = _reasons_by_component(
            [(self.component[ids], reason) for ids, reason in self._inexact])

    def freeze_components(self, components, reason: str) -> None:
        """Freezes the units ``components`` (after `resolve`), with ``reason``."""
        for c in components:
            reasons = self.frozen_reasons.setdefault(int(c), [])
            if reason not in reasons:
                reasons.append(reason)

    def components_of(self, label: torch.Tensor) -> torch.Tensor:
        """The unit of each position of ``label`` (-1 where unowned)."""
        ids = label.numpy()
        return torch.from_numpy(np.where(ids >= 0, self.component[np.maximum(ids, 0)], NONE))


def _reasons_by_component(entries: List[Tuple[np.ndarray, str]]) -> Dict[int, List[str]]:
    """{component: its reasons, each once, in the order of ``entries``} from (components, reason)
    pairs. Vectorized: a ViT freezes thousands of components per reason, and a Python loop over
    each component of each entry cost a quarter of a second."""
    entries = [(comps, reason) for comps, reason in entries if comps.size]
    if not entries:
        return {}
    names = list(dict.fromkeys(reason for _, reason in entries))
    number = {reason: i for i, reason in enumerate(names)}
    comps = np.concatenate([c.reshape(-1) for c, _ in entries]).astype(np.int64, copy=False)
    which = np.repeat(np.array([number[r] for _, r in entries], dtype=np.int64), [c.size for c, _ in entries])
    _, first = np.unique(comps * len(names) + which, return_index=True)  # each (component, reason) once
    first.sort()  # back in the order of the entries
    out: Dict[int, List[str]] = {}
    for c, r in zip(comps[first].tolist(), which[first].tolist()):
        out.setdefault(c, []).append(names[r])
    return out


def _components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The connected component of each of ``n`` ids under the edges ``rows[i] -- cols[i]``, as the
    smallest id of the component. Small graphs (every model's but the largest): min-label
    propagation with pointer jumping in numpy, a few rounds of a few array ops, several times
    cheaper than building a scipy sparse matrix; large ones (or slow convergence): scipy."""
    parent = np.arange(n, dtype=np.int64)
    if not len(rows):
        return parent
    if n <= 20000:
        for _ in range(64):
            a, b = parent[rows], parent[cols]
            if (a == b).all():
                return parent
            low = np.minimum(a, b)
            np.minimum.at(parent, a, low)
            np.minimum.at(parent, b, low)
            while True:  # pointer jumping: every id points at its root
                up = parent[parent]
                if (up == parent).all():
                    break
                parent = up
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def compress(label: torch.Tensor) -> torch.Tensor:
    """``label`` with every dim along which all ids are equal reduced to size 1."""
    ids = label.numpy()  # numpy: a few small reductions, several times cheaper per call than torch's
    for d in range(ids.ndim):
        if ids.shape[d] > 1:
            first = ids[(slice(None),) * d + (slice(0, 1),)]
            if (ids == first).all():  # every slice along d equals the first (two numpy calls, not four)
                ids = first
    return torch.from_numpy(np.ascontiguousarray(ids))
