"""What every pruning entry point checks and resolves before it touches a model.

`tp.prune` (oneshot.py), `tp.Pruner` (pruner.py, channel_pruner.py), `tp.sensitivity`,
`tp.regularize` and the structural branch (structured/) take the same arguments; this module is
the one place that says what they mean, so every entry point refuses a bad value with the same
message, naming the argument, before anything changes:

* amounts: `check_sparsity_value`, `check_amount` (exactly one of sparsity / threshold / dict scope /
  N:M), `check_target` (a Pruner's ``target_sparsity`` against its schedule);
* ``granularity``: `parse_granularity` ("weight" or "N:M"; `STRUCTURAL` names the physical ones),
  `check_n_m_divides`;
* ``scope``, ``exclude`` and ``freeze``: `check_scope`, `excluded_ids`, `refuse_freeze`,
  `target_layers` (the layers to prune by name, dict-scope keys resolved to those names),
  `weight_owners` (tied weights), `leave_out_tied` (layers tied to a module that is never pruned,
  such as a tied output layer);
* ``data`` / ``loss_fn``: `check_data_args`, `refuse_unused_data`;
* weights and scores: `check_finite_weights`, `checked_score` (shape, dtype, NaN/Inf), and
  `current_mask`.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from typing import Dict, Iterable, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from . import selection
from .importance import Importance
from .masking import PRUNABLE_TYPES, base_type, get_mask, is_prunable, prunable_layers
from .schedules import Schedule

__all__ = [
    "SCOPES", "STRUCTURAL", "GRANULARITY_HELP", "parse_granularity", "check_sparsity_value", "check_scope",
    "check_dict_scope", "check_amount", "check_target", "excluded_ids", "target_layers", "leave_out_tied",
    "weight_owners",
    "check_n_m_divides", "parse_block", "check_blocks_divide", "DEFAULT_BLOCK_ROWS",
    "check_data_args", "refuse_unused_data", "nonfinite", "check_finite_weights", "checked_score",
    "current_mask", "refuse_freeze",
]

SCOPES = ("layer", "global")
#: Granularities that remove parts of the model physically (structured/), not by masks.
STRUCTURAL = ("channel", "head", "layer")
GRANULARITY_HELP = "'weight', 'N:M' with 0 < N < M (e.g. '2:4'), or 'block:Rx1' (e.g. 'block:8x1'; 'block' is 4x1)"
#: Output rows per block of granularity="block": 4x1 ran faster than 8x1 at 128-512 token rows on most
#: transformer layer shapes (bench_linear, docs/kernels.md), and costs less accuracy.
DEFAULT_BLOCK_ROWS = 4
_BLOCK = re.compile(r"\s*block\s*(?::\s*(\d+)\s*x\s*(\d+)\s*)?")

NM = Tuple[int, int]


def parse_block(granularity) -> Optional[int]:
    """R for "block:Rx1" ("block": :data:`DEFAULT_BLOCK_ROWS`), None for any other granularity.

    A block is R consecutive output rows (channels) by one input column: it is kept or pruned whole,
    which is what the block-sparse kernel (``tp.nn.SparseLinear`` in "bsr" format) needs."""
    if not isinstance(granularity, str):
        return None
    match = _BLOCK.fullmatch(granularity)
    if match is None:
        if granularity.strip().startswith("block"):
            raise ValueError(f"`granularity` must be {GRANULARITY_HELP}, got {granularity!r}")
        return None
    if match.group(1) is None:
        return DEFAULT_BLOCK_ROWS
    rows, cols = int(match.group(1)), int(match.group(2))
    if cols != 1 or rows < 1:
        raise ValueError(f"`granularity` blocks must be Rx1 with R >= 1 (R output rows by one input column, "
                         f"the shape the block-sparse kernel multiplies), got {granularity!r}")
    return rows


def parse_granularity(granularity) -> Optional[NM]:
    """None for "weight" and "block:Rx1" (see `parse_block`), (N, M) for "N:M" (callers send
    `STRUCTURAL` granularities elsewhere first)."""
    if not isinstance(granularity, str):
        raise TypeError(f"`granularity` must be a string, {GRANULARITY_HELP}, got {type(granularity).__name__}")
    if granularity == "weight" or parse_block(granularity) is not None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", granularity)
    if match is None:
        raise ValueError(f"`granularity` must be {GRANULARITY_HELP}, got {granularity!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"`granularity` N:M needs 0 < N < M, got {granularity!r}")
    return n, m


def check_sparsity_value(value, what: str) -> None:
    """``value`` is a real number in [0, 1); ``what`` names it in the error, e.g. "`sparsity`"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number in [0, 1), got {type(value).__name__}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {value}")


