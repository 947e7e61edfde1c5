"""prune(..., granularity="layer"): replace whole residual blocks by identity.

A block is a candidate when it is an element of an nn.Sequential, returns a tensor of its input's
shape, holds parameters, and its traced forward adds its input to something (a residual block).
Blocks are ranked by *sensitivity*: the relative change ||y - y'|| / ||y|| of the model's output
on the example inputs (or the ``data`` batches) when that block alone is replaced by identity;
the ``round(sparsity * candidates)`` least sensitive are replaced. This is not exact: the block's
residual branch is dropped, including any activation after its addition.
"""

from __future__ import annotations

import math
import operator
from typing import Dict, List

import torch
from torch import fx, nn

from ..calibration import as_inputs, call
from ..calibration import batches as data_batches
from ..state import preserved_state
from .exclusion import Exclusion
from .plan import record_step

__all__ = ["residual_blocks", "prune_layers", "replace_by_identity"]


def _is_residual(block: nn.Module) -> bool:
    try:
        graph = fx.symbolic_trace(block).graph
    except Exception:
        return False
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return False
    adds = (operator.add, operator.iadd, torch.add)
    return any(n.target in adds or n.target in ("add", "add_") for n in inputs[0].users)


def residual_blocks(model: nn.Module, inputs: tuple) -> List[str]:
    """Names of the residual blocks that may be replaced by identity, in model order."""
    shapes: Dict[str, bool] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            for child_name, child in module.named_children():
                full = f"{name}.{child_name}" if name else child_name

                def hook(m, args, out, full=full):
                    shapes[full] = (len(args) == 1 and isinstance(args[0], torch.Tensor)
                                    and isinstance(out, torch.Tensor)
                                    and args[0].shape == out.shape and shapes.get(full, True))
                hooks.append(child.register_forward_hook(hook))
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return [n for n, same in shapes.items()
            if same and any(True for _ in model.get_submodule(n).parameters()) and _is_residual(model.get_submodule(n))]


def replace_by_identity(model: nn.Module, name: str) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())


def prune_layers(model: nn.Module, example_inputs, sparsity: float, kept: Exclusion = Exclusion(),
                 data=None) -> nn.Module:
    """Replaces the round(sparsity * candidates) least sensitive residual blocks by identity; returns
    ``model``. Blocks that are excluded, or hold a frozen module, are not candidates (``kept``)."""
    inputs = as_inputs(example_inputs)
    candidates = [n for n in residual_blocks(model, inputs) if not kept.keeps_block(model.get_submodule(n))]
    if not candidates:
        raise ValueError("`model` has no residual block (an nn.Sequential element that adds its input to its output) "
                         "to remove after `exclude` and `freeze`")
    batches = [inputs] if data is None else [x for x, _ in data_batches(data, targets=False, model=model)]
    with preserved_state(model), torch.no_grad():
        model.eval()
        reference = [call(model, b) for b in batches]
        sensitivity = {}
        for name in candidates:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            block = getattr(parent, attr)
            setattr(parent, attr, nn.Identity())
            try:
                change = sum(float((call(model, b) - y).norm() / y.norm().clamp_min(1e-12))
                             for b, y in zip(batches, reference))
            finally:
                setattr(parent, attr, block)
            sensitivity[name] = change
    count = int(math.floor(sparsity * len(candidates) + 0.5))
    removed = sorted(candidates, key=lambda n: sensitivity[n])[:count]
    for name in removed:
        replace_by_identity(model, name)
    if removed:
        record_step(model, {"kind": "layers", "replaced": removed})
    return model
