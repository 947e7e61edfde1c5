"""How much each layer can lose: per-layer sensitivity curves and a sparsity allocation from them.

`sensitivity()` prunes one layer at a time to each sparsity, evaluates the model, and restores the
layer exactly (weights, mask and class); the drop of the metric is the layer's measured damage, the
loss-change view of importance applied to whole layers. `allocate()` then picks per-layer
sparsities that meet a global target with the least total damage, assuming damages add up.

>>> sens = tp.sensitivity(model, lambda m: accuracy(m, x_val, y_val))
>>> plan = tp.allocate(model, 0.9, sens)           # {layer_name: sparsity}
>>> tp.prune(model, scope=plan)
"""

from __future__ import annotations

import numbers
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from ..importance import Importance, resolve
from ..masking import get_mask, put_back
from ..oneshot import prune
from ..owl import check_owl_arguments, owl_sparsities
from ..progress import progress_bar
from ..targets import leave_out_tied, target_layers, weight_owners

__all__ = ["Sensitivity", "sensitivity", "allocate", "scored_layers", "check_sparsities", "metric_of"]

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)


class Sensitivity:
    """The result of `sensitivity()`: ``baseline`` (the metric of the model as given), ``curves``
    ({layer: {sparsity: metric}}), ``sizes`` ({layer: weight count}) and ``higher_is_better``."""

    def __init__(self, baseline: float, curves: Dict[str, Dict[float, float]], sizes: Dict[str, int],
                 higher_is_better: bool):
        self.baseline = baseline
        self.curves = curves
        self.sizes = sizes
        self.higher_is_better = higher_is_better

    def damage(self, layer: str, sparsity: float) -> float:
        """How much worse than the baseline the metric got with ``layer`` alone at ``sparsity``."""
        value = self.curves[layer][sparsity]
        return self.baseline - value if self.higher_is_better else value - self.baseline

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "higher_is_better": self.higher_is_better, "sizes": dict(self.sizes),
                "curves": {k: {str(s): v for s, v in c.items()} for k, c in self.curves.items()}}

    def to_markdown(self, digits: int = 2) -> str:
        """One row per layer, one column per sparsity, the metric in each cell."""
        levels = sorted({s for c in self.curves.values() for s in c})
        head = "| Layer | Weights | " + " | ".join(f"{100 * s:g}%" for s in levels) + " |"
        rule = "|:---|---:|" + "---:|" * len(levels)
        rows = [f"| {name} | {self.sizes[name]:,} | " + " | ".join(f"{c[s]:.{digits}f}" for s in levels) + " |"
                for name, c in self.curves.items()]
        return "\n".join([f"Baseline: {self.baseline:.{digits}f}", "", head, rule, *rows])

    def __repr__(self) -> str:
        return f"Sensitivity(baseline={self.baseline!r}, layers={list(self.curves)})"


def check_sparsities(sparsities) -> List[float]:
    """``sparsities`` as a sorted list of distinct floats in (0, 1), or the error that names them."""
    try:
        items = list(sparsities)
        values = [float(s) for s in items if not isinstance(s, bool)]
    except (TypeError, ValueError):
        raise TypeError("`sparsities` must be a sequence of numbers in (0, 1)") from None
    if not values or len(values) != len(items) or not all(0 < s < 1 for s in values):
        raise ValueError(f"`sparsities` must be a non-empty sequence of numbers in (0, 1), got {sparsities!r}")
    return sorted(set(values))


def metric_of(evaluate: Callable, model: nn.Module) -> float:
    """``evaluate(model)`` as a float (a one-element tensor is read out), or the error that says it is no number."""
    value = evaluate(model)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`evaluate` must return a number, got {type(value).__name__}")
    return float(value)


