"""The structural branch of `tp.prune`: checks what only applies to structural pruning, then hands
the model to the granularity's module: "channel" (channels.py), "head" (heads.py) or "layer"
(stacks.py for transformer layers in a ModuleList, else blocks.py). ``exclude`` and ``freeze`` mean
what exclusion.py says."""

from __future__ import annotations

from torch import nn

from .blocks import prune_layers
from .channels import prune_channels
from .exclusion import exclusion
from .heads import prune_heads
from .stacks import layer_stacks, prune_stack_layers

__all__ = ["prune_structural"]


def prune_structural(model: nn.Module, sparsity, threshold, importance, granularity: str, scope: str, exclude,
                     example_inputs, data, loss_fn, round_to=None, freeze=()) -> nn.Module:
    """The structural branch of `tp.prune` (granularity "channel", "head" or "layer"); returns ``model``."""
    if round_to is not None and granularity != "channel":
        raise ValueError("`round_to` only applies to granularity='channel' (channels kept per group), "
                         f"got granularity={granularity!r}")
    if threshold is not None:
        raise ValueError(f"`threshold` is not supported with granularity={granularity!r}: "
                         "pass `sparsity` (a fraction of channels)")
    if sparsity is None:
        raise ValueError(f"`sparsity` must be given with granularity={granularity!r} (a fraction in [0, 1))")
    kept = exclusion(model, exclude, freeze)
    if granularity == "channel":
        return prune_channels(model, example_inputs, sparsity, importance, scope, kept, round_to, data, loss_fn)
    if granularity == "head":
        return prune_heads(model, example_inputs, sparsity, importance, scope, kept)
    stacks, influence = layer_stacks(model, example_inputs, data)  # transformer layers in a ModuleList (stacks.py)
    if stacks:
        return prune_stack_layers(model, stacks, influence, float(sparsity), kept)
    return prune_layers(model, example_inputs, float(sparsity), kept, data)
