"""prune(..., granularity="channel"): rank the channels of every coupled group and remove the
least important ones physically.

``sparsity`` is the fraction of channels (units) removed: in each group with ``scope="layer"``
(it keeps floor((1 - sparsity) * channels), so at least that fraction goes),
over all groups together with ``scope="global"`` (scores are comparable across groups because
each member's scores are normalized by their mean, see scoring.py). Every group keeps at least
one channel. With ``round_to=k`` (``tp.prune(..., round_to=8)``) the count a group keeps is
rounded to the nearest multiple of k, halves up, and is at least k (select.py has the rules).
Groups that the graph marks unprunable are left alone, and so are those that ``exclude`` or
``freeze`` keep (exclusion.py: an excluded layer keeps the channels it makes, while those it reads
may go with their producer; a frozen one keeps every group it is in).

The removal is recorded on the model as a plan step (plan.py) so that `tp.save` can store it and
`tp.load` replay it on a fresh instance.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import nn

from ..importance import resolve
from ..importance.base import Requires, check_channel_form
from ..targets import check_data_args, check_scope
from .exclusion import Exclusion
from .graph import DependencyGraph
from .head_dims import shrink_head_dims
from .heads import projection_names
from .hf_config import sync_config
from .plan import apply_plan, channel_step, plan_from_removed, record_step
from .scoring import group_scores
from .select import select
from .tracing.recorder import Member

__all__ = ["prune_channels", "choose_removal", "check_round_to", "warn_unprunable"]


def check_round_to(round_to) -> int:
    """``round_to`` as an int >= 1 (None means 1: no rounding)."""
    if round_to is None:
        return 1
    if isinstance(round_to, bool) or not isinstance(round_to, numbers.Integral):
        raise TypeError("`round_to` must be a positive int (channels kept per group are a multiple of it), "
                        f"got {type(round_to).__name__}")
    if round_to < 1:
        raise ValueError("`round_to` must be a positive int (channels kept per group are a multiple of it), "
                         f"got {round_to!r}")
    return int(round_to)


def prune_channels(model: nn.Module, example_inputs, sparsity: float, importance="l2", scope="layer",
                   kept: Exclusion = Exclusion(), round_to: int = 1, data=None, loss_fn=None) -> nn.Module:
    """Removes ``sparsity`` of the channels of every prunable group of ``model`` that ``kept`` (what
    ``exclude`` and ``freeze`` name) does not keep; returns it.

    >>> tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=(torch.randn(1, 3, 32, 32),))
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= float(sparsity) < 1:
        raise ValueError(f"`sparsity` must be a number in [0, 1) for structural pruning, got {sparsity!r}")
    check_scope(scope, allow_dict=False, context="structural pruning")
    round_to = check_round_to(round_to)
    criterion = resolve(importance)
    check_channel_form(criterion)
    if criterion.requires is not Requires.WEIGHTS:
        check_data_args(data, loss_fn, importance, requires_loss=criterion.requires is Requires.LOSS)
    graph = DependencyGraph(model, example_inputs)
    removed = choose_removal(model, graph, float(sparsity), criterion, scope, kept, round_to, data, loss_fn)
    if removed:
        modules = graph.modules
        plan = plan_from_removed(model, removed, modules, arrays=True)
        apply_plan(model, plan, modules)
        record_step(model, channel_step(plan))
    # hand-written attention keeps its traced q/k/v width; its head size shrinks instead (head_dims.py)
    shrunk = shrink_head_dims(model, example_inputs, float(sparsity), float(getattr(criterion, "p", 2)), kept,
                              round_to)
    warn_unprunable(graph, kept, handled=shrunk)
    if removed:
        sync_config(model, warn=True)  # apply_plan rewrote a Hugging Face config; say what it cannot hold
    return model


#: Why a group stays that needs no warning: the model's output width is its interface.
_EXPECTED = ("reaches the model output",)


def warn_unprunable(graph: DependencyGraph, kept: Exclusion = Exclusion(), stacklevel: int = 5,
                    handled: Sequence[str] = ()) -> None:
    """One warning naming the layers whose channels the graph keeps, with why, e.g. "kept conv2, fc:
    view with a fixed size for a pruned dim at ...". Groups that ``exclude`` or ``freeze`` keep
    anyway are not named (the user asked for them), nor are channels that reach the model output
    (the output width is the model's interface), nor the attention modules in ``handled`` (and
    their ``qkv`` and ``proj``), whose head size shrank instead."""
    modules = graph.modules
    unprunable: Dict[str, List[str]] = {}
    shrunk = set(handled) | {f"{name}.{part}" if name else part for name in handled
                             for part in projection_names(modules[name])}
    for group in graph.groups:
        if group.prunable or kept.keeps(group.indices, modules):
            continue
        for name in group.modules:
            if name in shrunk:
                continue
            reasons = unprunable.setdefault(name, [])
            reasons += [r for r in group.reasons if r not in reasons and r not in _EXPECTED]
    by_reasons: Dict[tuple, List[str]] = {}
    for name, reasons in unprunable.items():
        if reasons:
            by_reasons.setdefault(tuple(reasons), []).append(name or "(the model itself)")
    if by_reasons:
        kept_text = "".join(f"\n  kept {', '.join(names)}: {'; '.join(reasons)}"
                            for reasons, names in by_reasons.items())
        warnings.warn("structural pruning left some channels of these layers in place (removing them is not safe):"
                      f"{kept_text}", UserWarning, stacklevel=stacklevel)


def choose_removal(model, graph: DependencyGraph, sparsity: float, criterion, scope="layer",
                   kept: Exclusion = Exclusion(), round_to: int = 1, data=None, loss_fn=None,
                   only_exact: bool = False) -> Dict[Member, torch.Tensor]:
    """The indices to remove from each member tensor (nothing is changed yet); groups that ``kept``
    keeps (exclusion.py) are left out."""
    modules = graph.modules if graph.model is model else dict(model.named_modules())
    groups = [g for g in graph.prunable_groups
              if (g.exact or not only_exact) and not kept.keeps(g.indices, modules)]
    if not groups:
        return {}
    scores = group_scores(model, groups, criterion, data, loss_fn, modules=modules)
    removed: Dict[Member, list] = {}
    for group, units in zip(groups, select(groups, scores, sparsity, scope, round_to)):
        if units.numel():
            units = units.numpy()  # numpy: a few µs less per member than torch's indexing
            for member, indices in group.indices.items():
                part = indices.numpy()[units].reshape(-1)
                parts = removed.get(member)
                if parts is None:
                    removed[member] = [part]
                else:
                    parts.append(part)
    return {m: torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts)) for m, parts in removed.items()}
