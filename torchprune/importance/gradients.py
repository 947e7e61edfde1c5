"""Criteria summed over backward passes of a loss: `Gradient` (|dL/dw|) and `Taylor` (|w * dL/dw|).

`torchprune.calibration` runs the passes: at weight level it calls ``observe(module)`` after each
backward; at channel level it sums ``gradient_term(tensor, grad)`` in float64 for every parameter
of the groups and hands the sums to ``channel_scores``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..masking import effective_weight
from .base import ChannelTensor, Importance, score_precision

__all__ = ["Gradient", "Taylor"]


class _Accumulated(Importance):
    """A criterion summed over backward passes; `observe()` after each backward, `reset()` to clear."""

    requires_data = True
    requires_loss = True
    #: Whether `gradient_term` reads the weight (else it is given None and no copy is made).
    reads_weight = True

    def __init__(self):
        self._sums: Dict[int, torch.Tensor] = {}

    def gradient_term(self, weight: Optional[torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
        """This backward pass's term for a tensor ``weight`` with gradient ``grad`` (half precision in float32)."""
        raise NotImplementedError

    def observe(self, module: nn.Module) -> None:
        """Adds this backward pass's term for ``module`` (skipped if it has no gradient)."""
        if module.weight.grad is None:
            return
        weight = effective_weight(module) if self.reads_weight else None
        term = self.gradient_term(weight, module.weight.grad).detach()
        key = id(module)
        self._sums[key] = term.clone() if key not in self._sums else self._sums[key].add_(term)

    def channel_scores(self, member: ChannelTensor) -> Optional[Dict[int, torch.Tensor]]:
        """The summed terms over each channel's slice, for weights of 2 or more dims."""
        sums = member.gathered
        if sums is None or not member.weight:
            return None
        return {dim: sums.movedim(dim, 0).reshape(sums.shape[dim], -1).sum(1) for dim in member.dims}

    def reset(self) -> None:
        self._sums.clear()

    def observed(self, module: nn.Module) -> bool:
        return id(module) in self._sums

    def state_dict(self, layers: Dict[str, nn.Module]) -> Dict[str, object]:
        return {name: self._sums[id(m)].clone() for name, m in layers.items() if id(m) in self._sums}

    def load_state_dict(self, state: Dict[str, object], layers: Dict[str, nn.Module]) -> None:
        self._sums = {id(layers[name]): value.clone() for name, value in state.items()}

    def score(self, module: nn.Module) -> torch.Tensor:
        total = self._sums.get(id(module))
        if total is None:
            raise RuntimeError(
                f"{type(self).__name__} has no gradient statistics for this {type(module).__name__}; "
                "pass `data` and `loss_fn` to prune() (or call observe() after backward passes)"
            )
        return total


class Gradient(_Accumulated):
    """Sum over batches of |dL/dw|: how strongly the loss reacts to each weight."""

    reads_weight = False

    def gradient_term(self, weight: Optional[torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
        return score_precision(grad).abs()


class Taylor(_Accumulated):
    """Sum over batches of |w * dL/dw|: the first-order Taylor estimate of the loss change when the
    weight is removed (Molchanov et al. 2017/2019), taken per weight and per batch."""

    def gradient_term(self, weight: Optional[torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
        return (score_precision(weight) * score_precision(grad)).abs_()
