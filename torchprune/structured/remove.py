"""Physical removal: slicing every member tensor of the removed channels, in place.

A removal *plan* maps ``(module name, tensor name, dim)`` to the indices kept along that dim. It
is plain data (names and int lists), so it can be stored by `tp.save` and replayed on a fresh
instance of the model without tracing it again. All slicing of one round goes through one call
of the C++ ``compact`` op; afterwards the layers' attributes (``in_features``, ``out_channels``,
``num_features``, ``normalized_shape``, ...) are set from the new shapes.

`zero_channels` is the masking counterpart used to check removal: it zeroes the same slices
without changing any shape, which gives the same outputs wherever the group is ``exact``.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from ..ops import compact
from .trace import Member

__all__ = ["apply_plan", "zero_channels", "plan_from_removed", "sync_attributes"]

Plan = Dict[Member, List[int]]


def plan_from_removed(model: nn.Module, removed: Dict[Member, torch.Tensor], modules=None, arrays: bool = False) -> Plan:
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
    if mask is None and ("weight_mask" in owner._parameters or "weight_mask" in owner.__dict__ or hasattr(type(owner), "weight_mask")):
        mask = getattr(owner, "weight_mask", None)
    return mask


def _tensor(model: nn.Module, module: str, tensor: str, modules=None) -> torch.Tensor:
    owner = (modules[module] if modules is not None else model.get_submodule(module)) if module else model
    value = owner._parameters.get(tensor)  # the usual case, straight from the module's dict
    if value is None:
        value = getattr(owner, tensor, None)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"the removal plan names {module + '.' if module else ''}{tensor}, which the model does not have")
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
        sync_attributes(modules[module])


def _widen_attention(model: nn.Module, plan: Plan) -> bool:
    """nn.MultiheadAttention whose width the plan changes becomes a PrunedMultiheadAttention with
    all its heads (same parameter names, same outputs), which allows a width apart from its heads'."""
    from .attention import PrunedMultiheadAttention

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


def sync_attributes(module: nn.Module) -> None:
    """Sets a layer's size attributes from its (sliced) tensors."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        module.out_channels = module.weight.shape[0]
        if depthwise:
            module.groups = module.in_channels = module.out_channels
        else:
            module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        module.in_channels = module.weight.shape[0]
        module.out_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        source = module.weight if module.weight is not None else module.running_mean
        if source is not None:
            module.num_features = source.shape[0]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = (module.weight.shape[0],)
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    elif hasattr(module, "sync_sizes"):  # PrunedMultiheadAttention: embed_dim, head_dim, v_head_dim
        module.sync_sizes()
    elif isinstance(module, nn.RNNBase):
        module.input_size = module.weight_ih_l0.shape[1]


def zero_channels(model: nn.Module, removed: Dict[Member, torch.Tensor]) -> None:
    """Zeroes the removed slices of every member in place, keeping all shapes."""
    with torch.no_grad():
        for (module, tensor, dim), indices in removed.items():
            _tensor(model, module, tensor).index_fill_(dim, torch.as_tensor(indices, dtype=torch.int64), 0)
