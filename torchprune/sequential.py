"""Layer-by-layer (sequential) calibration: a model's repeated blocks pruned one after another, each
on the inputs that the already pruned blocks before it produce.

Pruning a pretrained transformer in one pass scores every layer on the dense model's activations,
so block 10 is calibrated for inputs that pruned blocks 0-9 no longer produce. SparseGPT and Wanda
(both reference implementations) calibrate block by block instead; so does `tp.prune(...,
sequential=True)` for every data-driven criterion:

* `find_blocks`: the repeated blocks, the largest ``nn.ModuleList`` / ``nn.Sequential`` whose
  children are two or more modules of one class (a transformer's layers), or the ``blocks=`` given;
* `plan`: one traced forward of the first batch puts each target layer in a stage (the head, run
  before block 0; its block; the tail) and checks the chain: block k+1 receives block k's output
  (its first element) unchanged in one argument, and every other argument (attention masks,
  position embeddings) the same as block 0. When there are no blocks it says so in a warning and
  the caller calibrates in one pass;
* `run`, when the chain holds: forward criteria capture block 0's inputs once (every positional
  and keyword argument), then for each block collect statistics, let the caller prune that
  block's layers, and recompute the block's outputs with the pruned weights as the next block's
  inputs. Only one block's statistics exist at a time; captured activations move to the CPU when
  the model is on a GPU.
* `run`, otherwise: each stage is calibrated on full passes of the model with the stages before
  it already pruned (stopped after the stage's block when every block runs once, in order). The
  same statistics, at the cost of running the blocks before each stage again. Gradient criteria
  always take this way, with backward passes: their loss needs the whole model.

This module does not decide how a layer is pruned: `run` hands each stage's layers to a callback.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .calibration import batches, call, observe_activations, observe_gradients
from .masking import is_prunable
from .state import hooked_eval

__all__ = ["Stage", "Plan", "find_blocks", "plan", "run"]


@dataclass
class Stage:
    """The target layers pruned together: the ``"head"``, one block (``block`` set), or the ``"tail"``."""

    name: str
    layers: Dict[str, nn.Module] = field(default_factory=dict)
    block: Optional[nn.Module] = None


@dataclass
class Plan:
    """The stages in the order they run, and where a block's call holds its input (``slot``:
    a positional index or a keyword; None when the blocks cannot be chained, ``problem`` saying
    why: then every stage is calibrated on full passes). ``in_order``: every block ran once, in
    order, so a pass may stop after a stage's block."""

    stages: List[Stage]
    slot: Union[int, str, None]
    problem: Optional[str] = None
    in_order: bool = True


def find_blocks(model: nn.Module, blocks: Union[None, str, Sequence[str]] = None) -> List[Tuple[str, nn.Module]]:
    """The repeated blocks of ``model`` by name, in order (empty when none are found).

    ``blocks`` may name a ``ModuleList``/``Sequential`` (its children are the blocks) or list the
    blocks' names; None finds the container with the most children of one class that hold a
    prunable layer (ties: the one with more parameters)."""
    if blocks is None:
        return _detected_blocks(model)
    named = dict(model.named_modules())
    names = [blocks] if isinstance(blocks, str) else blocks
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"`blocks` must be a module name or a list of module names, got {type(blocks).__name__}")
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"`blocks` names no module of the model: {missing}")
    if isinstance(blocks, str):
        container = named[blocks]
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            raise ValueError(f"`blocks` must name an nn.ModuleList or nn.Sequential (or list the blocks' names), "
                             f"got {blocks!r}, a {type(container).__name__}")
        prefix = f"{blocks}." if blocks else ""
        return [(prefix + child, module) for child, module in container.named_children()]
    if len(set(names)) != len(names):
        raise ValueError("`blocks` lists a module twice")
    return [(n, named[n]) for n in names]


def _detected_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    best, best_key = [], (0, 0)
    for name, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(container.named_children())
        if len(children) < 2 or len({type(child) for _, child in children}) != 1:
            continue
        if not any(is_prunable(m) for _, child in children for m in child.modules()):
            continue
        key = (len(children), sum(p.numel() for p in container.parameters()))
        if key > best_key:
            prefix = f"{name}." if name else ""
            best, best_key = [(prefix + child_name, child) for child_name, child in children], key
    return best


