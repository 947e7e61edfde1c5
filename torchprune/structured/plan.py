"""The removal plan: its format, its one writer helper, and applying it (slicing) or zeroing it.

A removal *plan* maps ``(module name, tensor name, dim)`` to the indices kept along that dim. It
is plain data (names and int lists), so it can be stored by `tp.save` and replayed on a fresh
instance of the model without tracing it again. All slicing of one round goes through one call
of the C++ ``compact`` op; afterwards each layer's size attributes (``in_features``,
``out_channels``, ``num_features``, ``normalized_shape``, ...) are set from the new shapes by its
entry in torchprune/layer_types.py.

Every structural removal is also recorded on the model, as a *step* appended to the list at
``model.<PLAN_ATTRIBUTE>`` by `record_step` (the only writer; replay.py is the reader):

* ``{"kind": "channels", "keep": [[module, tensor, dim, [kept indices]], ...]}`` (channels.py,
  the channel Pruner);
* ``{"kind": "heads", "module": name, "keep": [kept heads]}`` (heads.py);
* ``{"kind": "layers", "replaced": [block names]}`` (blocks.py).

`zero_channels` is the masking counterpart used to check removal: it zeroes the same slices
without changing any shape, which gives the same outputs wherever the group is ``exact``.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from .. import layer_types
from ..nn.attention import PrunedMultiheadAttention
from ..ops import compact
from .hf_config import sync_config
from .tracing.recorder import Member

__all__ = ["PLAN_ATTRIBUTE", "record_step", "steps_of", "apply_plan", "zero_channels", "plan_from_removed",
           "channel_step"]

#: The attribute of a pruned model that holds its structural removal steps (saved by `tp.save`).
PLAN_ATTRIBUTE = "_torchprune_structure"

Plan = Dict[Member, List[int]]


def record_step(model: nn.Module, step: dict) -> None:
    """Appends ``step`` (plain data, see the module docstring) to ``model``'s removal steps."""
    model.__dict__.setdefault(PLAN_ATTRIBUTE, []).append(step)


def steps_of(model: nn.Module) -> List[dict]:
    """The removal steps applied to ``model`` so far (a copy; empty if it was never structurally pruned)."""
    return list(model.__dict__.get(PLAN_ATTRIBUTE, []))


def channel_step(plan: Plan) -> dict:
    """The step that records a channel removal ``plan`` (kept indices as int lists)."""
    return {"kind": "channels", "keep": [[m, t, d, _as_list(keep)] for (m, t, d), keep in plan.items()]}


def _as_list(keep) -> List[int]:
    return keep.tolist() if hasattr(keep, "tolist") else list(keep)


def plan_from_removed(model: nn.Module, removed: Dict[Member, torch.Tensor], modules=None,
                      arrays: bool = False) -> Plan:
    """Kept indices per member from the removed ones (int lists; int64 numpy arrays with
    ``arrays=True``, which `apply_plan` takes as they are). ``modules``: the model's
    ``dict(named_modules())`` if the caller has it."""
    plan = {}
    if modules is None:
        modules = dict(model.named_modules())
    for (module, tensor, dim), indices in removed.items():
        size = _tensor(model, module, tensor, modules).shape[dim]
        keep = np.ones(size, dtype=bool)
        keep[indices.numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices, dtype=np.int64)] = False
        kept = np.flatnonzero(keep)
        plan[(module, tensor, dim)] = kept if arrays else kept.tolist()
    return plan


def _mask_of(owner: nn.Module):
    """``owner.weight_mask`` or None, without the cost of a failed attribute lookup on nn.Module."""
    mask = owner._buffers.get("weight_mask")
    if mask is None and ("weight_mask" in owner._parameters or "weight_mask" in owner.__dict__
                         or hasattr(type(owner), "weight_mask")):
        mask = getattr(owner, "weight_mask", None)
    return mask


def _tensor(model: nn.Module, module: str, tensor: str, modules=None) -> torch.Tensor:
    owner = (modules[module] if modules is not None else model.get_submodule(module)) if module else model
    value = owner._parameters.get(tensor)  # the usual case, straight from the module's dict
    if value is None:
        value = getattr(owner, tensor, None)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"the removal plan names {module + '.' if module else ''}{tensor}, "
                         "which the model does not have")
    return value


def apply_plan(model: nn.Module, plan: Plan, modules=None) -> None:
    """Slices every member of ``plan`` (and a masked weight's ``weight_mask`` with it).
    ``modules``: the model's ``dict(named_modules())`` if the caller has it."""
    if _widen_attention(model, plan) or modules is None:
        modules = dict(model.named_modules())
    entries: List[Tuple[str, str, int, torch.Tensor]] = []
    for (module, tensor, dim), keep in plan.items():
        index = torch.from_numpy(np.asarray(keep, dtype=np.int64))  # 3x faster than as_tensor on a list
        entries.append((module, tensor, dim, index))
        if tensor == "weight" and isinstance(_mask_of(modules[module]), torch.Tensor):
            entries.append((module, "weight_mask", dim, index))
    # A tensor sliced along two dims (a Linear's rows and columns) goes through two rounds.
    rounds: List[List[Tuple[str, str, int, torch.Tensor]]] = []
    seen: Dict[Tuple[str, str], int] = {}
    for entry in entries:
        r = seen.get(entry[:2], -1) + 1
        seen[entry[:2]] = r
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(entry)
    touched = set()
    for r in rounds:
        tensors = [_tensor(model, m, t, modules).detach() for m, t, _, _ in r]
        devices = [t.device for t in tensors]
        out = compact([t.cpu() for t in tensors], [d for _, _, d, _ in r], [i for _, _, _, i in r])
        for (module, tensor, _, _), new, device in zip(r, out, devices):
            _assign(modules[module], tensor, new.to(device))
            touched.add(module)
    for module in touched:
        layer_types.resize(modules[module])  # in_features, out_channels, num_features, ...
    sync_config(model)  # a Hugging Face model's config follows its layers' widths


def _widen_attention(model: nn.Module, plan: Plan) -> bool:
    """nn.MultiheadAttention whose width the plan changes becomes a PrunedMultiheadAttention with
    all its heads (same parameter names, same outputs), which allows a width apart from its heads'."""
    widened = False
    for module, tensor, _ in plan:
        if tensor == "in_proj_weight":
            owner = model.get_submodule(module) if module else model
            if isinstance(owner, nn.MultiheadAttention):
                parent_name, _, attr = module.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, attr, PrunedMultiheadAttention.from_attention(owner, torch.arange(owner.num_heads)))
                widened = True
    return widened


def _assign(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    old = owner._parameters.get(name)
    if old is not None:  # straight into the module's dict: what setattr does for an existing parameter, a few µs less
        owner._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
        return
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner._buffers[name] = value


def zero_channels(model: nn.Module, removed: Dict[Member, torch.Tensor]) -> None:
    """Zeroes the removed slices of every member in place, keeping all shapes."""
    with torch.no_grad():
        for (module, tensor, dim), indices in removed.items():
            _tensor(model, module, tensor).index_fill_(dim, torch.as_tensor(indices, dtype=torch.int64), 0)
