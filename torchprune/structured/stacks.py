"""prune(..., granularity="layer") on a stack of transformer layers: whole encoder or decoder layers
removed from the ``nn.ModuleList`` that holds them (Hugging Face's ``encoder.layer``,
``model.layers``, ``transformer.h``; timm's ``blocks``), ranked by ShortGPT's *block influence*
(Men et al. 2024): 1 - the cosine between a layer's input and output hidden state, per token,
averaged over the calibration batches. A layer that barely changes its input is the first to go.

Removing a layer from the list (not replacing it by identity) is what lets the model reload: the
remaining layers are renumbered by the list itself, the config's ``num_hidden_layers`` (GPT-2's
``n_layer``, through the config's attribute map) and per-layer lists such as ``layer_types`` are
rewritten, and the ``layer_idx`` attribute that attention modules use to find their KV cache is
renumbered. So ``save_pretrained`` + ``from_pretrained`` give back the pruned model.

A stack is a ``ModuleList`` whose name ends in ``layer``, ``layers``, ``h``, ``blocks`` or ``block``,
with at least two elements of one class, each of which returns a hidden state (or a tuple that
starts with one) of its input's shape on the example inputs. ``sparsity`` is the fraction of all
the stacks' layers removed (ranked together: an encoder-decoder loses layers where they matter
least); every stack keeps at least one layer. With more than one stack the config is left as it
is, with a warning (one depth field cannot describe both): reload with `tp.load`.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..calibration import as_inputs, call
from ..calibration import batches as data_batches
from ..state import preserved_state
from .exclusion import Exclusion
from .plan import record_step

__all__ = ["layer_stacks", "block_influence", "remove_stack_layers", "prune_stack_layers"]

_STACK_NAME = re.compile(r"(^|\.)(layer|layers|h|blocks|block)$")
_DEPTH_FIELDS = ("num_hidden_layers", "num_layers")


def _named_lists(model: nn.Module) -> Dict[str, nn.ModuleList]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and _STACK_NAME.search(name) and len(module) >= 2
            and len({type(m) for m in module}) == 1 and any(True for _ in module.parameters())}


def _hidden(value):
    """The hidden state in a layer's output: the tensor itself, or the first element of a tuple."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value if isinstance(value, torch.Tensor) else None


def block_influence(model: nn.Module, lists: Dict[str, nn.ModuleList], batches: list) -> Dict[Tuple[str, int], float]:
    """{(stack, index): mean over tokens and batches of 1 - cos(layer input, layer output)}, for the
    layers that returned a hidden state of their input's shape on every batch (the others are absent)."""
    sums: Dict[Tuple[str, int], List[float]] = {}
    broken = set()

    def hook(key):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("hidden_states")
            y = _hidden(output)
            if not isinstance(x, torch.Tensor) or y is None or x.shape != y.shape:
                broken.add(key)
                return
            cos = nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]).double(),
                                                  y.reshape(-1, y.shape[-1]).double(), dim=-1)
            total = sums.setdefault(key, [0.0, 0])
            total[0] += float((1 - cos).sum())
            total[1] += cos.numel()
        return record

    handles = [layer.register_forward_hook(hook((name, i)), with_kwargs=True)
               for name, stack in lists.items() for i, layer in enumerate(stack)]
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            for batch in batches:
                call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {key: s / n for key, (s, n) in sums.items() if key not in broken and n}


def layer_stacks(model: nn.Module, example_inputs, data=None
                 ) -> Tuple[Dict[str, nn.ModuleList], Dict[Tuple[str, int], float]]:
    """The stacks of ``model`` (see the module docstring) whose every layer passed a hidden state of
    its input's shape on the calibration batches (``data``'s inputs, else the example inputs), and
    their layers' block influence, from that one pass. No pass at all when nothing is named like a stack."""
    lists = _named_lists(model)
    if not lists:
        return {}, {}
    if data is None:
        batches = [as_inputs(example_inputs)]
    else:
        batches = [x for x, _ in data_batches(data, targets=False, model=model)]
    influence = block_influence(model, lists, batches)
    stacks = {name: stack for name, stack in lists.items() if all((name, i) in influence for i in range(len(stack)))}
    return stacks, {key: value for key, value in influence.items() if key[0] in stacks}


def _configs(model: nn.Module) -> list:
    """Every distinct Hugging Face-style config object held by ``model`` or its submodules."""
    seen, out = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "to_dict"):
            seen.add(id(config))
            out.append(config)
    return out


def remove_stack_layers(model: nn.Module, stack: str, removed: List[int], config: bool = True) -> None:
    """Removes the layers at indices ``removed`` from the ModuleList ``stack``, renumbers the
    remaining layers' ``layer_idx`` and, with ``config``, rewrites the depth fields of the model's
    configs that held the old depth (and per-layer lists of that length, such as ``layer_types``)."""
    old = model.get_submodule(stack)
    depth = len(old)
    gone = set(removed)
    kept = [layer for i, layer in enumerate(old) if i not in gone]
    parent_name, _, attribute = stack.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, nn.ModuleList(kept))
    for index, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    for config in _configs(model) if config else ():
        for field in _DEPTH_FIELDS:
            if getattr(config, field, None) == depth:
                setattr(config, field, len(kept))
        for field, value in list(vars(config).items()):
            if isinstance(value, list) and len(value) == depth and field not in _DEPTH_FIELDS:
                setattr(config, field, [v for i, v in enumerate(value) if i not in gone])


def prune_stack_layers(model: nn.Module, stacks: Dict[str, nn.ModuleList], influence: Dict[Tuple[str, int], float],
                       sparsity: float, kept: Exclusion = Exclusion()) -> nn.Module:
    """Removes round(sparsity * layers) layers of ``stacks`` with the least block ``influence`` (from
    `layer_stacks`; excluded or frozen layers stay, and every stack keeps one layer); returns ``model``."""
    candidates = [key for key in influence if not kept.keeps_block(stacks[key[0]][key[1]])]
    count = int(math.floor(sparsity * sum(len(s) for s in stacks.values()) + 0.5))
    left = {name: len(stack) for name, stack in stacks.items()}
    removed: Dict[str, List[int]] = {name: [] for name in stacks}
    for name, index in sorted(candidates, key=lambda key: influence[key]):  # stable: model order among equals
        if count == 0:
            break
        if left[name] > 1:
            removed[name].append(index)
            left[name] -= 1
            count -= 1
    one = len(stacks) == 1  # with two stacks (encoder-decoder) one depth field cannot describe both
    if not one and any(removed.values()) and _configs(model):
        warnings.warn("granularity='layer': the model has several layer stacks " + str(list(stacks)) + "; its "
                      "config is left as it is (one depth field cannot describe them): reload with tp.load",
                      stacklevel=4)
    for name, indices in removed.items():
        if indices:
            remove_stack_layers(model, name, sorted(indices), config=one)
            record_step(model, {"kind": "stack_layers", "stack": name, "removed": sorted(indices),
                                "depth": len(stacks[name]), "config": one})
    return model

