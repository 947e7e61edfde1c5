"""Sparsity-inducing penalties to add to the training loss before pruning.

Each returns a scalar tensor that is differentiable in the weights, so ``loss + lam * penalty``
drives weights (``l1``), whole output rows (``group_lasso``) or BatchNorm scales (``bn_l1``,
network slimming) towards zero, and magnitude / filter-norm / BN-scale pruning then removes them
at a smaller cost. Layers are chosen as in `prune()`: every Linear/Conv1d/Conv2d unless excluded.

>>> loss = F.cross_entropy(model(x), y) + 1e-4 * tp.regularize.l1(model)
>>> loss = loss + 1e-4 * tp.regularize.bn_l1(model)      # then prune with importance="bn_scale"
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .layer_types import BATCH_NORMS
from .masking import get_mask
from .targets import target_layers as _target_layers

__all__ = ["l1", "group_lasso", "bn_l1"]



def _weights(model: nn.Module, exclude: Iterable):
    """The weights of the prunable layers (each tied weight once), masked where a mask exists."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    layers, _ = _target_layers(model, exclude, "layer")
    seen = set()
    for layer in layers.values():
        if id(layer.weight) in seen:
            continue
        seen.add(id(layer.weight))
        mask = get_mask(layer)
        yield layer.weight if mask is None else layer.weight * mask


def l1(model: nn.Module, exclude: Iterable = ()) -> torch.Tensor:
    """Sum of |w| over the prunable layers' weights (pruned weights contribute nothing)."""
    return sum(w.abs().sum() for w in _weights(model, exclude))


def group_lasso(model: nn.Module, exclude: Iterable = ()) -> torch.Tensor:
    """Sum over output neurons / filters of the L2 norm of their weights (Wen et al. 2016):
    whole rows go to zero together, which filter-norm or channel pruning then removes."""
    return sum(w.flatten(1).norm(p=2, dim=1).sum() for w in _weights(model, exclude))


def bn_l1(model: nn.Module) -> torch.Tensor:
    """Sum of |gamma| over all affine BatchNorm layers (Liu et al. 2017, network slimming)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    terms = [m.weight.abs().sum() for m in model.modules() if isinstance(m, BATCH_NORMS) and m.weight is not None]
    if not terms:
        raise ValueError("`model` has no affine BatchNorm layer for bn_l1")
    return sum(terms)
