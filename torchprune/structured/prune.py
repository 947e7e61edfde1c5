"""prune(..., granularity="channel"): rank the channels of every coupled group and remove the
least important ones physically.

``sparsity`` is the fraction of channels (units) removed: in each group with ``scope="layer"``
(it keeps floor((1 - sparsity) * channels), so at least that fraction goes),
over all groups together with ``scope="global"`` (scores are comparable across groups because
each member's scores are normalized by their mean, see scoring.py). Every group keeps at least
one channel. With ``round_to=k`` (``tp.prune(..., round_to=8)``) the count a group keeps is
rounded to the nearest multiple of k, halves up, and is at least k; a group that would round to
its full size or beyond (or has fewer than k channels) keeps all of them. Groups that touch an
excluded module, or that the graph marks unprunable, are left alone.

The removal plan is appended to ``model._torchprune_structure`` (plain data) so that `tp.save`
can store it and `tp.load` replay it on a fresh instance.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, List

import numpy as np
import torch
from torch import nn

from ..importance import resolve
from .graph import DependencyGraph, Group
from .remove import apply_plan, plan_from_removed
from .scoring import group_scores, needs
from .trace import Member

__all__ = ["prune_structural", "prune_channels", "choose_removal", "select", "PLAN_ATTRIBUTE"]

#: The attribute of a pruned model that holds its structural removal steps.
PLAN_ATTRIBUTE = "_torchprune_structure"


def check_round_to(round_to) -> int:
    """``round_to`` as an int >= 1 (None means 1: no rounding)."""
    if round_to is None:
        return 1
    if isinstance(round_to, bool) or not isinstance(round_to, numbers.Integral):
        raise TypeError(f"`round_to` must be a positive int (channels kept per group are a multiple of it), got {type(round_to).__name__}")
    if round_to < 1:
        raise ValueError(f"`round_to` must be a positive int (channels kept per group are a multiple of it), got {round_to!r}")
    return int(round_to)


def prune_channels(model: nn.Module, example_inputs, sparsity: float, importance="l2", scope="layer",
                   excluded_ids=frozenset(), round_to: int = 1, data=None, loss_fn=None) -> nn.Module:
    """Removes ``sparsity`` of the channels of every prunable group of ``model``; returns it.

    >>> tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=(torch.randn(1, 3, 32, 32),))
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= float(sparsity) < 1:
        raise ValueError(f"`sparsity` must be a number in [0, 1) for structural pruning, got {sparsity!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"`scope` must be 'layer' or 'global' for structural pruning, got {scope!r}")
    round_to = check_round_to(round_to)
    criterion = resolve(importance)
    need = needs(criterion)
    if need and data is None or need == "loss" and loss_fn is None:
        missing = "`data` and `loss_fn`" if need == "loss" else "`data`"
        raise ValueError(f"importance {importance!r} is data-driven: pass {missing}")
    graph = DependencyGraph(model, example_inputs)
    warn_unprunable(graph, excluded_ids)
    removed = choose_removal(model, graph, float(sparsity), criterion, scope, excluded_ids, round_to, data, loss_fn)
    if not removed:
        return model
    modules = graph.modules
    plan = plan_from_removed(model, removed, modules, arrays=True)
    apply_plan(model, plan, modules)
    steps = model.__dict__.setdefault(PLAN_ATTRIBUTE, [])
    steps.append({"kind": "channels", "keep": [[m, t, d, keep.tolist()] for (m, t, d), keep in plan.items()]})
    return model


#: Why a group stays that needs no warning: the model's output width is its interface.
_EXPECTED = ("reaches the model output",)


def warn_unprunable(graph: DependencyGraph, excluded_ids=frozenset(), stacklevel: int = 5) -> None:
    """One warning naming the layers in scope (not excluded) whose channels the graph keeps, with
    why, e.g. "kept conv2, fc: view with a fixed size for a pruned dim at ...". Channels that
    reach the model output are kept silently (the output width is the model's interface)."""
    unprunable = graph.unprunable
    if not unprunable:
        return
    modules = graph.modules
    by_reasons: Dict[tuple, List[str]] = {}
    for name, reasons in unprunable.items():
        module = modules.get(name)
        if module is not None and id(module) in excluded_ids:
            continue
        reasons = tuple(r for r in reasons if r not in _EXPECTED)
        if reasons:
            by_reasons.setdefault(reasons, []).append(name or "(the model itself)")
    if by_reasons:
        import warnings

        kept = "".join(f"\n  kept {', '.join(names)}: {'; '.join(reasons)}" for reasons, names in by_reasons.items())
        warnings.warn(f"structural pruning left some channels of these layers in place (removing them is not safe):{kept}",
                      UserWarning, stacklevel=stacklevel)


def choose_removal(model, graph: DependencyGraph, sparsity: float, criterion, scope="layer", excluded_ids=frozenset(),
                   round_to: int = 1, data=None, loss_fn=None, only_exact: bool = False) -> Dict[Member, torch.Tensor]:
    """The indices to remove from each member tensor (nothing is changed yet)."""
    modules = graph.modules if graph.model is model else dict(model.named_modules())
    groups = [
        g for g in graph.prunable_groups
        if not any(id(modules[m]) in excluded_ids for m in g.modules if m in modules) and (g.exact or not only_exact)
    ]
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


def prune_structural(model, sparsity, threshold, importance, granularity, scope, exclude, example_inputs, data, loss_fn, round_to=None):
    """The structural branch of `tp.prune`: checks what only applies here, then dispatches."""
    from ..pruner import _excluded_ids

    if round_to is not None and granularity != "channel":
        raise ValueError(f"`round_to` only applies to granularity='channel' (channels kept per group), got granularity={granularity!r}")
    if threshold is not None:
        raise ValueError(f"`threshold` is not supported with granularity={granularity!r}: pass `sparsity` (a fraction of channels)")
    if sparsity is None:
        raise ValueError(f"`sparsity` must be given with granularity={granularity!r} (a fraction in [0, 1))")
    excluded = _excluded_ids(model, exclude)
    if granularity == "channel":
        return prune_channels(model, example_inputs, sparsity, importance, scope, excluded, round_to, data, loss_fn)
    if granularity == "head":
        from .heads import prune_heads

        return prune_heads(model, example_inputs, sparsity, importance, scope, excluded)
    from .layers import prune_layers

    return prune_layers(model, example_inputs, float(sparsity), excluded, data)


def _rounded_keep(keep: int, size: int, round_to: int) -> int:
    """``keep`` rounded to the nearest multiple of ``round_to`` (halves up), at least one multiple
    and at most ``size`` (a group smaller than ``round_to`` keeps all its channels)."""
    keep = max(keep, 1)
    if round_to > 1:
        keep = min(size, round_to * max(1, math.floor(keep / round_to + 0.5)))
    return keep


def select(groups: List[Group], scores: List[torch.Tensor], sparsity: float, scope: str, round_to: int) -> List[torch.Tensor]:
    """The indices of the units removed from each group (lowest scores first, stable ties)."""
    if scope == "layer":
        # keep floor((1 - sparsity) * n): at least the asked fraction goes (Torch-Pruning counts alike)
        keeps = [_rounded_keep(int(math.floor((1 - sparsity) * len(g) + 1e-9)), len(g), round_to) for g in groups]
    else:
        total = sum(len(g) for g in groups)
        target = int(math.floor(sparsity * total + 0.5))
        flat = torch.cat(scores)
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
        keeps = [_rounded_keep(k, len(g), round_to) for k, g in zip(keeps, groups)]
    out = []
    for k, g, s in zip(keeps, groups, scores):
        order = np.argsort(s.numpy(), kind="stable")  # numpy: a few µs less per group than torch.sort
        out.append(torch.from_numpy(np.sort(order[: len(g) - k])))
    return out