def check_scope(scope, allow_dict: bool = True, context: str = "") -> None:
    """``scope`` is "layer" or "global", or (where ``allow_dict``) a dict {layer name: sparsity}
    whose values `check_dict_scope` checks; ``context`` says why a dict is not allowed."""
    if allow_dict and isinstance(scope, Mapping):
        return
    if not isinstance(scope, str) or scope not in SCOPES:
        if allow_dict:
            raise ValueError(f"`scope` must be one of {list(SCOPES)} or a dict {{module_name: sparsity}}, "
                             f"got {scope!r}")
        raise ValueError(f"`scope` must be 'layer' or 'global' for {context}, got {scope!r}")


def check_dict_scope(scope: Mapping) -> None:
    """Every key of a dict ``scope`` is a name and every value a sparsity in [0, 1)."""
    for name, value in scope.items():
        if not isinstance(name, str):
            raise TypeError(f"`scope` keys must be module names (str), got {type(name).__name__}")
        check_sparsity_value(value, f"`scope[{name!r}]`")


def check_amount(sparsity, threshold, scope, n_m: Optional[NM]) -> None:
    """Exactly one of sparsity / threshold / dict scope / N:M says how much to prune."""
    if isinstance(scope, Mapping):
        if sparsity is not None or threshold is not None:
            raise ValueError("with a dict `scope` the per-layer sparsities come from it: "
                             "pass neither `sparsity` nor `threshold`")
        if n_m is not None:
            raise ValueError("`scope` must be 'layer' for N:M granularity (choose layers with `exclude`), got a dict")
        check_dict_scope(scope)
        return
    check_scope(scope)
    if n_m is not None:
        n, m = n_m
        if threshold is not None:
            raise ValueError("`threshold` cannot be combined with N:M granularity (N:M fixes the sparsity at 1 - N/M)")
        if scope != "layer":
            raise ValueError(f"`scope` must be 'layer' for N:M granularity, got {scope!r}")
        if sparsity is not None:
            check_sparsity_value(sparsity, "`sparsity`")
            if abs(float(sparsity) - (1 - n / m)) > 1e-9:
                raise ValueError(f"`sparsity` must be None or {1 - n / m} for {n}:{m} granularity, got {sparsity}")
        return
    if (sparsity is None) == (threshold is None):
        raise ValueError("pass exactly one of `sparsity` (a fraction in [0, 1)) or `threshold` (an absolute score)")
    if sparsity is not None:
        check_sparsity_value(sparsity, "`sparsity`")
    elif isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"`threshold` must be a finite real number, got {type(threshold).__name__}")
    elif not math.isfinite(threshold):
        raise ValueError(f"`threshold` must be a finite real number, got {threshold}")


def check_target(target, schedule: Schedule, n_m: Optional[NM]) -> float:
    """A Pruner's final sparsity: ``target`` or the schedule's ``final`` (or 1 - N/M), which must agree."""
    if target is None and schedule.final is None and n_m is not None:
        target = 1 - n_m[0] / n_m[1]  # N:M fixes the final sparsity
    if target is None:
        if schedule.final is None:
            raise ValueError("pass `target_sparsity`, or a schedule with `final` set")
        target = schedule.final
    check_sparsity_value(target, "`target_sparsity`")
    if schedule.final is not None and abs(schedule.final - float(target)) > 1e-12:
        raise ValueError(f"`schedule` ends at final={schedule.final} but `target_sparsity` is {target}: "
                         "make them agree")
    if n_m is not None and abs(float(target) - (1 - n_m[0] / n_m[1])) > 1e-9:
        raise ValueError(f"`target_sparsity` must be {1 - n_m[0] / n_m[1]} for {n_m[0]}:{n_m[1]} granularity, "
                         f"got {target}")
    return float(target)


