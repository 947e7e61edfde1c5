"""What ``exclude`` and ``freeze`` keep in structural pruning: channel groups, heads and blocks.

``exclude`` keeps an excluded layer's *own* channels: those it makes (a Linear's or conv's output
features, its weight rows and bias) or scales (a BatchNorm's or LayerNorm's entries). The
channels it reads still go with the layer that makes them, and the excluded layer loses the
matching slices of its weight (a Linear's columns, a conv's input channels, a transposed conv's
weight dim 0: the ``inputs`` of its entry in the layer-type table). So ``exclude=["fc"]`` keeps a
classifier's class count while the penultimate layer's channels, and fc's columns with them, can
still be pruned (Torch-Pruning's ``ignored_layers``). A channel group is kept whole when an
excluded module is a member of it in any other role.

``freeze`` leaves a module completely unchanged: every group it is a member of, in any role, is
kept whole (what ``exclude`` did before: a frozen classifier keeps its penultimate layer too).

The same rule for heads: a head's members are its q/k/v rows (outputs of the q/k/v projection) and
the out-projection's columns reading it (inputs). So excluding an attention module or its q/k/v
projection (``qkv``) keeps its heads; excluding only its out-projection (``proj``, ``out_proj``)
keeps that Linear's outputs, the model width, but its heads may still go. Freezing any of them
keeps the heads. With granularity "layer", a block that is excluded, or that holds a frozen
module, stays.

Names, modules and module types are accepted as in ``exclude``, and stand for their subtrees.

>>> tp.prune(model, 0.5, granularity="channel", example_inputs=x, exclude=["fc"])  # classes kept
>>> tp.prune(model, 0.5, granularity="channel", example_inputs=x, freeze=["fc"])   # fc's inputs too
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Dict, Iterable

from torch import nn

from ..layer_types import is_input_member
from ..targets import excluded_ids
from .tracing.recorder import Member

__all__ = ["Exclusion", "exclusion"]


@dataclass(frozen=True)
class Exclusion:
    """The ids of the modules ``exclude`` and ``freeze`` name (with their subtrees)."""

    excluded: AbstractSet[int] = frozenset()
    frozen: AbstractSet[int] = frozenset()

    def keeps(self, members: Iterable[Member], modules: Dict[str, nn.Module]) -> bool:
        """True if a unit with these ``(module name, tensor, dim)`` members stays: a frozen module
        is one of them, or an excluded module in a role other than the channels its layer reads."""
        if not self.excluded and not self.frozen:
            return False
        for name, tensor, dim in members:
            module = modules.get(name)
            if module is None:
                continue
            if id(module) in self.frozen:
                return True
            if id(module) in self.excluded and not is_input_member(module, tensor, dim):
                return True
        return False

    def keeps_block(self, block: nn.Module) -> bool:
        """True if a residual block stays (granularity "layer"): it is excluded, or holds a frozen module."""
        return id(block) in self.excluded or any(id(m) in self.frozen for m in block.modules())


def exclusion(model: nn.Module, exclude=(), freeze=()) -> Exclusion:
    """The modules of ``model`` that ``exclude`` and ``freeze`` name; a bad name raises, naming the argument."""
    return Exclusion(frozenset(excluded_ids(model, exclude)), frozenset(excluded_ids(model, freeze, "freeze")))
