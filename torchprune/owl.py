"""OWL: per-layer sparsities from where a pretrained model keeps its outlier activations.

Outlier Weighed Layerwise sparsity (Yin et al. 2023) observes that the layers of a large pretrained
model differ in how many weights carry outsized Wanda scores |W_ij| * ||X_j||, and that those
weights matter most. Each layer's outlier ratio D_l is the share of its scores above ``m`` times
its mean score. Layers with more outliers get a lower sparsity: D is scaled to [0, 2 * ``lam``]
and the sparsity of layer l is ``target - (D_l - mean D)``.

As in the paper's code, all target layers of one repeated block (a transformer layer, see
`sequential.find_blocks`) share one ratio, computed over all their scores together; a layer
outside the blocks is a group of its own. One difference, on purpose: the mean is weighted by
each group's number of weights and the sparsities are kept within [0, ``max_sparsity``], so the
model's overall sparsity is exactly ``target`` even when groups differ in size or a sparsity
would leave the allowed range (the paper's plain mean keeps it only for groups of equal size).

>>> plan = owl_sparsities(model, layers, 0.7, data)     # {layer name: sparsity}
>>> tp.prune(model, scope=plan, importance="wanda", data=data)
"""

from __future__ import annotations

import numbers
from typing import Dict, Iterable, List

import torch
from torch import nn

from .calibration import observe_activations
from .importance import Wanda
from .sequential import find_blocks

__all__ = ["owl_sparsities", "check_owl_arguments", "MAX_SPARSITY"]

#: The highest sparsity OWL gives a layer (a layer always keeps some weights).
MAX_SPARSITY = 0.99


def check_owl_arguments(m, lam) -> None:
    """``m`` (the outlier factor) is a real number > 1 and ``lam`` (the spread) one in [0, 0.5)."""
    for value, name, low, high in ((m, "m", 1.0, float("inf")), (lam, "lam", 0.0, 0.5)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    if not float(m) > 1.0 or float(m) == float("inf"):
        raise ValueError(f"`m` (outliers are scores above m times the mean) must be a finite number > 1, got {m}")
    if not 0.0 <= float(lam) < 0.5:
        raise ValueError(f"`lam` (sparsities spread over target +- lam) must be in [0, 0.5), got {lam}")


def _groups(model: nn.Module, layers: Dict[str, nn.Module], blocks) -> List[List[str]]:
    """The layers sharing one ratio: those inside one block together, every other layer alone."""
    found = find_blocks(model, blocks)
    grouped: Dict[int, List[str]] = {}
    alone: List[List[str]] = []
    for name, layer in layers.items():
        home = next((i for i, (_, block) in enumerate(found) if any(m is layer for m in block.modules())), None)
        if home is None:
            alone.append([name])
        else:
            grouped.setdefault(home, []).append(name)
    return [grouped[i] for i in sorted(grouped)] + alone


def _outlier_ratio(scores: List[torch.Tensor], m: float) -> float:
    """The share of the scores above ``m`` times their mean."""
    flat = torch.cat([s.detach().reshape(-1).double() for s in scores])
    if flat.numel() == 0:
        return 0.0
    return float((flat > m * flat.mean()).double().mean())


def _shifted(spread: torch.Tensor, sizes: torch.Tensor, target: float) -> torch.Tensor:
    """Sparsities ``clamp(target - spread + c, 0, MAX_SPARSITY)`` with the shift c found by bisection
    so that their mean weighted by ``sizes`` is ``target`` (the weighted mean grows with c)."""
    def sparsities(c: float) -> torch.Tensor:
        return (target - spread + c).clamp(0.0, MAX_SPARSITY)

    def mean(c: float) -> float:
        return float((sparsities(c) * sizes).sum() / sizes.sum())

    low, high = -1.0 - float(spread.abs().max()), 1.0 + float(spread.abs().max())
    for _ in range(200):  # float64 bisection to well below 1e-12
        middle = (low + high) / 2
        if mean(middle) < target:
            low = middle
        else:
            high = middle
    return sparsities((low + high) / 2)


def owl_sparsities(model: nn.Module, layers: Dict[str, nn.Module], target: float, data: Iterable,
                   m: float = 5.0, lam: float = 0.08, blocks=None) -> Dict[str, float]:
    """Each layer's sparsity by OWL, from Wanda scores on ``data``; the weighted mean is ``target``.

    ``layers`` are the target layers by name (already checked); ``m`` and ``lam`` are the paper's M
    (default 5) and lambda (default 0.08); ``blocks`` as in `sequential.find_blocks`. Nothing in the
    model changes (one observation-only pass over ``data``)."""
    check_owl_arguments(m, lam)
    criterion = Wanda()
    observe_activations(model, layers, criterion, data)
    groups = _groups(model, layers, blocks)
    ratios = torch.tensor([_outlier_ratio([criterion.score(layers[n]) for n in group], float(m))
                           for group in groups], dtype=torch.float64)
    criterion.reset()
    width = float(ratios.max() - ratios.min()) if ratios.numel() else 0.0
    scaled = (ratios - ratios.min()) * (2 * float(lam) / width) if width > 0 else torch.zeros_like(ratios)
    sizes = torch.tensor([sum(layers[n].weight.numel() for n in group) for group in groups], dtype=torch.float64)
    spread = scaled - (scaled * sizes).sum() / sizes.sum()
    values = _shifted(spread, sizes, float(target))
    return {name: float(value) for group, value in zip(groups, values) for name in group}
