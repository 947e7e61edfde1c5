"""tp.prune(): one-shot pruning of a model's layers with masks.

Masks ("weight", "N:M") are made here; the structural granularities ("channel", "head", "layer")
remove parts of the model physically and are handed to `torchprune.structured`. Every argument is
checked (targets.py) before anything is touched, and the data-driven scoring pass restores the
model's gradients and train/eval mode, so a call that raises leaves the model exactly as it was.

Three ways to run a data-driven criterion, all ending in the same per-layer step (`_layer_result`:
scores and a selection, or a reconstructing criterion's new mask and weights):

* one pass: every layer's statistics from the unpruned model, then every layer pruned at once;
* sequential (sequential.py): block after block, each calibrated on the pruned blocks' outputs and
  committed before the next; on an error every layer is put back as it was;
* ``scope="owl"`` (owl.py) first turns the target sparsity into per-layer sparsities.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from . import selection
from . import sequential as layer_by_layer
from .calibration import observe
from .importance import Importance, Magnitude, resolve
from .masking import attach_mask, check_supported, get_mask, put_back
from .owl import owl_sparsities
from .structured import prune_structural
from .targets import (
    STRUCTURAL,
    check_amount,
    check_blocks_divide,
    check_data_args,
    check_finite_weights,
    check_n_m_divides,
    checked_score,
    leave_out_tied,
    parse_block,
    parse_granularity,
    refuse_freeze,
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
    sequential: Optional[bool] = None,
    blocks=None,
    freeze: Iterable = (),
) -> nn.Module:
    """Masks the least important weights of every Linear/Conv1d/Conv2d layer; returns ``model``.

    ``sparsity`` is the fraction of weights pruned (per layer with ``scope="layer"``, over all
    layers together with ``scope="global"``, per named layer with a dict scope, or per layer as
    OWL allocates it with ``scope="owl"``, which needs ``data``); ``threshold`` prunes every weight
    whose score is below it instead. ``granularity="N:M"`` keeps the N best of each M consecutive
    weights along the input dimension. Already pruned weights stay pruned.
    ``granularity="channel" | "head" | "layer"`` removes whole channels, attention heads or
    residual blocks physically (see `torchprune.structured`); it needs ``example_inputs``, and
    with "channel", ``round_to=k`` makes every group keep a multiple of k channels. ``exclude``
    (names, modules, types) leaves layers unpruned; with "channel" an excluded layer keeps its output
    channels, those it reads may still go (``exclude=[model.fc]`` keeps the classes). ``freeze``
    (structural only) leaves a module and every group, head or block it is in whole.

    ``data``: ``(inputs, targets)`` batches for Gradient/Taylor (with ``loss_fn``), also bare inputs
    for the others; inputs are a tensor, a tuple, a dict (``model(**batch)``) or
    ``tp.Inputs(ids, attention_mask=m)`` (docs/guide/oneshot.md, "Calibration data").
    ``sequential=True`` calibrates and prunes the model's repeated blocks one after another
    (``blocks`` names them, else they are found: sequential.py); None does so for criteria whose
    method is defined that way (SparseGPT). ``importance="sparsegpt"`` also updates the kept weights.
    With sequential calibration or SparseGPT, ``scope="global"`` takes each layer's share from one
    ranking of all layers on the unpruned model, then prunes layer by layer.

    Odd inputs: NaN/Inf in a layer's weights or scores raises a ValueError naming the layer and
    what was found, before anything changes; a ratio never empties a layer (at least one weight
    stays, each layer's best under ``scope="global"``), only an explicit ``threshold`` may; layers
    tied to one weight share one mask object; a layer tied to a module never pruned (GPT-2's
    ``lm_head``, tied to the embedding) is left unpruned with a warning (untie it to prune it; a
    dict scope naming it raises); zero-size layers get empty masks; meta tensors are refused.
    Memory: docs/guide/oneshot.md ("Memory").

    >>> model = tp.prune(model, sparsity=0.9, scope="global")
    >>> tp.prune(model, granularity="2:4", exclude=["classifier"])
    >>> tp.prune(encoder, sparsity=0.5, importance="sparsegpt", data=tokenized_batches)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(granularity, str) and granularity in STRUCTURAL:  # physical removal: structured/
        _refuse_calibration_args(granularity, sequential, blocks)
        return prune_structural(model, sparsity, threshold, importance, granularity, scope, exclude, example_inputs,
                                data, loss_fn, round_to, freeze)
    _refuse_structural_args(granularity, round_to, freeze)
    return _prune_weights(model, sparsity, threshold, importance, granularity, scope, exclude, data, loss_fn,
                          sequential, blocks)


def _refuse_calibration_args(granularity, sequential, blocks) -> None:
    """``sequential`` and ``blocks`` are for masks (weight, N:M) only."""
    if sequential or blocks is not None:
        raise ValueError(f"`sequential`/`blocks` apply to weight and N:M granularity, not {granularity!r}")


def _refuse_structural_args(granularity, round_to, freeze) -> None:
    """``round_to`` and ``freeze`` are for the structural granularities only."""
    if round_to is not None:
        raise ValueError("`round_to` only applies to granularity='channel' (channels kept per group), "
                         f"got granularity={granularity!r}")
    refuse_freeze(freeze, granularity)


def _prune_weights(model, sparsity, threshold, importance, granularity, scope, exclude, data, loss_fn, sequential,
                   blocks) -> nn.Module:
    """`prune` with masks: every argument checked, then one pass or stage by stage."""
    criterion = resolve(importance)
    n_m, block = parse_granularity(granularity), parse_block(granularity)
    owl = isinstance(scope, str) and scope == "owl"
    _check_calibration_args(criterion, sequential, blocks, owl, sparsity, threshold, n_m, data)
    layers, owners, scope = _checked_layers(model, criterion, importance, n_m, sparsity, threshold,
                                            "layer" if owl else scope, exclude, data, loss_fn)
    if block is not None:
        check_blocks_divide(layers, block, criterion)
    # Layers that share one weight tensor are ranked once, through the first of them, and all get
    # the same mask object (what any of them pruned before stays pruned).
    unique = {name: layer for name, layer in layers.items() if owners[name] == name}
    check_finite_weights(unique)
    wanted = sequential if sequential is not None else bool(getattr(criterion, "sequential_default", False))
    reads_twice = owl or wanted or (scope == "global" and getattr(criterion, "reconstructs", False))
    if data is not None and reads_twice and iter(data) is data:  # a one-shot iterator, read more than once
        data = list(data)
    if owl:
        scope, sparsity = owl_sparsities(model, unique, float(sparsity), data, blocks=blocks), None
    run = _Run(model, layers, owners, criterion, (sparsity, threshold, scope, n_m), data, loss_fn, block)
    the_plan = _sequential_plan(model, unique, criterion, wanted, blocks, data)
    if scope == "global" and threshold is None and n_m is None and (the_plan or run.reconstructs):
        run.amount = (None, None, run.global_shares(), None)
    if the_plan is None:
        run.one_pass()
    else:
        run.by_stages(the_plan)
    return model


def _check_calibration_args(criterion: Importance, sequential, blocks, owl: bool, sparsity, threshold, n_m,
                            data) -> None:
    """``sequential``, ``blocks`` and ``scope="owl"`` make sense together with the rest."""
    if sequential is not None and not isinstance(sequential, bool):
        raise TypeError(f"`sequential` must be True, False or None, got {type(sequential).__name__}")
    if sequential and not criterion.requires_data:
        raise ValueError(f"`sequential=True` calibrates layer by layer on `data`; importance {criterion!r} "
                         "reads no data")
    if blocks is not None and not (owl or (criterion.requires_data and sequential is not False)):
        raise ValueError("`blocks` names the repeated blocks for sequential calibration or OWL; "
                         "pass it with a data-driven importance or scope='owl'")
    if owl:
        if n_m is not None or threshold is not None or sparsity is None:
            raise ValueError("scope='owl' needs `sparsity` (the mean target) and neither `threshold` nor "
                             "N:M granularity")
        if data is None:
            raise ValueError("scope='owl' reads Wanda scores on calibration data: pass `data`")


def _sequential_plan(model, unique, criterion, wanted: bool, blocks, data) -> Optional[layer_by_layer.Plan]:
    """The stages to prune by, or None for one pass (not ``wanted``, not applicable, or not possible)."""
    if not (wanted and criterion.requires_data):
        return None
    the_plan = layer_by_layer.plan(model, unique, data, blocks)
    if the_plan is not None and the_plan.slot is None and not criterion.requires_loss:
        warnings.warn(f"sequential calibration cannot replay the blocks one by one: {the_plan.problem}; each "
                      "block is calibrated on forward passes of the model up to it instead (same result, slower)",
                      stacklevel=4)
    return the_plan


def _checked_layers(model: nn.Module, criterion: Importance, importance, n_m, sparsity, threshold, scope, exclude,
                    data, loss_fn):
    """The layers to mask by name, the owner of each one's weight and the resolved scope, after
    every check of the arguments (nothing is changed)."""
    check_amount(sparsity, threshold, scope, n_m)
    layers, scope = target_layers(model, exclude, scope)
    layers = leave_out_tied(model, layers, scope, stacklevel=4)  # here, _prune_weights, prune, the caller
    owners = weight_owners(model, layers, scope)
    check_supported(layers)
    if n_m is not None:
        check_n_m_divides(layers, n_m)
    if criterion.requires_data:
        check_data_args(data, loss_fn, importance, criterion.requires_loss)
    return layers, owners, scope


class _Run:
    """One `prune` call once every argument is checked: the layers, the criterion, the amount
    (sparsity, threshold, scope, N:M) and the data, and the three ways to apply them. ``block`` is R for
    block:Rx1 granularity (selection on R x 1 blocks), else None."""

    def __init__(self, model, layers, owners, criterion, amount, data, loss_fn, block=None):
        self.model, self.layers, self.owners, self.criterion = model, layers, owners, criterion
        self.unique = {name: layer for name, layer in layers.items() if owners[name] == name}
        self.amount, self.data, self.loss_fn, self.block = amount, data, loss_fn, block
        self.reconstructs = bool(getattr(criterion, "reconstructs", False))
        self.current = _current_masks(layers, owners)

    def global_shares(self) -> Dict[str, float]:
        """``scope="global"`` as a dict scope: each layer's pruned share after one global ranking of
        every layer's scores on the model as it is (no weight is changed)."""
        self._observe(self.unique)
        sparsity = self.amount[0]
        scores = {name: _scores(self.criterion, name, layer, self.current[name]) for name, layer in self.unique.items()}
        masks = _select(scores, self.current, sparsity, None, "global", None, block=self.block)
        self.criterion.reset()
        return selection.pruned_shares(masks)

    def one_pass(self) -> None:
        """Statistics for every layer at once, then every layer's new mask (and weights), then the
        commit: nothing changes before every result exists."""
        self._observe(self.unique)
        sparsity, threshold, scope, n_m = self.amount
        if not self.reconstructs and scope == "global" and threshold is None and n_m is None:
            scores = {n: _scores(self.criterion, n, layer, self.current[n]) for n, layer in self.unique.items()}
            results = {n: (mask, None) for n, mask in _select(scores, self.current, sparsity, None, scope, None,
                                                              self._row_wise(), self.block).items()}
        else:
            results = {name: self._layer_result(name, layer) for name, layer in self.unique.items()}
        for name, (mask, weight) in results.items():
            self._commit(name, mask, weight)

    def by_stages(self, the_plan: layer_by_layer.Plan) -> None:
        """Block by block (sequential.py), each stage committed before the next is calibrated; if
        anything raises, every target layer gets its weights, mask and class back."""
        saved = {name: (layer.weight.detach().clone(), None if get_mask(layer) is None else get_mask(layer).clone())
                 for name, layer in self.layers.items()}

        def prune_stage(stage_layers: Dict[str, nn.Module]) -> None:
            for name, layer in stage_layers.items():
                self._commit(name, *self._layer_result(name, layer))

        self.criterion.prepare(self.model, self.unique)
        try:
            layer_by_layer.run(self.model, the_plan, self.criterion, self.data, self.loss_fn, prune_stage)
        except BaseException:
            self._restore(saved)
            raise

    def _observe(self, layers: Dict[str, nn.Module]) -> None:
        self.criterion.reset()
        self.criterion.prepare(self.model, layers)
        if self.criterion.requires_data:
            observe(self.model, layers, self.criterion, self.data, self.loss_fn)

    def _row_wise(self) -> bool:
        return bool(getattr(self.criterion, "compare_within_rows", False))

    def _layer_result(self, name: str, layer: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One layer's new mask, and its new weights when the criterion reconstructs them."""
        sparsity, threshold, scope, n_m = self.amount
        if isinstance(scope, Mapping):
            sparsity = float(scope[name])
        if self.reconstructs:
            if n_m is not None:
                return self.criterion.reconstruct(layer, name, n_m=n_m, kept=self.current[name])
            if threshold is not None:
                return self.criterion.reconstruct(layer, name, threshold=float(threshold), kept=self.current[name])
            return self.criterion.reconstruct(layer, name, sparsity=float(sparsity), kept=self.current[name])
        score = _scores(self.criterion, name, layer, self.current[name])
        mask = _select({name: score}, {name: self.current[name]}, sparsity, threshold, "layer", n_m,
                       self._row_wise(), self.block)[name]
        return mask, None

    def _commit(self, name: str, mask: torch.Tensor, weight: Optional[torch.Tensor]) -> None:
        """The owner layer ``name`` gets ``weight`` (if given) and ``mask``; its tied layers the same mask."""
        owner = self.layers[name]
        if weight is not None:
            with torch.no_grad():
                owner.weight.copy_(weight)
        attach_mask(owner, mask, copy=False)
        for other, layer in self.layers.items():
            if self.owners[other] == name and other != name:
                attach_mask(layer, owner.weight_mask, copy=False)

    def _restore(self, saved) -> None:
        for name, (weight, mask) in saved.items():
            put_back(self.layers[name], weight, mask)


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


def _select(scores, current, sparsity, threshold, scope, n_m, row_wise=False, block=None) -> Dict[str, torch.Tensor]:
    """New masks; ``row_wise`` (criteria such as Wanda) takes per-layer amounts from each output row
    (of blocks, with ``block``); ``block`` = R selects whole R x 1 blocks (selection.py)."""
    if block is not None:
        return selection.by_blocks(lambda s, c: _select(s, c, sparsity, threshold, scope, n_m, row_wise),
                                   scores, current, block)
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

