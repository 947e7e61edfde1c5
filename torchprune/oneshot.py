"""tp.prune(): one-shot pruning of a model's layers with masks.

Masks ("weight", "N:M") are made here; the structural granularities ("channel", "head", "layer")
remove parts of the model physically and are handed to `torchprune.structured`. Every argument is
checked (targets.py) before anything is touched, and the data-driven scoring pass restores the
model's gradients and train/eval mode, so a call that raises leaves the model exactly as it was.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from . import selection
from .calibration import observe
from .importance import Importance, Magnitude, resolve
from .masking import attach_mask, check_supported, get_mask
from .structured import prune_structural
from .targets import (
    STRUCTURAL,
    check_amount,
    check_data_args,
    check_finite_weights,
    check_n_m_divides,
    checked_score,
    parse_granularity,
    target_layers,
    weight_owners,
)

__all__ = ["prune"]


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

    ``data``: ``(inputs, targets)`` batches for Gradient/Taylor, also bare inputs for Activation/Wanda;
    inputs are a tensor, a tuple, a dict (``model(**batch)``) or ``tp.Inputs(ids, attention_mask=m)``
    (two tensors the forward could take both are ambiguous: docs/guide/oneshot.md, "Calibration data").

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
    if isinstance(granularity, str) and granularity in STRUCTURAL:  # physical removal: structured/
        return prune_structural(model, sparsity, threshold, importance, granularity, scope, exclude, example_inputs,
                                data, loss_fn, round_to)
    if round_to is not None:
        raise ValueError("`round_to` only applies to granularity='channel' (channels kept per group), "
                         f"got granularity={granularity!r}")
    criterion = resolve(importance)
    n_m = parse_granularity(granularity)
    layers, owners, scope = _checked_layers(model, criterion, importance, n_m, sparsity, threshold, scope, exclude,
                                            data, loss_fn)
    # Layers that share one weight tensor are ranked once, through the first of them, and all get
    # the same mask object (what any of them pruned before stays pruned).
    unique = {name: layer for name, layer in layers.items() if owners[name] == name}
    new_masks = _new_masks(model, unique, _current_masks(layers, owners), criterion, (sparsity, threshold, scope, n_m),
                           data, loss_fn)
    # Nothing was changed before this point: every score was checked and every mask computed.
    for name, layer in layers.items():
        owner = owners[name]
        attach_mask(layer, new_masks.pop(owner) if owner == name else layers[owner].weight_mask, copy=False)
    return model


def _checked_layers(model: nn.Module, criterion: Importance, importance, n_m, sparsity, threshold, scope, exclude,
                    data, loss_fn):
    """The layers to mask by name, the owner of each one's weight and the resolved scope, after
    every check of the arguments (nothing is changed)."""
    check_amount(sparsity, threshold, scope, n_m)
    layers, scope = target_layers(model, exclude, scope)
    owners = weight_owners(model, layers, scope)
    check_supported(layers)
    if n_m is not None:
        check_n_m_divides(layers, n_m)
    if criterion.requires_data:
        check_data_args(data, loss_fn, importance, criterion.requires_loss)
    return layers, owners, scope


def _new_masks(model: nn.Module, unique: Dict[str, nn.Module], current: Dict[str, Optional[torch.Tensor]],
               criterion: Importance, amount: Tuple, data, loss_fn) -> Dict[str, torch.Tensor]:
    """The new mask of each weight (by owner name) for ``amount`` = (sparsity, threshold, scope, N:M);
    nothing is changed."""
    sparsity, threshold, scope, n_m = amount
    check_finite_weights(unique)
    criterion.reset()
    criterion.prepare(model, unique)
    if criterion.requires_data:
        observe(model, unique, criterion, data, loss_fn)
    row_wise = getattr(criterion, "compare_within_rows", False)
    if scope == "global" and threshold is None and n_m is None:
        scores = {name: _scores(criterion, name, layer, current[name]) for name, layer in unique.items()}
        return _select(scores, current, sparsity, threshold, scope, n_m, row_wise)
    new_masks = {}  # one layer at a time: only one layer's scores exist at once (memory)
    for name, layer in unique.items():
        score = _scores(criterion, name, layer, current[name])
        new_masks.update(_select({name: score}, {name: current[name]}, sparsity, threshold, scope, n_m, row_wise))
        del score
    return new_masks


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
            return checked_score(criterion, name, layer, kept)  # |w|^p overflows: raises naming the layer
        return selection.RowScores(layer.weight.shape, dtype,
                                   lambda start, stop: criterion.score_rows(layer, start, stop))
    return checked_score(criterion, name, layer, kept)


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