def excluded_ids(model: nn.Module, exclude, argument: str = "exclude") -> Set[int]:
    """Ids of the modules ``exclude`` names (names, modules or module types); each stands for its
    whole subtree (a type: every instance's, so ``exclude=[Attention]`` covers its projections).
    ``argument`` names the argument in errors (``freeze`` takes the same forms)."""
    items = _module_items(exclude, argument)
    named = dict(model.named_modules(remove_duplicate=False))  # a module may have several names
    members = {id(m) for m in named.values()}
    excluded: Set[int] = set()
    for item in items:
        if isinstance(item, str):
            if item not in named:
                raise ValueError(f"`{argument}` names no module of the model: {item!r}")
            excluded.update(id(m) for m in named[item].modules())
        elif isinstance(item, nn.Module):
            if id(item) not in members:
                raise ValueError(f"`{argument}` holds a {type(item).__name__} that is not part of the model")
            excluded.update(id(m) for m in item.modules())
        elif isinstance(item, type) and issubclass(item, nn.Module):
            excluded.update(id(sub) for m in named.values() if issubclass(base_type(m), item) or isinstance(m, item)
                            for sub in m.modules())
        else:
            raise TypeError(f"`{argument}` items must be module names, modules or nn.Module types, got {item!r}")
    return excluded


def refuse_freeze(freeze, granularity) -> None:
    """``freeze`` is empty: it keeps whole the channel groups (heads, blocks) of structural pruning,
    and with masks ``exclude`` already leaves a layer untouched."""
    if _module_items(freeze, "freeze"):
        raise ValueError(f"`freeze` applies to structural pruning (granularity 'channel', 'head' or 'layer'), "
                         f"got granularity={granularity!r}: use `exclude`, which leaves a layer's weights untouched")


def _module_items(exclude, argument: str) -> list:
    """``exclude`` (None, one item or an iterable of names, modules and module types) as a list."""
    if isinstance(exclude, (str, nn.Module, type)):
        return [exclude]
    if exclude is None:
        return []
    try:
        return list(exclude)
    except TypeError:
        raise TypeError(f"`{argument}` must be module names, modules or module types, "
                        f"got {type(exclude).__name__}") from None


def target_layers(model: nn.Module, exclude: Iterable, scope):
    """The layers to prune by name, and the scope with dict keys turned into those names.

    Names are ``named_modules()`` names; a module registered under several names (an alias such
    as ``self.classifier = self.fc``) may be named by any of them.
    """
    excluded = excluded_ids(model, exclude)
    candidates = prunable_layers(model)
    layers = {name: m for name, m in candidates.items() if id(m) not in excluded}
    if isinstance(scope, Mapping):
        if not scope:
            raise ValueError("`scope` must name at least one layer when it is a dict, got {}")
        scope = _resolved_scope(model, scope, candidates, layers)
        layers = {name: m for name, m in layers.items() if name in scope}  # model order, not dict order
    if not layers:
        kinds = ", ".join(t.__name__ for t in PRUNABLE_TYPES)
        raise ValueError(f"`model` has no prunable layer ({kinds}) left after `exclude`")
    return layers, scope


def _resolved_scope(model: nn.Module, scope: Mapping, candidates: Dict[str, nn.Module],
                    layers: Dict[str, nn.Module]) -> Dict[str, float]:
    """A dict scope keyed by each layer's canonical name (the one `prunable_layers` gives)."""
    canonical = {id(m): name for name, m in candidates.items()}
    every_name = dict(model.named_modules(remove_duplicate=False))
    resolved: Dict[str, float] = {}
    for key, value in scope.items():
        name = canonical.get(id(every_name.get(key)))
        if name is None:
            raise ValueError(f"`scope` key {key!r} is not a prunable layer of the model; "
                             f"prunable layers: {list(candidates)}")
        if name not in layers:
            raise ValueError(f"`scope` key {key!r} is also excluded by `exclude`")
        if resolved.setdefault(name, value) != value:
            raise ValueError(f"`scope` gives layer {name!r} two sparsities under two of its names")
    return resolved


