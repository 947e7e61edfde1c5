"""Choosing which units go: the one "lowest scores first, at least one kept per group" selection
that channels (channels.py, the channel Pruner) and attention heads (heads.py) share.

``sparsity`` is the fraction of units removed:

* ``scope="layer"``: each group of n units keeps floor((1 - sparsity) * n), at least one, so at
  least the asked fraction goes (Torch-Pruning counts alike); 8 heads at sparsity 0.3 keep 5;
* ``scope="global"``: round(sparsity * total) units (halves up) go over all groups together,
  lowest scores first, skipping a unit that would leave its group empty; scores must be
  comparable across groups (scoring.py normalizes each member's scores by their mean).

With ``round_to=k`` the count a group keeps is then rounded to the nearest multiple of k (halves
up), and is at least k; a group that would round to its full size or beyond (or has fewer than k
units) keeps all of them. Ties are broken by index (stable sorts), so a selection is reproducible.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Sized

import numpy as np
import torch

__all__ = ["select", "kept_counts", "rounded_keep"]


def rounded_keep(keep: int, size: int, round_to: int) -> int:
    """``keep`` rounded to the nearest multiple of ``round_to`` (halves up), at least one multiple
    and at most ``size`` (a group smaller than ``round_to`` keeps all its units)."""
    keep = max(keep, 1)
    if round_to > 1:
        keep = min(size, round_to * max(1, math.floor(keep / round_to + 0.5)))
    return keep


def kept_counts(groups: Sequence[Sized], scores: List[torch.Tensor], sparsity: float, scope: str,
                round_to: int = 1) -> List[int]:
    """How many units each group keeps (``len(group)`` units, ``scores[i]`` one score per unit)."""
    if scope == "layer":
        # keep floor((1 - sparsity) * n): at least the asked fraction goes
        return [rounded_keep(int(math.floor((1 - sparsity) * len(g) + 1e-9)), len(g), round_to) for g in groups]
    total = sum(len(g) for g in groups)
    target = int(math.floor(sparsity * total + 0.5))
    flat = torch.cat(list(scores))
    owner = torch.cat([torch.full((len(g),), i) for i, g in enumerate(groups)])
    order = torch.sort(flat, stable=True).indices
    keeps = [len(g) for g in groups]
    pruned = 0
    for u in order.tolist():
        if pruned >= target:
            break
        g = int(owner[u])
        if keeps[g] > 1:
            keeps[g] -= 1
            pruned += 1
    return [rounded_keep(k, len(g), round_to) for k, g in zip(keeps, groups)]


def select(groups: Sequence[Sized], scores: List[torch.Tensor], sparsity: float, scope: str,
           round_to: int = 1) -> List[torch.Tensor]:
    """The indices of the units removed from each group (lowest scores first, stable ties), sorted.

    >>> select([group_a, group_b], [scores_a, scores_b], 0.5, "global")   # [tensor([0, 3]), tensor([1])]
    """
    out = []
    for k, g, s in zip(kept_counts(groups, scores, sparsity, scope, round_to), groups, scores):
        order = np.argsort(s.numpy(), kind="stable")  # numpy: a few µs less per group than torch.sort
        out.append(torch.from_numpy(np.sort(order[: len(g) - k])))
    return out