def scored_layers(model: nn.Module, exclude: Iterable, stacklevel: int) -> Dict[str, nn.Module]:
    """The layers a per-layer sweep scores: every prunable layer not in ``exclude``, less those tied
    to a module that is never pruned (a warning says so; ``stacklevel`` counts from the caller of
    this function, as `warnings.warn` would there) and the second and later holders of a shared
    weight (the first one stands for it)."""
    layers, _ = target_layers(model, exclude, "layer")
    layers = leave_out_tied(model, layers, "layer", stacklevel=stacklevel + 1)
    owners = weight_owners(model, layers, "layer")
    return {name: layer for name, layer in layers.items() if owners[name] == name}


def sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    importance: Union[str, Importance] = "magnitude",
    exclude: Iterable = (),
    higher_is_better: bool = True,
    data: Optional[Iterable] = None,
    loss_fn: Optional[Callable] = None,
    progress: bool = True,
) -> Sensitivity:
    """Each prunable layer pruned alone to each of ``sparsities`` (on top of any mask it has), the
    metric ``evaluate(model)`` recorded, and the layer restored bit for bit.

    ``higher_is_better`` says whether the metric is an accuracy (True) or a loss (False).
    ``importance``, ``data`` and ``loss_fn`` are passed to `prune()`. A layer tied to a module
    that is never pruned (a tied output layer) is left out with a warning, as `prune()` does.
    Shows a tqdm bar when ``progress`` and tqdm is installed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(evaluate):
        raise TypeError(f"`evaluate` must be callable, got {type(evaluate).__name__}")
    levels = check_sparsities(sparsities)
    resolve(importance)  # checked now, not after the first evaluation
    layers = scored_layers(model, exclude, stacklevel=2)
    baseline = metric_of(evaluate, model)
    curves: Dict[str, Dict[float, float]] = {}
    jobs = [(name, s) for name in layers for s in levels]
    bar = progress_bar(len(jobs), "sensitivity") if progress else None
    for name, layer in layers.items():
        curves[name] = {}
        for level in levels:
            saved_weight = layer.weight.detach().clone()
            saved_mask = get_mask(layer)
            saved_mask = None if saved_mask is None else saved_mask.clone()
            try:
                prune(model, scope={name: level}, importance=importance, data=data, loss_fn=loss_fn)
                curves[name][level] = metric_of(evaluate, model)
            finally:
                put_back(layer, saved_weight, saved_mask)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    sizes = {name: layer.weight.numel() for name, layer in layers.items()}
    return Sensitivity(baseline, curves, sizes, bool(higher_is_better))


def allocate(model: nn.Module, target_sparsity: float, sensitivity: Optional[Sensitivity] = None, *,
             method: Optional[str] = None, data: Optional[Iterable] = None, exclude: Iterable = (),
             blocks=None, m: float = 5.0, lam: float = 0.08) -> Dict[str, float]:
    """Per-layer sparsities whose weighted mean (by weight count) is ``target_sparsity``: a dict
    scope for `prune()` or the Pruner.

    ``method="sensitivity"`` (the default when ``sensitivity`` is given) chooses for the layers
    ``sensitivity`` measured, with the least total measured damage (below). ``method="owl"`` gives
    every prunable layer not in ``exclude`` a sparsity from its share of outlier Wanda scores on
    ``data`` (owl.py: ``m`` = 5 and ``lam`` = 0.08 by default, the layers of one of ``blocks``
    sharing one value; a tied output layer is left out with a warning, as in `prune()`); it works
    with any importance, e.g. wanda, sparsegpt or magnitude.

    >>> plan = tp.allocate(model, 0.7, method="owl", data=batches)
    >>> tp.prune(model, scope=plan, importance="sparsegpt", data=batches)

    Sensitivity, greedy on the measured curves: every layer starts at 0 and the next step is always the one
    with the least added damage per pruned weight (each curve is made non-decreasing first, since
    pruning more cannot really help). The step that crosses the target is taken in part, so the
    total matches the target within a weight. Layers never go beyond the highest measured
    sparsity; a target above what that allows is refused.
    """
    method = _allocation_method(method, sensitivity)
    if (isinstance(target_sparsity, bool) or not isinstance(target_sparsity, numbers.Real)
            or not 0 <= target_sparsity < 1):
        raise ValueError(f"`target_sparsity` must be in [0, 1), got {target_sparsity!r}")
    if method == "owl":
        check_owl_arguments(m, lam)
        if data is None:
            raise ValueError("method='owl' reads Wanda scores on calibration data: pass `data`")
        if iter(data) is data:
            data = list(data)
        layers, _ = target_layers(model, exclude, "layer")
        layers = leave_out_tied(model, layers, "layer", stacklevel=2)
        owners = weight_owners(model, layers, "layer")
        unique = {name: layer for name, layer in layers.items() if owners[name] == name}
        return owl_sparsities(model, unique, float(target_sparsity), data, m=m, lam=lam, blocks=blocks)
    return _allocate_by_sensitivity(model, float(target_sparsity), sensitivity)


def _allocation_method(method, sensitivity) -> str:
    """``method`` checked against ``sensitivity`` ("sensitivity" needs it, "owl" takes none)."""
    if method is None:
        method = "sensitivity" if sensitivity is not None else None
    if method not in ("sensitivity", "owl"):
        raise ValueError(f"`method` must be 'sensitivity' (with `sensitivity` from tp.sensitivity()) or 'owl' "
                         f"(with `data`), got {method!r}")
    if method == "sensitivity" and not isinstance(sensitivity, Sensitivity):
        raise TypeError(f"`sensitivity` must be the result of tp.sensitivity(), got {type(sensitivity).__name__}")
    if method == "owl" and sensitivity is not None:
        raise ValueError("method='owl' does not read `sensitivity`; pass one or the other")
    return method


def _allocate_by_sensitivity(model: nn.Module, target_sparsity: float, sensitivity: Sensitivity) -> Dict[str, float]:
    """The greedy allocation on measured curves (see `allocate`)."""
    layers, _ = target_layers(model, (), "layer")
    unknown = [name for name in sensitivity.curves if name not in layers]
    if unknown:
        raise ValueError(f"`sensitivity` measures layers {unknown} that `model` does not have")
    sizes = {name: layers[name].weight.numel() for name in sensitivity.curves}
    total = sum(sizes.values())
    wanted = target_sparsity * total
    levels = {name: [0.0] + sorted(c) for name, c in sensitivity.curves.items()}
    damage = {}
    for name, ss in levels.items():
        running, values = 0.0, []
        for s in ss:
            running = max(running, 0.0 if s == 0 else sensitivity.damage(name, s))
            values.append(running)
        damage[name] = values
    reachable = sum(sizes[n] * levels[n][-1] for n in levels)
    if wanted > reachable + 1e-9:
        raise ValueError(
            f"`target_sparsity` {target_sparsity} needs more than the highest measured sparsities allow "
            f"({reachable / total:.4f}): measure higher sparsities")
    index = {name: 0 for name in levels}
    plan = {name: 0.0 for name in levels}
    pruned = 0.0
    while pruned < wanted - 1e-9:
        best, best_cost = None, None
        for name in levels:
            i = index[name]
            if i + 1 >= len(levels[name]):
                continue
            weights = sizes[name] * (levels[name][i + 1] - levels[name][i])
            cost = (damage[name][i + 1] - damage[name][i]) / weights
            if best_cost is None or cost < best_cost:  # ties: the earlier layer in model order
                best, best_cost = name, cost
        i = index[best]
        gain = sizes[best] * (levels[best][i + 1] - levels[best][i])
        if pruned + gain >= wanted:
            plan[best] = levels[best][i] + (wanted - pruned) / sizes[best]
            break
        pruned += gain
        index[best] = i + 1
        plan[best] = levels[best][i + 1]
    return plan
