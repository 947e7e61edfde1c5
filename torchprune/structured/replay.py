"""Replaying stored structural removal steps on a fresh instance of a model (for `tp.load`).

A step is plain data, ``{"kind": "channels", "keep": [[module, tensor, dim, [kept indices]], ...]}``
(plan.py has the format), so files load with ``torch.load(weights_only=True)``. Every entry is checked against
the model before any tensor is sliced.
"""

from __future__ import annotations

from typing import List

from torch import nn

from .blocks import replace_by_identity
from .head_dims import apply_head_dims
from .heads import attention_modules, hand_written, heads_and_size, remove_heads, units
from .hf_config import sync_config
from .plan import apply_plan, record_step, steps_of
from .stacks import remove_stack_layers

__all__ = ["structure_of", "replay"]


def structure_of(model: nn.Module) -> List[dict]:
    """The removal steps applied to ``model`` so far (empty if it was never structurally pruned)."""
    return steps_of(model)


def _replay_other(model: nn.Module, step: dict, number: int) -> bool:
    """Head and layer steps; False if ``step`` is not one of them."""
    where = f"structural step {number}"
    if step.get("kind") == "heads":
        name, keep = step.get("module"), step.get("keep")
        module = attention_modules(model).get(name)
        if module is None or not isinstance(keep, list) or any(not isinstance(h, int) or not 0 <= h < units(module)
                                                               for h in keep):
            raise ValueError(f"`model` does not match the file: {where} keeps heads {keep} "
                             f"of attention module {name!r}")
        remove_heads(model, name, keep)
        sync_config(model)
        return True
    if step.get("kind") == "head_dims":
        _replay_head_dims(model, step, where)
        return True
    if step.get("kind") == "stack_layers":
        name, removed, depth = step.get("stack"), step.get("removed"), step.get("depth")
        stack = dict(model.named_modules()).get(name)
        if (not isinstance(stack, nn.ModuleList) or len(stack) != depth or not isinstance(removed, list)
                or any(not isinstance(i, int) or not 0 <= i < depth for i in removed) or len(set(removed)) >= depth):
            raise ValueError(f"`model` does not match the file: {where} removes layers {removed} of the "
                             f"{depth}-layer stack {name!r}")
        remove_stack_layers(model, name, removed, config=bool(step.get("config", True)))
        return True
    if step.get("kind") == "layers":
        names = step.get("replaced")
        every = dict(model.named_modules())
        if not isinstance(names, list) or any(n not in every for n in names):
            raise ValueError(f"`model` does not match the file: {where} replaces blocks {names} "
                             "that the model does not have")
        for name in names:
            replace_by_identity(model, name)
        return True
    return False


def _replay_head_dims(model: nn.Module, step: dict, where: str) -> None:
    name, qk, v, scale = step.get("module"), step.get("qk"), step.get("v"), step.get("scale")
    module = dict(model.named_modules()).get(name)

    def valid(kept) -> bool:
        heads, size = heads_and_size(module)
        return (isinstance(kept, list) and len(kept) == heads and all(
            isinstance(js, list) and len(js) == len(kept[0]) and all(isinstance(j, int) and 0 <= j < size for j in js)
            for js in kept))

    if module is None or not hand_written(module) or not (valid(qk) and valid(v) and len(qk[0]) == len(v[0])) or not (
            scale is None or isinstance(scale, float)):
        raise ValueError(f"`model` does not match the file: {where} shrinks the heads of attention module {name!r} "
                         f"to positions {qk} (q/k) and {v} (v)")
    apply_head_dims(module, qk, v, scale)


def _check_step(model: nn.Module, step, number: int) -> dict:
    where = f"structural step {number}"
    if not isinstance(step, dict) or step.get("kind") != "channels" or not isinstance(step.get("keep"), list):
        raise ValueError(f"`model` does not match the file: {where} is not a channel removal "
                         "this torchprune can replay")
    plan = {}
    for entry in step["keep"]:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 4):
            raise ValueError(f"`model` does not match the file: {where} holds a malformed entry {entry!r}")
        module, tensor, dim, keep = entry
        try:
            owner = model.get_submodule(module) if module else model
        except AttributeError:
            raise ValueError(f"`model` does not match the file: {where} slices {module!r}, "
                             "which the model does not have") from None
        value = getattr(owner, tensor, None)
        if value is None or not hasattr(value, "shape") or not 0 <= dim < value.dim():
            raise ValueError(f"`model` does not match the file: {where} slices {module}.{tensor} along dim {dim}, "
                             "which the model does not have")
        if any(not isinstance(i, int) or not 0 <= i < value.shape[dim] for i in keep):
            raise ValueError(f"`model` does not match the file: {where} keeps indices outside "
                             f"{module}.{tensor}'s dim {dim} (size {value.shape[dim]})")
        plan[(module, tensor, dim)] = list(keep)
    return plan


def replay(model: nn.Module, steps: List[dict]) -> nn.Module:
    """Applies ``steps`` in order to ``model`` (a fresh, unpruned instance); returns it."""
    if steps and structure_of(model):
        raise ValueError("`model` is already structurally pruned: load into a fresh, unpruned instance")
    for number, step in enumerate(steps):
        if not (isinstance(step, dict) and _replay_other(model, step, number)):
            apply_plan(model, _check_step(model, step, number))
        record_step(model, step)
    return model
