"""DependencyGraph: which channels of which tensors must be removed together.

>>> graph = tp.DependencyGraph(model, example_inputs=(torch.randn(1, 3, 32, 32),))
>>> for group in graph.groups: print(group)
>>> graph.unprunable            # {module name: [why its channels stay]}

A *unit* is one removable channel: the set of tensor slices (a conv's output filter, the next BN's
entry, the next conv's input channel, ...) that go together. Units that touch the same tensors in
the same way form a *group*: the output channels of one layer together with everything coupled to
them (a residual stream is one group across all blocks that add into it). Tracing is done once
per graph (see tracing/fx.py; ``graph.tracing`` says whether one recorded run on the example inputs
labelled the model, record.py, or torch.fx's symbolic trace did, because a layer did not run on
them); nothing in the model is changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import torch
from torch import nn

from ..calibration import as_inputs
from .tracing.fx import trace
from .tracing.recorder import Member

__all__ = ["DependencyGraph", "Group"]


@dataclass
class Group:
    """Coupled channels: ``indices[member]`` is a (units, k) tensor of the indices along the
    member's dim that each unit owns (k > 1 when a channel feeds a flatten, e.g. H*W features).

    ``prunable`` is false when any unit of the group must stay (``reasons`` says why); ``exact``
    is false when removing a unit is not the same as zeroing it (a LayerNorm normalizes over it).
    """

    indices: Dict[Member, torch.Tensor]
    prunable: bool
    reasons: List[str] = field(default_factory=list)
    exact: bool = True
    inexact_reasons: List[str] = field(default_factory=list)

    @property
    def members(self) -> List[Member]:
        return list(self.indices)

    @property
    def modules(self) -> List[str]:
        return list(dict.fromkeys(m for m, _, _ in self.indices))

    def __len__(self) -> int:
        return next(iter(self.indices.values())).shape[0]

    def __repr__(self) -> str:
        def show(m):
            module, tensor, dim = m
            k = self.indices[m].shape[1]
            return f"{module + '.' if module else ''}{tensor}[dim {dim}{'' if k == 1 else f', x{k}'}]"

        state = "prunable" if self.prunable else "fixed: " + "; ".join(self.reasons[:2])
        return f"Group({len(self)} channels, {state}: " + ", ".join(show(m) for m in self.indices) + ")"


class DependencyGraph:
    """The coupled channel groups of ``model`` traced on ``example_inputs`` (a tensor or tuple)."""

    def __init__(self, model: nn.Module, example_inputs):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.example_inputs = as_inputs(example_inputs)
        tracer = trace(model, self.example_inputs)
        #: "recorded run" (record.py), or "torch.fx" where a layer did not run on the example inputs
        self.tracing = tracer.method
        self.attention = tracer.attention
        labels = tracer.labels
        members = _components(labels, tracer.members)
        recorded = getattr(tracer, "modules", None)
        #: {name: module} of the model as traced
        self.modules: Dict[str, nn.Module] = recorded if isinstance(recorded, dict) else dict(model.named_modules())
        modules = self.modules
        for qualname, ids in tracer.positional.items():
            module_name, _, tensor = qualname.rpartition(".")
            if module_name not in modules:
                continue
            comp = labels.components_of(ids)
            varying = [d for d in range(comp.dim()) if bool((comp.amin(d) != comp.amax(d)).any())]
            if len(varying) == 1:
                d = varying[0]
                members[(module_name, tensor, d)] = comp.movedim(d, 0).reshape(comp.shape[d], -1)[:, 0]
            elif len(varying) > 1:
                labels.freeze_components(np.unique(comp.numpy()), f"parameter {qualname!r} is used along several dims")
        self.groups: List[Group] = self._group(members, labels)

    @staticmethod
    def _group(members: Dict[Member, torch.Tensor], labels) -> List[Group]:
        """Units (components) that own the same number of indices of the same members, and are
        all frozen or all not, form one group. Units are ordered by where they first appear
        (members in trace order, then index), groups by their first unit. Vectorized with numpy
        (a flatten into a large Linear gives thousands of indices, a wide MLP thousands of units):
        units with equal signatures are found by hashing them (see `_signatures`)."""
        keys = list(members)
        arrays = [members[key].numpy() for key in keys]
        comp = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        key = np.repeat(np.arange(len(keys)), lengths)
        # the position of each entry within its member (np.r_ and per-member aranges cost µs each)
        index = np.arange(len(comp)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        owned = comp >= 0
        comp, key, index = comp[owned], key[owned], index[owned]
        if not len(comp):
            return []
        order = np.lexsort((index, key, comp))  # by unit, then member, then index
        comp, key, index = comp[order], key[order], index[order]
        # a run: the indices of one member that one unit owns
        run_start = np.flatnonzero(_starts((comp[1:] != comp[:-1]) | (key[1:] != key[:-1])))
        run_length = np.diff(run_start, append=len(comp))
        run_comp, run_key = comp[run_start], key[run_start]
        unit_first = np.flatnonzero(_starts(run_comp[1:] != run_comp[:-1]))  # each unit's first run
        runs = np.diff(unit_first, append=len(run_start))
        units = run_comp[unit_first]
        frozen = np.isin(units, np.fromiter(labels.frozen_reasons, dtype=np.int64, count=len(labels.frozen_reasons)))
        kind = _signatures(frozen, runs, unit_first, run_key, run_length)
        unit_order = np.lexsort((index[run_start[unit_first]], run_key[unit_first]))
        ordered_kind = kind[unit_order]
        _, first_seen = np.unique(ordered_kind, return_index=True)
        rank = np.empty(len(first_seen), dtype=np.int64)
        rank[np.argsort(first_seen)] = np.arange(len(first_seen))  # group number of each kind
        by_group = unit_order[np.argsort(rank[ordered_kind], kind="stable")]
        bounds = np.cumsum(np.bincount(rank[ordered_kind]))
        bounds = np.concatenate([np.zeros(1, dtype=bounds.dtype), bounds])
        inexact = np.isin(units, np.fromiter(labels.inexact_reasons, dtype=np.int64, count=len(labels.inexact_reasons)))
        runs_of = _Runs(keys, index, run_start, run_length, run_key, unit_first, runs)
        groups = []
        for g in range(len(first_seen)):
            rows = by_group[bounds[g] : bounds[g + 1]]
            reasons, inexact_reasons = [], []
            if frozen[rows[0]]:
                reasons = list(dict.fromkeys(r for c in units[rows].tolist() for r in labels.frozen_reasons[c]))
            hits = rows[inexact[rows]]
            if len(hits):
                inexact_reasons = list(dict.fromkeys(r for c in units[hits].tolist()
                                                     for r in labels.inexact_reasons[c]))
            groups.append(Group(runs_of.indices(rows), not bool(frozen[rows[0]]), reasons, not inexact_reasons,
                                inexact_reasons))
        return groups

    @property
    def prunable_groups(self) -> List[Group]:
        return [g for g in self.groups if g.prunable]

    @property
    def unprunable(self) -> Dict[str, List[str]]:
        """Module name -> the reasons why some of its channels cannot be removed."""
        out: Dict[str, List[str]] = {}
        for group in self.groups:
            if not group.prunable:
                for module in group.modules:
                    out.setdefault(module, [])
                    out[module] += [r for r in group.reasons if r not in out[module]]
        return out

    def __repr__(self) -> str:
        lines = [f"DependencyGraph({type(self.model).__name__}: {len(self.groups)} groups, "
                 f"{len(self.prunable_groups)} prunable, traced by {self.tracing})"]
        lines += [f"  {g}" for g in self.groups]
        return "\n".join(lines)


@dataclass
class _Runs:
    """The sorted runs of `DependencyGraph._group`: ``index`` (each entry's position in its member),
    and per run its start, length and member (``run_key`` into ``keys``); per unit its first run
    (``unit_first``) and its number of runs."""

    keys: List[Member]
    index: np.ndarray
    run_start: np.ndarray
    run_length: np.ndarray
    run_key: np.ndarray
    unit_first: np.ndarray
    runs: np.ndarray

    def indices(self, rows: np.ndarray) -> Dict[Member, torch.Tensor]:
        """A group's ``indices`` from its units ``rows`` (all with the same runs, in order)."""
        first = self.unit_first[rows]
        a = first[0]
        indices = {}
        count = int(self.runs[rows[0]])
        lengths = self.run_length[a : a + count]
        single = lengths == 1  # members whose units own one index each (most): all in one gather
        rank_of = np.cumsum(single) - 1
        if single.any():
            gathered = self.index[self.run_start[first[None, :] + np.flatnonzero(single)[:, None]]]
        for j, (member, length, one) in enumerate(zip(self.run_key[a : a + count].tolist(), lengths.tolist(),
                                                      single.tolist())):
            if one:
                indices[self.keys[member]] = torch.from_numpy(gathered[rank_of[j]].reshape(-1, 1))
            else:
                at = self.run_start[first + j][:, None] + np.arange(length)
                indices[self.keys[member]] = torch.from_numpy(self.index[at])
        return indices


def _starts(changes: np.ndarray) -> np.ndarray:
    """``[True, *changes]``: where a run starts."""
    out = np.empty(len(changes) + 1, dtype=bool)
    out[0] = True
    out[1:] = changes
    return out


def _components(labels, members: Dict[Member, torch.Tensor]) -> Dict[Member, torch.Tensor]:
    """`labels.components_of` of every member's ids, in one numpy lookup (a model has hundreds)."""
    if not members:
        return {}
    arrays = [ids.numpy() for ids in members.values()]
    ids = np.concatenate(arrays)
    comp = np.where(ids >= 0, labels.component[np.maximum(ids, 0)], -1)
    parts = np.split(comp, np.cumsum([len(a) for a in arrays])[:-1])
    return {key: torch.from_numpy(part) for key, part in zip(members, parts)}


def _signatures(frozen, runs, unit_first, run_key, run_length, weights=None) -> np.ndarray:
    """A number per unit, equal for units with the same signature: frozen or not, and the same
    (member, length) at each of their runs. The runs are hashed into one int64 per unit (a
    random linear combination that wraps), then every unit is compared with its class's first
    unit; only if two different signatures share a hash are they compared in full (np.unique
    over padded rows, several times slower). ``weights`` (tests) replaces the random ones."""
    unit_of_run = np.repeat(np.arange(len(runs)), runs)
    slot = np.arange(len(run_key)) - unit_first[unit_of_run]
    if weights is None:
        weights = np.random.default_rng(0).integers(1, 2**62, 2 * int(runs.max()) + 2, dtype=np.int64)
    per_run = run_key * weights[2 + 2 * slot] + run_length * weights[3 + 2 * slot]
    hashed = np.add.reduceat(per_run, unit_first) + frozen * weights[0] + runs * weights[1]
    _, first, kind = np.unique(hashed, return_index=True, return_inverse=True)
    kind = kind.reshape(-1)
    same = (frozen == frozen[first[kind]]) & (runs == runs[first[kind]])
    if same.all():
        twin = unit_first[first[kind]][unit_of_run] + slot  # the same run of the class's first unit
        if (run_key[twin] == run_key).all() and (run_length[twin] == run_length).all():
            return kind
    rows = np.full((len(runs), 2 + 2 * int(runs.max())), -1, dtype=np.int64)
    rows[:, 0], rows[:, 1] = frozen, runs
    rows[unit_of_run, 2 + 2 * slot] = run_key
    rows[unit_of_run, 3 + 2 * slot] = run_length
    return np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1)
