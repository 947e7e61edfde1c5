"""Group importance: one score per removable channel (unit), aggregated over all its members.

How the members are combined: each member tensor gets one score per index along its pruned dim
(see below); that vector is divided by its mean over the member (so that a layer with large
weights does not outvote one with small weights), and a unit's score is the mean, over the
group's scored members, of the normalized scores of the indices the unit owns (summed when a
unit owns several indices, e.g. the H*W features a channel feeds into a Linear).

Per-index member scores, by criterion:

* ``Magnitude(p)`` ("l1", "l2", "magnitude"): sum of |w|^p over the slice, for members that are
  weights of 2 or more dims (conv, linear, embedding, LSTM input weights);
* ``FilterNorm(p)`` ("filter_norm"): the Lp norm of the slice, same members;
* ``Taylor`` / ``Gradient``: sum over the calibration batches of |w * dL/dw| (or |dL/dw|) over
  the slice, same members;
* ``BNScale`` ("bn_scale"): |gamma| of the group's BatchNorm/LayerNorm members; a group without
  one is scored by FilterNorm(2) instead;
* ``Activation`` ("activation", "apoz"): the mean |output| (or 1 - fraction of zeros) per channel
  of the group's layers that produce it (conv, linear, norm outputs) over the calibration batches;
  a group that no layer outputs (the q/k or v positions inside attention) is scored by FilterNorm(2);
* ``Random``: uniform random per unit (seeded).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..calibration import hooked_eval, preserved_state
from ..importance import FilterNorm, Gradient, Importance, Magnitude, Random, Taylor
from .graph import Group
from .trace import Member

__all__ = ["group_scores"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm)


def _kind(criterion: Importance) -> str:
    name = type(criterion).__name__
    if isinstance(criterion, FilterNorm):
        return "filter_norm"
    if isinstance(criterion, Magnitude):
        return "magnitude"
    if isinstance(criterion, (Taylor, Gradient)):
        return "gradient"
    if isinstance(criterion, Random):
        return "random"
    if name == "BNScale":
        return "bn_scale"
    if name == "Activation":
        return "activation"
    raise ValueError(
        f"`importance` {criterion!r} has no structured form; use one of 'l1', 'l2', 'filter_norm', "
        "'taylor', 'gradient', 'bn_scale', 'activation', 'apoz', 'random'"
    )


def needs(criterion: Importance) -> str:
    """'loss' (backward passes), 'data' (forward passes) or '' for the criterion."""
    kind = _kind(criterion)
    return {"gradient": "loss", "activation": "data"}.get(kind, "")


def _owner(model, module):
    return model.get_submodule(module) if module else model


def group_scores(model: nn.Module, groups: List[Group], criterion: Importance, data=None, loss_fn=None,
                 alive: Optional[Dict[Member, torch.Tensor]] = None, modules=None) -> List[torch.Tensor]:
    """One float64 score per unit of each group (higher = keep).

    ``alive`` ({member: bool per index along its dim}) marks the indices not zeroed when channels
    are zeroed rather than removed (the channel Pruner): each member's mean is then taken over
    those only, so the scores are those of the model with the zeroed channels removed.
    """
    kind = _kind(criterion)
    if kind == "random":
        criterion.reset()
        return [torch.rand(len(g), generator=criterion._generator, dtype=torch.float64) for g in groups]
    members = list(dict.fromkeys(m for g in groups for m in g.indices))
    if modules is None:
        modules = dict(model.named_modules())
    if kind == "gradient":
        per_index = _gradient_scores(model, members, isinstance(criterion, Taylor), data, loss_fn)
    elif kind == "activation":
        per_index = _activation_scores(model, members, getattr(criterion, "kind", "mean"), data)
    else:
        per_index = {}
        # (module, tensor) -> |w|^p in float64: a weight in two groups (rows, columns) is powered
        # once, and only the current weight's copy is alive (members sorted by weight), so scoring
        # holds one float64 weight at a time, not a float64 copy of the whole model
        powered_of = {}
        for m in sorted(members, key=lambda m: (m[0], m[1], m[2])):
            module, tensor, dim = m
            if (module, tensor) not in powered_of:
                powered_of.clear()
            owner = modules[module]
            value = owner._parameters.get(tensor)  # the usual case, without nn.Module's attribute lookup
            value = (getattr(owner, tensor) if value is None else value).detach()
            if kind == "bn_scale":
                if isinstance(owner, _NORMS) and tensor == "weight":
                    per_index[m] = value.double().abs()
            elif value.dim() >= 2 and tensor != "weight_mask":
                p = float(criterion.p)
                powered = powered_of.get((module, tensor))
                if powered is None:
                    # one float64 copy (never the weight itself), powered in place
                    powered = value.to(dtype=torch.float64, copy=True)
                    powered = powered.square_() if p == 2 else powered.abs_() if p == 1 else powered.abs_().pow_(p)
                    powered_of[(module, tensor)] = powered
                summed = powered.sum([d for d in range(powered.dim()) if d != dim])
                per_index[m] = summed.pow(1 / p) if kind == "filter_norm" else summed
    scores = []
    normalized_of = {}  # member -> its per-index scores divided by their mean (numpy: tiny arrays, many ops)
    for g in groups:
        scored = [m for m in g.indices if m in per_index]
        if not scored and kind in ("bn_scale", "activation"):  # no norm layer / no layer output here: FilterNorm(2)
            return_scores = group_scores(model, [g], FilterNorm(p=2), alive=alive, modules=modules)[0]
            scores.append(return_scores)
            continue
        total = np.zeros(len(g), dtype=np.float64)
        for m in scored:
            normalized = normalized_of.get(m)
            if normalized is None:
                vector = per_index[m].numpy()
                live = vector[alive[m].numpy()] if alive is not None and m in alive else vector
                mean = float(live.mean()) if live.size else 0.0
                normalized = vector / mean if mean > 0 else vector
                normalized_of[m] = normalized
            total += normalized[g.indices[m].numpy()].sum(1)
        scores.append(torch.from_numpy(total / max(len(scored), 1)))
    return scores


def _batches(data):
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"`data` must yield (inputs, targets) pairs, got {type(batch).__name__}")
        yield batch


def _call(model, inputs):
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _gradient_scores(model, members: List[Member], taylor: bool, data, loss_fn) -> Dict[Member, torch.Tensor]:
    tensors = {}
    for m in members:
        value = getattr(_owner(model, m[0]), m[1])
        if isinstance(value, nn.Parameter) and value.dim() >= 2:
            tensors[m] = value
    sums = {m: torch.zeros_like(t, dtype=torch.float64) for m, t in tensors.items()}
    count = 0
    with preserved_state(model) as params, torch.inference_mode(False), torch.enable_grad():
        model.eval()
        for inputs, targets in _batches(data):
            for p in params:
                p.grad = None
            loss_fn(_call(model, inputs), targets).backward()
            for m, t in tensors.items():
                if t.grad is not None:
                    term = (t.detach() * t.grad) if taylor else t.grad
                    sums[m] += term.double().abs()
            count += 1
    if count == 0:
        raise ValueError("`data` yielded no batches")
    return {m: s.movedim(m[2], 0).reshape(s.shape[m[2]], -1).sum(1) for m, s in sums.items()}


def _activation_scores(model, members: List[Member], kind: str, data) -> Dict[Member, torch.Tensor]:
    producers = {}
    for m in members:
        module, tensor, dim = m
        owner = _owner(model, module)
        if isinstance(owner, nn.Linear) and tensor == "weight" and dim == 0:
            producers[m] = (owner, -1)
        elif isinstance(owner, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and tensor == "weight" and dim == 0:
            producers[m] = (owner, 1)
        elif isinstance(owner, _NORMS) and tensor == "weight":
            producers[m] = (owner, -1 if isinstance(owner, nn.LayerNorm) else 1)
    sums: Dict[Member, torch.Tensor] = {}
    counts: Dict[Member, int] = {}

    def hook_for(m, dim):
        def hook(module, inputs, output):
            out = output.detach().double().movedim(dim, 0)
            flat = out.reshape(out.shape[0], -1)
            value = (flat != 0).double().sum(1) if kind == "apoz" else flat.abs().sum(1)
            sums[m] = sums.get(m, 0) + value
            counts[m] = counts.get(m, 0) + flat.shape[1]
        return hook

    seen = 0
    with hooked_eval(model, [owner.register_forward_hook(hook_for(m, dim)) for m, (owner, dim) in producers.items()]):
        for inputs, _ in _batches(data):
            _call(model, inputs)
            seen += 1
    if seen == 0:
        raise ValueError("`data` yielded no batches")
    return {m: sums[m] / counts[m] for m in sums}
