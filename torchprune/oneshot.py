"""prune(): one-shot pruning of a model's layers with masks.

Every argument is checked before anything is touched, and the data-driven scoring pass restores the
model's gradients and train/eval mode, so a call that raises leaves the model exactly as it was.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from . import selection
from .calibration import observe
from .importance import Importance, Magnitude, resolve
from .masking import PRUNABLE_TYPES, attach_mask, base_type, check_supported, get_mask, prunable_layers

__all__ = ["prune", "Pruner"]

_SCOPES = ("layer", "global")
_STRUCTURAL = ("channel", "head", "layer")
_GRANULARITY_HELP = "'weight' or 'N:M' with 0 < N < M (e.g. '2:4')"


def prune(
    model: nn.Module,
    sparsity: Optional[float] = None,
    threshold: Optional[float] = None,
    importance: Union[str, Importance] = "magnitude",
    granularity: str = "weight",
    scope: Union[str, Mapping[str, float]] = "layer",
    exclude: Iterable = (),
    example_inputs=None,
    data: Optional[Iterable] = None,
    loss_fn: Optional[Callable] = None,
    round_to: Optional[int] = None,
) -> nn.Module:
    """Masks the least important weights of every Linear/Conv1d/Conv2d layer; returns ``model``.

    ``sparsity`` is the fraction of weights pruned (per layer with ``scope="layer"``, over all
    layers together with ``scope="global"``, or per named layer with a dict scope); ``threshold``
    prunes every weight whose score is below it instead. ``granularity="N:M"`` keeps the N best of
    each M consecutive weights along the input dimension. Already pruned weights stay pruned.
    ``granularity="channel" | "head" | "layer"`` removes whole channels, attention heads or
    residual blocks physically (see `torchprune.structured`); it needs ``example_inputs``, and
    with "channel", ``round_to=k`` makes every group keep a multiple of k channels.

    Odd inputs: NaN/Inf in a layer's weights or scores raises a ValueError naming the layer and
    what was found, before anything changes; a ratio never empties a layer (at least one weight
    stays, each layer's best under ``scope="global"``), only an explicit ``threshold`` may; layers
    tied to one weight share one mask object; zero-size layers get empty masks; meta tensors are
    refused. Memory: besides the new bool masks, magnitude scores are made in blocks of rows and
    ranked without sorting (`selection`), so the peak stays well under the model's size.

    >>> model = tp.prune(model, sparsity=0.9, scope="global")
    >>> tp.prune(model, granularity="2:4", exclude=["classifier"])
    >>> tp.prune(model, sparsity=0.5, importance="taylor", data=batches, loss_fn=F.cross_entropy)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(granularity, str) and granularity in _STRUCTURAL:  # physical removal: structured/
        from .structured.prune import prune_structural

        return prune_structural(model, sparsity, threshold, importance, granularity, scope, exclude, example_inputs, data,
                                loss_fn, round_to)
    if round_to is not None:
        raise ValueError(f"`round_to` only applies to granularity='channel' (channels kept per group), got granularity={granularity!r}")
    criterion = resolve(importance)
    n_m = _parse_granularity(granularity)
    _check_amount(sparsity, threshold, scope, n_m)
    layers, scope = _target_layers(model, exclude, scope)
    owners = _weight_owners(model, layers, scope)
    check_supported(layers)
    if n_m is not None:
        _check_n_m_divides(layers, n_m)
    if criterion.requires_data:
        _check_data_args(data, loss_fn, importance, criterion.requires_loss)

    # Layers that share one weight tensor are ranked once, through the first of them, and all get
    # the same mask object (what any of them pruned before stays pruned).
    unique = {name: layer for name, layer in layers.items() if owners[name] == name}
    _check_finite_weights(unique)
    criterion.reset()
    criterion.prepare(model, unique)
    if criterion.requires_data:
        observe(model, unique, criterion, data, loss_fn)
    current = _current_masks(layers, owners)
    row_wise = getattr(criterion, "compare_within_rows", False)
    if scope == "global" and threshold is None and n_m is None:
        scores = {name: _scores(criterion, name, layer, current[name]) for name, layer in unique.items()}
        new_masks = _select(scores, current, sparsity, threshold, scope, n_m, row_wise)
        del scores
    else:  # one layer at a time: only one layer's scores exist at once (memory)
        new_masks = {}
        for name, layer in unique.items():
            score = _scores(criterion, name, layer, current[name])
            new_masks.update(_select({name: score}, {name: current[name]}, sparsity, threshold, scope, n_m, row_wise))
            del score
    del current

    # Nothing was changed before this point: every score was checked and every mask computed.
    for name, layer in layers.items():
        owner = owners[name]
        attach_mask(layer, new_masks.pop(owner) if owner == name else layers[owner].weight_mask, copy=False)
    return model


def _parse_granularity(granularity) -> Optional[Tuple[int, int]]:
    """None for "weight", (N, M) for "N:M"."""
    if not isinstance(granularity, str):
        raise TypeError(f"`granularity` must be a string, {_GRANULARITY_HELP}, got {type(granularity).__name__}")
    if granularity == "weight":
        return None
    if granularity in _STRUCTURAL:
        raise ValueError(
            f"`granularity` must be {_GRANULARITY_HELP}, got {granularity!r}: structural pruning "
            "(channels, heads, layers) is not available in this version"
        )
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", granularity)
    if match is None:
        raise ValueError(f"`granularity` must be {_GRANULARITY_HELP}, got {granularity!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"`granularity` N:M needs 0 < N < M, got {granularity!r}")
    return n, m


def _check_sparsity_value(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number in [0, 1), got {type(value).__name__}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {value}")


def _check_amount(sparsity, threshold, scope, n_m) -> None:
    """Exactly one of sparsity / threshold / dict scope / N:M says how much to prune."""
    if isinstance(scope, Mapping):
        if sparsity is not None or threshold is not None:
            raise ValueError("with a dict `scope` the per-layer sparsities come from it: pass neither `sparsity` nor `threshold`")
        if n_m is not None:
            raise ValueError("`scope` must be 'layer' for N:M granularity (choose layers with `exclude`), got a dict")
        for name, value in scope.items():
            if not isinstance(name, str):
                raise TypeError(f"`scope` keys must be module names (str), got {type(name).__name__}")
            _check_sparsity_value(value, f"`scope[{name!r}]`")
        return
    if not isinstance(scope, str) or scope not in _SCOPES:
        raise ValueError(f"`scope` must be one of {list(_SCOPES)} or a dict {{module_name: sparsity}}, got {scope!r}")
    if n_m is not None:
        n, m = n_m
        if threshold is not None:
            raise ValueError("`threshold` cannot be combined with N:M granularity (N:M fixes the sparsity at 1 - N/M)")
        if scope != "layer":
            raise ValueError(f"`scope` must be 'layer' for N:M granularity, got {scope!r}")
        if sparsity is not None:
            _check_sparsity_value(sparsity, "`sparsity`")
            if abs(float(sparsity) - (1 - n / m)) > 1e-9:
                raise ValueError(f"`sparsity` must be None or {1 - n / m} for {n}:{m} granularity, got {sparsity}")
        return
    if (sparsity is None) == (threshold is None):
        raise ValueError("pass exactly one of `sparsity` (a fraction in [0, 1)) or `threshold` (an absolute score)")
    if sparsity is not None:
        _check_sparsity_value(sparsity, "`sparsity`")
    elif isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"`threshold` must be a finite real number, got {type(threshold).__name__}")
    elif not math.isfinite(threshold):
        raise ValueError(f"`threshold` must be a finite real number, got {threshold}")


def _excluded_ids(model: nn.Module, exclude) -> set:
    """Ids of the modules never pruned; a name or module excludes its whole subtree."""
    if isinstance(exclude, (str, nn.Module, type)):
        exclude = (exclude,)
    if exclude is None:
        exclude = ()
    try:
        items = list(exclude)
    except TypeError:
        raise TypeError(f"`exclude` must be module names, modules or module types, got {type(exclude).__name__}") from None
    named = dict(model.named_modules(remove_duplicate=False))  # a module may have several names
    members = {id(m) for m in named.values()}
    excluded = set()
    for item in items:
        if isinstance(item, str):
            if item not in named:
                raise ValueError(f"`exclude` names no module of the model: {item!r}")
            excluded.update(id(m) for m in named[item].modules())
        elif isinstance(item, nn.Module):
            if id(item) not in members:
                raise ValueError(f"`exclude` holds a {type(item).__name__} that is not part of the model")
            excluded.update(id(m) for m in item.modules())
        elif isinstance(item, type) and issubclass(item, nn.Module):
            excluded.update(id(m) for m in named.values() if issubclass(base_type(m), item) or isinstance(m, item))
        else:
            raise TypeError(f"`exclude` items must be module names, modules or nn.Module types, got {item!r}")
    return excluded


def _target_layers(model: nn.Module, exclude, scope):
    """The layers to prune by name, and the scope with dict keys turned into those names.

    Names are ``named_modules()`` names; a module registered under several names (an alias such
    as ``self.classifier = self.fc``) may be named by any of them.
    """
    excluded = _excluded_ids(model, exclude)
    candidates = prunable_layers(model)
    layers = {name: m for name, m in candidates.items() if id(m) not in excluded}
    if isinstance(scope, Mapping):
        if not scope:
            raise ValueError("`scope` must name at least one layer when it is a dict, got {}")
        canonical = {id(m): name for name, m in candidates.items()}
        every_name = dict(model.named_modules(remove_duplicate=False))
        resolved: Dict[str, float] = {}
        for key, value in scope.items():
            name = canonical.get(id(every_name.get(key)))
            if name is None:
                raise ValueError(
                    f"`scope` key {key!r} is not a prunable layer of the model; prunable layers: {list(candidates)}"
                )
            if name not in layers:
                raise ValueError(f"`scope` key {key!r} is also excluded by `exclude`")
            if resolved.setdefault(name, value) != value:
                raise ValueError(f"`scope` gives layer {name!r} two sparsities under two of its names")
        scope = resolved
        layers = {name: m for name, m in layers.items() if name in scope}  # model order, not dict order
    if not layers:
        kinds = ", ".join(t.__name__ for t in PRUNABLE_TYPES)
        raise ValueError(f"`model` has no prunable layer ({kinds}) left after `exclude`")
    return layers, scope


def _weight_owners(model: nn.Module, layers: Dict[str, nn.Module], scope) -> Dict[str, str]:
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
            raise ValueError(
                f"`scope` gives layers {owners[name]!r} and {name!r} different sparsities, but they share one weight tensor"
            )
    targets = {id(layer) for layer in layers.values()}
    for name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            owner = by_weight.get(id(param))
            if owner is not None and not (id(module) in targets and param_name == "weight"):
                raise ValueError(
                    f"{type(module).__name__} {name!r} shares its {param_name} with layer {owner!r}, which pruning "
                    "would change under it: prune both or neither (`exclude` or `scope` splits them)"
                )
    return owners


def _input_size(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels // layer.groups


def _check_n_m_divides(layers: Dict[str, nn.Module], n_m: Tuple[int, int]) -> None:
    n, m = n_m
    for name, layer in layers.items():
        size = _input_size(layer)
        if size % m:
            raise ValueError(
                f"`granularity` {n}:{m} needs M={m} to divide the input size of every layer; layer {name!r} "
                f"({base_type(layer).__name__}) has input size {size}; exclude it or choose another M"
            )


def _check_data_args(data, loss_fn, importance, requires_loss: bool = True) -> None:
    if not requires_loss and data is None:
        raise ValueError(f"importance {importance!r} is data-driven: pass `data` (batches of (inputs, targets) or inputs)")
    if not requires_loss:
        return
    if data is None or loss_fn is None:
        missing = " and ".join(f"`{a}`" for a, v in (("data", data), ("loss_fn", loss_fn)) if v is None)
        raise ValueError(f"importance {importance!r} is data-driven: pass {missing} (batches of (inputs, targets) and a loss function)")
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")


def _nonfinite(tensor: torch.Tensor, where: Optional[torch.Tensor] = None) -> Optional[str]:
    """None when every entry (of ``where``, if given) is finite, else what was found and where.

    The common case costs one reduction and no layer-sized temporary: a sum is finite only if
    every entry is (an overflowing sum just falls through to the exact count, done in row blocks).
    """
    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
        return None
    counts = {"NaN": 0, "+Inf": 0, "-Inf": 0}
    first = None
    rows = tensor.shape[0]
    for r0, r1 in selection._row_blocks(tensor.numel(), rows):
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


def _check_finite_weights(layers: Dict[str, nn.Module]) -> None:
    """Raises before anything runs if a layer's (unpruned) weights hold NaN or Inf: no ranking of
    such a layer means anything, and its outputs are already broken."""
    for name, layer in layers.items():
        found = _nonfinite(layer.weight.detach(), get_mask(layer))
        if found:
            raise ValueError(
                f"layer {name!r} ({base_type(layer).__name__}) has non-finite weights: {found}; fix or reload "
                "the weights (or exclude the layer with `exclude`) before pruning; nothing was changed"
            )


def _checked_score(criterion: Importance, name: str, layer: nn.Module, kept: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The criterion's scores for ``layer``, checked: the weight's shape, and finite (NaN or Inf
    scores, from gradients or calibration data, would rank arbitrarily) where ``kept`` (the current
    mask) keeps the weight: already pruned weights are never ranked, as for the weights' check."""
    scores = criterion(layer)
    if not isinstance(scores, torch.Tensor) or scores.shape != layer.weight.shape:
        got = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"importance {criterion!r} returned {got} for layer {name!r}; expected the weight's shape {list(layer.weight.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"importance {criterion!r} returned {scores.dtype} scores for layer {name!r}; expected a float tensor")
    found = _nonfinite(scores.detach(), kept)
    if found:
        source = "its weights, gradients or calibration data"
        raise ValueError(
            f"importance {criterion!r} gave non-finite scores for layer {name!r}: {found}; they come from {source} "
            "(NaN/Inf cannot be ranked); nothing was changed"
        )
    return scores


def _powers_finite(weight: torch.Tensor, p: float, dtype: torch.dtype) -> bool:
    """Whether |w|^p of the largest |w| (so of every weight) is finite in the scoring dtype: one
    reduction, no layer-sized temporary. False as well when a (pruned) weight is NaN or Inf."""
    if weight.numel() == 0:
        return True
    peak = torch.linalg.vector_norm(weight, float("inf")).to(dtype).reshape(1)
    return bool(torch.isfinite(peak.pow_(p)).all())


def _scores(criterion: Importance, name: str, layer: nn.Module, kept: Optional[torch.Tensor] = None):
    """A layer's scores for selection: made block by block when the criterion is the plain
    magnitude, so no layer-sized score tensor exists (scores of finite weights, checked before,
    are finite, unless |w|^p overflows: then computed and checked, so that it raises); else
    computed and checked now."""
    cls = type(criterion)
    if isinstance(criterion, Magnitude) and cls.score is Magnitude.score and cls.score_rows is Magnitude.score_rows:
        dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
        if criterion.p != 1 and not _powers_finite(layer.weight.detach(), criterion.p, dtype):
            return _checked_score(criterion, name, layer, kept)  # |w|^p overflows: raises naming the layer
        return selection.RowScores(layer.weight.shape, dtype, lambda start, stop: criterion.score_rows(layer, start, stop))
    return _checked_score(criterion, name, layer, kept)


def _current_masks(layers: Dict[str, nn.Module], owners: Dict[str, str]) -> Dict[str, Optional[torch.Tensor]]:
    """Each weight's current mask by owner name: None when no layer holding it is masked, the
    layers' common mask otherwise (and-ed when tied layers were masked separately)."""
    current: Dict[str, Optional[torch.Tensor]] = {}
    for name, layer in layers.items():
        owner, mask = owners[name], get_mask(layer)
        before = current.get(owner)
        if mask is None or before is mask:
            current.setdefault(owner, before)
        else:
            current[owner] = mask if before is None else before & mask
    return current


def _current_mask(layer: nn.Module) -> torch.Tensor:
    mask = get_mask(layer)
    return mask if mask is not None else torch.ones_like(layer.weight, dtype=torch.bool)


def _select(scores, current, sparsity, threshold, scope, n_m, row_wise=False) -> Dict[str, torch.Tensor]:
    """New masks; ``row_wise`` (criteria such as Wanda) takes per-layer amounts from each output row."""
    names = list(scores)
    by_ratio = selection.by_row_ratio if row_wise else selection.by_ratio
    if n_m is not None:
        return {k: selection.n_of_m(scores[k], current[k], *n_m) for k in names}
    if isinstance(scope, Mapping):
        return {k: by_ratio(scores[k], current[k], float(scope[k])) for k in names}
    if threshold is not None:
        return {k: selection.by_threshold(scores[k], current[k], float(threshold)) for k in names}
    if scope == "global":
        masks = selection.by_global_ratio([scores[k] for k in names], [current[k] for k in names], float(sparsity))
        return dict(zip(names, masks))
    return {k: by_ratio(scores[k], current[k], float(sparsity)) for k in names}


from .progressive import Pruner  # noqa: E402  (progressive.py builds on the helpers above)