def weight_owners(model: nn.Module, layers: Dict[str, nn.Module], scope) -> Dict[str, str]:
    """For each target layer, the first target layer holding the same weight tensor (tied weights).

    Pruning a weight changes every module that holds it, so a weight shared with any module that
    is not pruned now (an unpruned layer, a tied embedding) is refused; so are different dict-scope
    sparsities for one weight.
    """
    by_weight: Dict[int, str] = {}
    owners = {}
    for name, layer in layers.items():
        owners[name] = by_weight.setdefault(id(layer.weight), name)
        if isinstance(scope, Mapping) and scope[name] != scope[owners[name]]:
            raise ValueError(f"`scope` gives layers {owners[name]!r} and {name!r} different sparsities, "
                             "but they share one weight tensor")
    targets = {id(layer) for layer in layers.values()}
    for name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            owner = by_weight.get(id(param))
            if owner is not None and not (id(module) in targets and param_name == "weight"):
                what = f"{type(module).__name__} {name or '<model>'!r} shares its {param_name} with layer {owner!r}"
                if is_prunable(module):
                    raise ValueError(f"{what}, which pruning would change under it: prune both or neither "
                                     "(`exclude` or `scope` splits them)")
                raise ValueError(f"{what}, which pruning would change under it: leave {owner!r} out of `scope` "
                                 f"or untie it first ({_UNTIE})")
    return owners


#: How to give a tied layer a weight of its own, for messages.
_UNTIE = "give it its own copy: `layer.weight = nn.Parameter(layer.weight.detach().clone())`"


def leave_out_tied(model: nn.Module, layers: Dict[str, nn.Module], scope, stacklevel: int) -> Dict[str, nn.Module]:
    """``layers`` less those whose weight a module that is never pruned also holds, with one
    UserWarning naming them (``stacklevel`` counts from the caller).

    The usual case is a tied output layer: GPT-2's ``lm_head`` holds the token embedding's weight,
    and pruning it would prune the embedding too. A dict ``scope`` names its layers on purpose, so
    it gets ``layers`` whole and `weight_owners` refuses the tie; so does a weight shared with a
    prunable layer that `exclude` left out (the arguments split the tie). Raises the "no prunable
    layer" error, with the reason, when no layer is left.
    """
    if isinstance(scope, Mapping):
        return layers
    by_weight: Dict[int, list] = {}
    for name, layer in layers.items():
        by_weight.setdefault(id(layer.weight), []).append(name)
    holders: Dict[str, str] = {}  # target layer -> the module that also holds its weight
    for name, module in model.named_modules(remove_duplicate=False):
        if is_prunable(module):
            continue
        for param in module.parameters(recurse=False):
            for target in by_weight.get(id(param), ()):
                holders.setdefault(target, f"{type(module).__name__} {name or '<model>'!r}")
    if not holders:
        return layers
    reasons = "; ".join(f"{holder} shares its weight with layer {target!r}" for target, holder in holders.items())
    kept = {name: layer for name, layer in layers.items() if name not in holders}
    if not kept:
        kinds = ", ".join(t.__name__ for t in PRUNABLE_TYPES)
        raise ValueError(f"`model` has no prunable layer ({kinds}) left after `exclude` once tied layers are left out: "
                         f"{reasons}, which pruning would change under it; to prune a tied layer, untie it first "
                         f"({_UNTIE})")
    names = ", ".join(repr(name) for name in holders)
    warnings.warn(f"{'layer' if len(holders) == 1 else 'layers'} {names} left unpruned: {reasons}, which pruning "
                  f"would change under it. To prune such a layer, untie it first ({_UNTIE}); to leave it "
                  "unpruned without this warning, pass it in `exclude`", UserWarning, stacklevel=stacklevel + 1)
    return kept


