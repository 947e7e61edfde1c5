"""The Pruner's channel strategy: whole coupled channels pruned while training.

``tp.Pruner(model, 0.5, schedule, granularity="channel", example_inputs=x)`` returns a
`ChannelPruner` (pruner.py), whose lifecycle (steps, schedule, state header, finalize guard) is the
Pruner's and whose updates are the `ChannelStrategy` here. At construction it traces the model once
(`tp.DependencyGraph`) and takes its prunable channel groups (a conv's filters together with the
next BN's entries and the next layer's input channels, a whole residual stream, ...). During
training nothing changes shape: at each of the schedule's updates the groups are ranked with the
structured group importance (`torchprune.structured.scoring`) and the chosen channels are
*zeroed* in every member tensor of their group, the same slices physical removal would cut.
`step()` re-zeroes them after every optimizer step, so stale momentum cannot bring them back and
every forward pass computes exactly what the smaller model will. `finalize()` then removes them
physically (same outputs, fewer parameters and MACs) and records the removal so that `tp.save` /
`tp.load` replay it.

``exclude`` and ``freeze`` keep groups as in ``tp.prune(..., granularity="channel")``
(structured/exclusion.py): an excluded layer keeps its own output channels while the channels it
reads may still be pruned (``exclude=["fc"]`` keeps the class count), and a frozen layer is left
completely unchanged (every group it is in stays whole).

Only groups where zeroing a channel is the same as removing it (``Group.exact``) are pruned: a
channel that a LayerNorm normalizes over still changes the statistics when zeroed, so the masked
model would not compute what the pruned one does. Masks only grow, as in the weight Pruner.

Scores come from the weights at the update (magnitude, L1/L2, filter norm, BN scale, random) or,
for data-driven criteria (taylor, gradient, activation, apoz), from the ``data`` batches (and
``loss_fn``) given to the Pruner, scored afresh at every update. A member's per-channel scores are
normalized by their mean over the channels still alive, so a ranking is what the structured
criterion would give on the model with the zeroed channels already removed.

>>> pruner = tp.Pruner(model, 0.5, tp.schedules.Cubic(0, 1000, 100), granularity="channel",
...                    importance="l2", example_inputs=torch.randn(1, 3, 32, 32))
>>> ...  # training loop with pruner.step() after optimizer.step()
>>> pruner.finalize()          # channels removed: a smaller plain model

Under DistributedDataParallel the data-driven group scores are averaged across ranks before each
ranking and the zeroed channels compared across ranks after it (distributed.py). `finalize()`
replaces the pruned layers' parameters: wrap the smaller model in a new DDP (and optimizer).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .distributed import average_, check_equal_across_ranks, fail_together
from .importance import Importance
from .importance.base import Requires, check_channel_form
from .schedules import Schedule
from .structured.exclusion import exclusion
from .structured.graph import DependencyGraph, Group
from .structured.plan import apply_plan, channel_step, plan_from_removed, record_step, zero_channels
from .structured.scoring import group_scores
from .structured.select import select
from .structured.tracing.recorder import Member
from .targets import check_data_args, check_scope, check_target, refuse_unused_data

__all__ = ["ChannelStrategy"]


class ChannelStrategy:
    """What a Pruner's update does with ``granularity="channel"``: ranks the channel groups and zeroes
    the chosen channels in every member tensor; `finalize()` removes them. It keeps the strategy
    contract `pruner.WeightStrategy` describes; the lifecycle around it is the Pruner's."""

    state_version = 1
    state_versions = (1,)
    state_granularity = "channel"
    state_note = " with granularity='channel'"
    finalized_note = "its channels are removed"

    def __init__(self, model: nn.Module, criterion: Importance, target_sparsity, schedule: Schedule, importance,
                 granularity, scope, exclude, data, loss_fn, example_inputs, freeze=()):
        if granularity != "channel":
            raise ValueError(f"`granularity` must be 'channel' for a ChannelPruner, got {granularity!r}")
        check_scope(scope, allow_dict=False, context="granularity='channel'")
        check_channel_form(criterion)  # ValueError for criteria without a structured form (e.g. wanda)
        if criterion.requires is not Requires.WEIGHTS:
            check_data_args(data, loss_fn, importance, criterion.requires is Requires.LOSS,
                            note="; with granularity='channel' it is scored on them at every update")
        else:
            refuse_unused_data(data, loss_fn, importance)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
        target = check_target(target_sparsity, schedule, None)
        kept = exclusion(model, exclude, freeze)
        graph = DependencyGraph(model, example_inputs)
        modules = dict(model.named_modules())
        groups = [g for g in graph.prunable_groups if g.exact and not kept.keeps(g.indices, modules)]
        if not groups:
            raise ValueError("`model` has no channel group that can be pruned while training (after `exclude` and "
                             "`freeze`; groups "
                             f"where zeroing differs from removal are left out): {graph.unprunable or 'no groups'}")

        self.model = model
        self.importance = criterion
        self.target_sparsity = target
        self.schedule = schedule.resolved(target)
        self.scope = scope
        self.graph = graph
        self._groups: List[Group] = groups
        self._names = _group_names(groups)
        self.schedules = {name: self.schedule for name in self._names}
        self._removed = [torch.zeros(len(g), dtype=torch.bool) for g in groups]
        self._zeroed: Dict[Member, torch.Tensor] = {}
        self._data = data
        self._loss_fn = loss_fn

    @property
    def groups(self) -> Dict[str, Group]:
        """The channel groups pruned, by name (the group's first member)."""
        return dict(zip(self._names, self._groups))

    def sparsity(self, finalized: bool) -> float:
        """The fraction of the pruned groups' channels zeroed (removed after `finalize()`)."""
        total = sum(len(g) for g in self._groups)
        return sum(int(r.sum()) for r in self._removed) / total

    def observe_step(self) -> None:
        """Nothing: channel scores come from the weights or ``data`` at each update."""

    def is_update(self, step: int) -> bool:
        """Whether ``step`` is one of the schedule's updates."""
        return self.schedule.is_update(step)

    def prepare(self, step: int) -> None:
        """Nothing: no channel is recorded during a training step."""

    def after_step(self) -> None:
        """Re-zeroes the pruned channels after every optimizer step (stale momentum cannot bring them back)."""
        self._zero()

    def update(self, step: int) -> bool:
        target = self.schedule.sparsity_at(step)
        if target == 0:
            return False
        if self._data is not None:  # each rank scores its own `data`: all fail together, then rank on the average
            with fail_together("channel scoring on the Pruner's `data`"):
                scores = group_scores(self.model, self._groups, self.importance, self._data, self._loss_fn,
                                      alive=self._alive())
            average_(scores)
        else:
            scores = group_scores(self.model, self._groups, self.importance, None, self._loss_fn, alive=self._alive())
        for name, score in zip(self._names, scores):
            if score.isnan().any():
                raise ValueError(f"importance {self.importance!r} gave NaN scores for channel group {name!r}: "
                                 "its weights or gradients hold NaN")
        # already pruned channels rank first, so each group's removal only grows (stable sort)
        ranked = [s.masked_fill(r, float("-inf")) for s, r in zip(scores, self._removed)]
        chosen = select(self._groups, ranked, float(target), self.scope, 1)
        for removed, units in zip(self._removed, chosen):
            removed[units] = True
        self._zeroed = self._members_of_removed()
        return True

    def check_across_ranks(self, step: int) -> None:
        """Under DDP: every rank zeroed the same channels at ``step`` (else all raise)."""
        check_equal_across_ranks({name: ~r for name, r in zip(self._names, self._removed)}, step, "channels")

    def _alive(self) -> Optional[Dict[Member, torch.Tensor]]:
        """Per member, which indices along its dim are not zeroed (None while nothing is)."""
        if not self._zeroed:
            return None
        alive = {}
        for g in self._groups:
            for member in g.indices:
                if member not in alive:
                    module, tensor, dim = member
                    owner = self.model.get_submodule(module) if module else self.model
                    alive[member] = torch.ones(getattr(owner, tensor).shape[dim], dtype=torch.bool)
        for member, indices in self._zeroed.items():
            alive[member][indices] = False
        return alive

    def _members_of_removed(self) -> Dict[Member, torch.Tensor]:
        """The removed indices of every member tensor, as structured.channels.choose_removal builds them."""
        parts: Dict[Member, List[torch.Tensor]] = {}
        for group, removed in zip(self._groups, self._removed):
            units = torch.nonzero(removed).flatten()
            if units.numel():
                for member, indices in group.indices.items():
                    parts.setdefault(member, []).append(indices[units].flatten())
        return {m: torch.cat(p) for m, p in parts.items()}

    def _zero(self) -> None:
        if self._zeroed:
            zero_channels(self.model, self._zeroed)

    def removed_channels(self) -> Dict[str, List[int]]:
        """The zeroed (after `finalize()`: removed) channel indices of each group, by group name."""
        return {name: torch.nonzero(r).flatten().tolist() for name, r in zip(self._names, self._removed)}

    def state_dict(self) -> dict:
        """The zeroed channels (plain data); the zeroed weights themselves live in the model's state."""
        return {
            "granularity": "channel",
            "groups": list(self._names),
            "sizes": [len(g) for g in self._groups],
            "removed": [torch.nonzero(r).flatten().tolist() for r in self._removed],
        }

    def check_state(self, state: dict) -> None:
        """The state was saved for these channel groups, of these sizes."""
        sizes = [len(g) for g in self._groups]
        if state.get("groups") != list(self._names) or state.get("sizes") != sizes:
            saved = dict(zip(state.get("groups") or [], state.get("sizes") or []))
            differ = [name for name, n in zip(self._names, sizes) if saved.get(name) != n] or list(self._names)
            raise ValueError(f"`state` was saved for channel groups {state.get('groups')} "
                             f"of sizes {state.get('sizes')}, this Pruner prunes {list(self._names)} "
                             f"of sizes {sizes}: {differ} differ")

    def load_state(self, state: dict) -> None:
        """Restores the zeroed channels and re-zeroes them (so the order of loading model and Pruner
        does not matter)."""
        sizes = [len(g) for g in self._groups]
        removed = state.get("removed")
        if not isinstance(removed, list) or len(removed) != len(sizes) or not all(
                _channel_list(r, n) for r, n in zip(removed, sizes)):
            raise ValueError("`state['removed']` must list, per group, channel indices within the group "
                             "(at least one kept)")
        self._removed = [torch.zeros(n, dtype=torch.bool) for n in sizes]
        for mask, indices in zip(self._removed, removed):
            mask[torch.as_tensor(indices, dtype=torch.int64)] = True
        self._zeroed = self._members_of_removed()
        self._zero()

    def portable_state(self) -> None:
        """Nothing to re-key in a copy: everything is plain or keyed by name (no statistics between updates)."""
        return None

    def restore(self, by_name: None) -> None:
        """Nothing to re-key in a copy."""

    def finalize(self) -> None:
        """Removes the zeroed channels physically (plain, smaller layers with the same outputs)."""
        self._zero()
        removed = self._members_of_removed()
        if removed:
            plan = plan_from_removed(self.model, removed)
            apply_plan(self.model, plan)
            record_step(self.model, channel_step(plan))  # the step tp.save stores and tp.load replays
        self._zeroed = {}


def _channel_list(indices, size: int) -> bool:
    """Whether ``indices`` is a list of channel indices within a group of ``size`` that keeps one."""
    return (isinstance(indices, list) and len(indices) < size
            and all(not isinstance(i, bool) and isinstance(i, int) and 0 <= i < size for i in indices))


def _group_names(groups: List[Group]) -> List[str]:
    """A readable unique name per group: its first member, e.g. 'features.0.weight[0]'."""
    names: List[str] = []
    for g in groups:
        module, tensor, dim = g.members[0]
        base = f"{module + '.' if module else ''}{tensor}[{dim}]"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}#{n}"
        names.append(name)
    return names