def _first_tensor(output) -> Optional[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _same(a, b) -> bool:
    """Whether two arguments of block calls are the same value (the object, or equal tensors)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # an object without a usable ==: only itself is the same
        return False


def _trace(model: nn.Module, blocks: List[Tuple[str, nn.Module]], layers: Dict[str, nn.Module], inputs):
    """One forward on ``inputs``: the ordered events (block enter / exit with arguments, layer calls)."""
    events: List[Tuple] = []
    handles = []
    for index, (_, block) in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kwargs, i=index: events.append(("enter", i, args, kwargs)), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, args, out, i=index: events.append(("exit", i, out))))
    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(lambda m, args, n=name: events.append(("layer", n))))
    with hooked_eval(model, handles):
        call(model, inputs)
    return events


def _stages(blocks, layers, events) -> Tuple[List[Stage], List[Tuple], Optional[str]]:
    """Each target layer in its stage, the block calls (enter args, kwargs, output) and any problem."""
    head, tail = Stage("head"), Stage("tail")
    stages = [Stage(name, block=block) for name, block in blocks]
    members = [{id(m) for m in block.modules()} for _, block in blocks]
    where: Dict[str, Stage] = {}
    calls: List[List] = [[] for _ in blocks]
    active, done, problem = None, 0, None
    for event in events:
        if event[0] == "enter":
            if active is not None or event[1] != done:
                problem = problem or f"block {blocks[event[1]][0]!r} ran out of order or more than once"
            active = event[1]
            calls[event[1]].append([event[2], event[3], None])
        elif event[0] == "exit":
            calls[event[1]][-1][2] = event[2]
            active, done = None, event[1] + 1
        else:
            name = event[1]
            if active is not None and id(layers[name]) in members[active]:
                stage = stages[active]
            else:
                stage = head if done == 0 and active is None else tail
            if where.setdefault(name, stage) is not stage:
                where[name] = tail  # called in two stages (a shared layer): pruned last
    if any(len(c) != 1 for c in calls):
        problem = problem or "a block did not run exactly once per forward"
    for name, layer in layers.items():
        where.get(name, tail).layers[name] = layer  # never called: the tail's pass says so
    return [head, *stages, tail], [tuple(c[0]) for c in calls if c], problem


def _chain_slot(blocks, calls) -> Tuple[Union[int, str, None], Optional[str]]:
    """Where each block receives the previous block's output, or why the chain does not hold."""
    if len(calls) != len(blocks):
        return None, "a block did not run"
    if len(calls) == 1:  # nothing to chain: the block's first tensor argument is its input
        args, kwargs, _ = calls[0]
        found = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)), None)
        if found is None:
            found = next((key for key, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
        return found, None if found is not None else "the block takes no tensor argument"
    slot = None
    for k in range(1, len(calls)):
        (args, kwargs, _), (_, _, previous) = calls[k], calls[k - 1]
        hidden = _first_tensor(previous)
        if hidden is None:
            return None, f"block {blocks[k - 1][0]!r} returns {type(previous).__name__}, not a tensor or tuple"
        found = next((i for i, a in enumerate(args) if a is hidden), None)
        if found is None:
            found = next((key for key, v in kwargs.items() if v is hidden), None)
        if found is None or (slot is not None and found != slot):
            return None, f"block {blocks[k][0]!r} does not receive block {blocks[k - 1][0]!r}'s output unchanged"
        slot = found
    args0, kwargs0, _ = calls[0]
    for k in range(1, len(calls)):
        args, kwargs, _ = calls[k]
        if len(args) != len(args0) or set(kwargs) != set(kwargs0):
            return None, f"block {blocks[k][0]!r} is called with other arguments than block {blocks[0][0]!r}"
        for key in [*range(len(args)), *kwargs]:
            a, b = (args[key], args0[key]) if isinstance(key, int) else (kwargs[key], kwargs0[key])
            if key != slot and not _same(a, b):
                return None, f"block {blocks[k][0]!r} gets another argument {key!r} than block {blocks[0][0]!r}"
    return slot, None


def plan(model: nn.Module, layers: Dict[str, nn.Module], data: Iterable, blocks=None) -> Optional[Plan]:
    """The stages for pruning ``layers`` block by block, or None (with a warning saying why) when
    ``model`` has no repeated blocks. An explicit but invalid ``blocks`` raises."""
    found = find_blocks(model, blocks)
    if not found:
        warnings.warn("sequential calibration: no repeated blocks found (an nn.ModuleList/nn.Sequential of modules "
                      "of one class); calibrating in one pass. Name them with `blocks=`", stacklevel=5)
        return None
    first = next(iter(batches(data, targets=False, model=model)), None)
    if first is None:
        raise ValueError("`data` yielded no batches")
    events = _trace(model, found, layers, first[0])
    stages, calls, problem = _stages(found, layers, events)
    slot, chain_problem = (None, problem) if problem else _chain_slot(found, calls)
    return Plan(stages, slot, chain_problem, in_order=problem is None)


def _to(value, device: Optional[torch.device]):
    """``value`` (tensors nested in tuples/lists/dicts) on ``device`` (None: as it is)."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if type(value) in (tuple, list):
        return type(value)(_to(v, device) for v in value)
    if type(value) is dict:
        return {k: _to(v, device) for k, v in value.items()}
    return value


class _Captured(Exception):
    """Raised by block 0's pre-hook once its inputs are stored: the rest of the forward is not needed."""


def _passes_stopped(model: nn.Module, data: Iterable, handles: List) -> None:
    """One observation-only forward per batch of ``data`` with the hooks behind ``handles``; a hook
    may end a pass early by raising `_Captured` (the rest of that forward is not needed)."""
    with hooked_eval(model, handles):
        for inputs, _ in batches(data, targets=False, model=model):
            try:
                call(model, inputs)
            except _Captured:
                pass


def _capture(model: nn.Module, block: nn.Module, data: Iterable, offload: bool) -> List[Tuple[tuple, dict]]:
    """Block 0's positional and keyword arguments for every batch of ``data`` (on the CPU if ``offload``)."""
    captured: List[Tuple[tuple, dict]] = []
    cpu = torch.device("cpu") if offload else None

    def stop(module, args, kwargs):
        captured.append((_to(tuple(args), cpu), _to(dict(kwargs), cpu)))
        raise _Captured

    _passes_stopped(model, data, [block.register_forward_pre_hook(stop, with_kwargs=True)])
    return captured


def _observe_up_to(model: nn.Module, stage: Stage, criterion, data: Iterable, may_stop: bool) -> None:
    """A stage's statistics from forward passes of ``model``, each stopped once the stage's block
    has run (when ``may_stop``; the head and tail take whole passes)."""
    def stop(module, args, output):
        raise _Captured

    handles = [layer.register_forward_hook(criterion.observe_forward) for layer in stage.layers.values()]
    if may_stop and stage.block is not None:
        handles.append(stage.block.register_forward_hook(stop))
    _passes_stopped(model, data, handles)
    _check_observed(stage, criterion)


def _check_observed(stage: Stage, criterion) -> None:
    silent = [name for name, layer in stage.layers.items() if not criterion.observed(layer)]
    if silent:
        where = f"block {stage.name!r}" if stage.block is not None else "the forward"
        raise ValueError(f"layers {silent} were not called by {where} on `data`: exclude them with `exclude`")


def _device_of(module: nn.Module) -> Optional[torch.device]:
    tensor = next(iter(module.parameters()), None)
    return None if tensor is None else tensor.device


def _with_input(args: tuple, kwargs: dict, slot, value) -> Tuple[tuple, dict]:
    if isinstance(slot, int):
        return args[:slot] + (value,) + args[slot + 1:], kwargs
    return args, {**kwargs, slot: value}


def run(model: nn.Module, the_plan: Plan, criterion, data: Iterable, loss_fn: Optional[Callable],
        prune_stage: Callable[[Dict[str, nn.Module]], None]) -> None:
    """Calibrates and prunes stage by stage: ``prune_stage(layers)`` prunes a stage's layers from
    the statistics ``criterion`` holds for them (it is reset before each stage)."""
    stages = the_plan.stages
    if criterion.requires_loss or the_plan.slot is None:  # full passes, the stages before pruned
        for stage in stages:
            if stage.layers:
                criterion.reset()
                if criterion.requires_loss:  # the loss needs the whole model
                    observe_gradients(model, stage.layers, criterion, data, loss_fn)
                else:
                    _observe_up_to(model, stage, criterion, data, the_plan.in_order)
                prune_stage(stage.layers)
        return
    head, blocks, tail = stages[0], stages[1:-1], stages[-1]
    if head.layers:
        criterion.reset()
        observe_activations(model, head.layers, criterion, data)
        prune_stage(head.layers)
    device = _device_of(model)
    offload = device is not None and device.type != "cpu"
    inputs = _capture(model, blocks[0].block, data, offload)
    last = max((i for i, s in enumerate(blocks) if s.layers), default=-1)
    for stage in blocks[: last + 1]:
        inputs = _block_stage(stage, criterion, inputs, the_plan.slot, device if offload else None, prune_stage)
    del inputs
    if tail.layers:
        criterion.reset()
        observe_activations(model, tail.layers, criterion, data)
        prune_stage(tail.layers)


def _block_stage(stage: Stage, criterion, inputs: List[Tuple[tuple, dict]], slot, device,
                 prune_stage: Callable[[Dict[str, nn.Module]], None]) -> List[Tuple[tuple, dict]]:
    """One block: statistics on its captured inputs (moved to ``device`` when offloaded), its
    layers pruned by ``prune_stage``, and its outputs with the pruned weights as the next inputs."""
    block = stage.block
    if stage.layers:
        criterion.reset()
        handles = [layer.register_forward_hook(criterion.observe_forward) for layer in stage.layers.values()]
        with hooked_eval(block, handles):
            for args, kwargs in inputs:
                block(*_to(args, device), **_to(kwargs, device))
        _check_observed(stage, criterion)
        prune_stage(stage.layers)
        criterion.reset()  # this block's statistics are spent: free them before its outputs are made
    outputs = []
    with hooked_eval(block, []):
        for args, kwargs in inputs:
            hidden = _first_tensor(block(*_to(args, device), **_to(kwargs, device)))
            cpu = torch.device("cpu") if device is not None else None
            outputs.append(_with_input(args, kwargs, slot, _to(hidden, cpu)))
    return outputs

