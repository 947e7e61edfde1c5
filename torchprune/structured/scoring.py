"""Group importance: one score per removable channel (unit), aggregated over all its members.

The criterion owns the scoring (Torch-Pruning's ``Importance(group)`` idea): each member tensor of
the groups is handed to ``criterion.channel_scores`` (see `importance.base.ChannelTensor`), which
returns one score per index along the member's pruned dims, or None for a member it does not
score; data-driven criteria are first fed by `calibration`'s passes (``criterion.requires``).
`Random` scores units directly (``unit_scores``). A criterion without these hooks (e.g. Wanda)
has no structured form: ValueError.

How the members are combined: each member's per-index scores are divided by their mean over the
member (so that a layer with large weights does not outvote one with small weights), and a
unit's score is the mean, over the group's scored members, of the normalized scores of the
indices the unit owns (summed when a unit owns several indices, e.g. the H*W features a channel
feeds into a Linear). A group none of whose members the criterion scores is scored by its
``channel_fallback`` (FilterNorm(2) for ``BNScale`` and ``Activation``).

Per-index member scores, by criterion (see each class):

* ``Magnitude(p)`` ("l1", "l2", "magnitude"): sum of |w|^p over the slice, for members that are
  weights of 2 or more dims (conv, linear, embedding, LSTM input weights);
* ``FilterNorm(p)`` ("filter_norm"): the Lp norm of the slice, same members;
* ``Taylor`` / ``Gradient``: sum over the calibration batches of |w * dL/dw| (or |dL/dw|) over
  the slice, same members;
* ``BNScale`` ("bn_scale"): |gamma| of the group's BatchNorm/LayerNorm members;
* ``Activation`` ("activation", "apoz"): the mean of max(y, 0) (or 1 - APoZ, the share of
  max(y, 0) that is nonzero) per channel of the output y of the group's layers that produce it
  (conv, linear, norm outputs) over the calibration batches, as at weight level;
* ``Random``: uniform random per unit (seeded).
"""

from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .. import layer_types
from ..calibration import observe_outputs, observe_parameter_gradients
from ..importance import Importance
from ..importance.base import ChannelTensor, Requires, check_channel_form
from .graph import Group
from .tracing.recorder import Member

__all__ = ["group_scores", "member_layout"]



def member_layout(owner: nn.Module, tensor: str, value: torch.Tensor) -> Tuple[Optional[int], bool, bool]:
    """What the layer-type table (torchprune/layer_types.py) says about ``owner.<tensor>`` for
    scoring: the dim of ``owner``'s output that carries the indices of the tensor's dim 0 (None when
    the tensor does not produce its output channels), whether it is a norm layer's scale, and
    whether the weight criteria score it."""
    return (layer_types.output_channel_dim(owner, tensor, 0), tensor == layer_types.scale_tensor(owner),
            layer_types.is_scorable_weight(owner, tensor, value))


def group_scores(model: nn.Module, groups: List[Group], criterion: Importance, data=None, loss_fn=None,
                 alive: Optional[Dict[Member, torch.Tensor]] = None, modules=None) -> List[torch.Tensor]:
    """One float64 score per unit of each group (higher = keep).

    ``alive`` ({member: bool per index along its dim}) marks the indices not zeroed when channels
    are zeroed rather than removed (the channel Pruner): each member's mean is then taken over
    those only, so the scores are those of the model with the zeroed channels removed.
    """
    units = criterion.unit_scores([len(g) for g in groups])
    if units is not None:
        return units
    check_channel_form(criterion)
    if modules is None:
        modules = dict(model.named_modules())
    per_index = _member_scores(model, groups, criterion, data, loss_fn, modules)
    scores = []
    normalized_of = {}  # member -> its per-index scores divided by their mean (numpy: tiny arrays, many ops)
    for g in groups:
        scored = [m for m in g.indices if m in per_index]
        if not scored and criterion.channel_fallback is not None:
            scores.append(group_scores(model, [g], criterion.channel_fallback, alive=alive, modules=modules)[0])
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


def _member_scores(model: nn.Module, groups: List[Group], criterion: Importance, data, loss_fn,
                   modules: Dict[str, nn.Module]) -> Dict[Member, torch.Tensor]:
    """``criterion.channel_scores`` of every member tensor of ``groups``, by member.

    One call per tensor with all its pruned dims, tensors in name order: a weight in two groups
    (rows, columns) is read once, and a criterion's float64 copy of it is freed before the next
    tensor's, so scoring holds one float64 weight at a time, not a float64 copy of the model."""
    dims_of: Dict[Tuple[str, str], List[int]] = {}
    for g in groups:
        for module, tensor, dim in g.indices:
            if tensor != "weight_mask":
                dims = dims_of.setdefault((module, tensor), [])
                if dim not in dims:
                    dims.append(dim)
    tensors = {}  # (module, tensor) -> (owner, the tensor itself, output dim of its dim 0, norm scale, weight)
    for key in sorted(dims_of):
        owner = modules[key[0]]
        value = owner._parameters.get(key[1])  # the usual case, without nn.Module's attribute lookup
        value = getattr(owner, key[1]) if value is None else value
        output_dim, norm_scale, weight = member_layout(owner, key[1], value)
        tensors[key] = (owner, value, output_dim if 0 in dims_of[key] else None, norm_scale, weight)
    gathered = _gathered(model, criterion, tensors, data, loss_fn)
    per_index = {}
    for key, (owner, value, output_dim, norm_scale, weight) in tensors.items():
        member = ChannelTensor(value.detach(), tuple(sorted(dims_of[key])), output_dim, norm_scale,
                               gathered.get(key), weight)
        for dim, scores in (criterion.channel_scores(member) or {}).items():
            per_index[(key[0], key[1], dim)] = scores
    return per_index


def _gathered(model: nn.Module, criterion: Importance, tensors: Dict[Hashable, tuple], data, loss_fn) -> Dict:
    """What the criterion's data passes collect for each tensor (nothing for weight-only criteria):
    summed ``gradient_term`` of every parameter, or summed ``output_statistics`` of every output."""
    if criterion.requires is Requires.LOSS:
        params = {key: value for key, (_, value, _, _, _) in tensors.items() if isinstance(value, nn.Parameter)}
        return observe_parameter_gradients(model, params, criterion.gradient_term, data, loss_fn)
    if criterion.requires is Requires.DATA:
        producers = {key: (owner, dim) for key, (owner, _, dim, _, _) in tensors.items() if dim is not None}
        return observe_outputs(model, producers, criterion.output_statistics, data)
    return {}