def _input_size(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels // layer.groups


def check_n_m_divides(layers: Dict[str, nn.Module], n_m: NM) -> None:
    """M divides the input size of every layer (N:M groups run along the input dimension)."""
    n, m = n_m
    for name, layer in layers.items():
        size = _input_size(layer)
        if size % m:
            raise ValueError(
                f"`granularity` {n}:{m} needs M={m} to divide the input size of every layer; layer {name!r} "
                f"({base_type(layer).__name__}) has input size {size}; exclude it or choose another M"
            )


def check_blocks_divide(layers: Dict[str, nn.Module], rows: int, criterion: Importance) -> None:
    """Block granularity: R divides the output size of every layer, and the criterion scores weights
    (a reconstructing one, SparseGPT, decides and updates weight by weight)."""
    if getattr(criterion, "reconstructs", False):
        raise ValueError(f"`granularity` block:{rows}x1 needs a scoring importance (magnitude, wanda, taylor, ...): "
                         f"{criterion!r} reconstructs weight by weight and cannot keep whole blocks")
    for name, layer in layers.items():
        size = layer.weight.shape[0]
        if size % rows:
            raise ValueError(
                f"`granularity` block:{rows}x1 needs R={rows} to divide the output size of every layer; layer "
                f"{name!r} ({base_type(layer).__name__}) has {size} outputs; exclude it or choose another R"
            )


def check_data_args(data, loss_fn, importance, requires_loss: bool = True, note: str = "") -> None:
    """A data-driven criterion got ``data`` (and, if it ``requires_loss``, a callable ``loss_fn``);
    ``note`` ends the message with what the entry point does with them."""
    if not requires_loss and data is None:
        raise ValueError(f"importance {importance!r} is data-driven: "
                         f"pass `data` (batches of (inputs, targets) or inputs){note}")
    if not requires_loss:
        return
    if data is None or loss_fn is None:
        missing = " and ".join(f"`{a}`" for a, v in (("data", data), ("loss_fn", loss_fn)) if v is None)
        raise ValueError(f"importance {importance!r} is data-driven: "
                         f"pass {missing} (batches of (inputs, targets) and a loss function){note}")
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")


def refuse_unused_data(data, loss_fn, importance) -> None:
    """A criterion that is not data-driven got no ``data`` / ``loss_fn`` (they would be ignored)."""
    if data is not None or loss_fn is not None:
        raise ValueError(f"`data`/`loss_fn` are for data-driven criteria; importance {importance!r} does not use them")


def nonfinite(tensor: torch.Tensor, where: Optional[torch.Tensor] = None) -> Optional[str]:
    """None when every entry (of ``where``, if given) is finite, else what was found and where.

    The common case costs one reduction and no layer-sized temporary: a sum is finite only if
    every entry is (an overflowing sum just falls through to the exact count, done in row blocks).
    """
    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
        return None
    counts = {"NaN": 0, "+Inf": 0, "-Inf": 0}
    first = None
    rows = tensor.shape[0]
    for r0, r1 in selection.row_blocks(tensor.numel(), rows):
        block = tensor[r0:r1]
        bad = ~torch.isfinite(block)
        if where is not None:
            bad &= where[r0:r1].to(bad.device)
        if not bool(bad.any()):
            continue
        counts["NaN"] += int((bad & block.isnan()).sum())
        counts["+Inf"] += int((bad & block.isposinf()).sum())
        counts["-Inf"] += int((bad & block.isneginf()).sum())
        if first is None:
            index = [int(i) for i in bad.nonzero()[0]]
            first = [index[0] + r0] + index[1:]
    if first is None:
        return None
    found = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    return f"{found} of {tensor.numel()} entries (the first at index {first})"


def check_finite_weights(layers: Dict[str, nn.Module]) -> None:
    """Raises before anything runs if a layer's (unpruned) weights hold NaN or Inf: no ranking of
    such a layer means anything, and its outputs are already broken."""
    for name, layer in layers.items():
        found = nonfinite(layer.weight.detach(), get_mask(layer))
        if found:
            raise ValueError(
                f"layer {name!r} ({base_type(layer).__name__}) has non-finite weights: {found}; fix or reload "
                "the weights (or exclude the layer with `exclude`) before pruning; nothing was changed"
            )


def checked_score(criterion: Importance, name: str, layer: nn.Module,
                  kept: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The criterion's scores for ``layer``, checked: the weight's shape, and finite (NaN or Inf
    scores, from gradients or calibration data, would rank arbitrarily) where ``kept`` (the current
    mask) keeps the weight: already pruned weights are never ranked, as for the weights' check."""
    scores = criterion(layer)
    if not isinstance(scores, torch.Tensor) or scores.shape != layer.weight.shape:
        got = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"importance {criterion!r} returned {got} for layer {name!r}; "
                         f"expected the weight's shape {list(layer.weight.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"importance {criterion!r} returned {scores.dtype} scores for layer {name!r}; "
                        "expected a float tensor")
    found = nonfinite(scores.detach(), kept)
    if found:
        source = "its weights, gradients or calibration data"
        raise ValueError(
            f"importance {criterion!r} gave non-finite scores for layer {name!r}: {found}; they come from {source} "
            "(NaN/Inf cannot be ranked); nothing was changed"
        )
    return scores


def current_mask(layer: nn.Module) -> torch.Tensor:
    """The layer's mask, or an all-true one when it has none."""
    mask = get_mask(layer)
    return mask if mask is not None else torch.ones_like(layer.weight, dtype=torch.bool)
