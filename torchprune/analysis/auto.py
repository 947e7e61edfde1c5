"""``tp.auto``: per-layer sparsities that meet a budget (latency, MACs or parameters) with the least
loss of a metric, in the spirit of NetAdapt (Yang et al. 2018) and AMC (He et al. 2018).

**How it chooses, and why so.** NetAdapt re-measures every candidate move on the whole model at
every step: layers x steps evaluations (for MiniLM's 36 layers and ~20 steps, 720 passes over the
evaluation data). We measure instead, once, each layer's sensitivity curve (`tp.sensitivity`:
layers x levels evaluations) and a cost table (each layer's cost at each level), then allocate
greedily on them: the next move is always the (layer, higher level) with the least added metric
loss per unit of budget saved. A move may jump several levels, because a sparse kernel often saves
nothing at 50% and a lot at 80% (the cost curve is not convex). Damages do not add up exactly, nor
do layer timings, so the plan is then checked on a pruned copy: its metric with every layer pruned
together, and its cost. For latency, the sparsified model (`tp.sparsify` with the example
inputs, which keeps each layer's faster kernel) is timed against the dense model, interleaved.
The estimate is off by a factor (on all-MiniLM-L6-v2 at 1 x 128 tokens, a plan estimated at 0.63
of dense measured 0.48), so each check re-aims the next allocation, from scratch: at the last
estimate times budget / measured, and once one plan has gone over the budget and another stayed
under it, between the two, where the line through their measurements meets the budget; until a
plan measures within ``slack`` below the budget, up to ``rounds`` checks; the best metric among
the plans that met the budget wins.

**Or NetAdapt's own loop, ``search="greedy"``** (`_Greedy`): each move chosen by evaluating the
whole model with it, every earlier move in place. It sees what the additive curves miss, layers
whose losses grow when pruned together, at up to one evaluation per layer per move: for models whose
``evaluate`` is cheap (or a short fine-tune, as NetAdapt does), not for an encoder's 36 layers.

**Every latency check times all the plans so far.** On a shared 2-core machine the ratio of the
same two models moves between timings, because dense GEMMs and sparse kernels do not slow down
alike when the machine's state changes (on an Intel Xeon the same 450 x 64 x 300 matmul took
114-120 or 154-160 us, switching within one process; a MiniLM plan measured 0.309 of dense at its
own check and 0.462 a few minutes later). Plans timed at different moments are then not comparable, and the
choice would go to whichever was timed at a lucky moment. So each latency check times the new plan
together with every plan checked before it, beside dense, in one interleaved run, and replaces
their measurements: the targets that bracket the budget, the stop and the final choice all use
measurements taken together. The cost is up to ``rounds`` sparsified copies kept in memory and
longer checks (the k-th check times k + 1 models); ``rounds[i]["first"]`` keeps what each plan
measured at its own check.

**Costs.** "latency": each layer's plain forward and its packed sparse kernel (`tp.nn.SparseLinear`
/ `SparseConv2d`, built from the layer's own weights pruned by magnitude to the level) timed at the
input shapes ``example_inputs`` gives it, medians of interleaved calls; the cost at a level is the
faster of the two, because that is what `tp.sparsify` keeps. Timings are cached per (layer type,
weight shape, input shapes, level), so the six same-shaped blocks of an encoder are timed once.
The rest of the model (attention, norms) is the dense model's latency minus its layers' times and
does not change. Never the sparsity alone: a sparsity that the kernels do not turn into speed
saves nothing here. "macs" and "params": the layer's dense MACs (`tp.summary` at the example
inputs) or weights, times the kept fraction; the rest of the model counts as it is.

>>> plan = tp.auto(model, lambda m: accuracy(m, val), budget=0.6, example_inputs=x[:1])
>>> print(plan.to_markdown())
>>> tp.prune(model, scope=plan.scope)
"""

from __future__ import annotations

import copy
import numbers
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..calibration import as_inputs
from ..importance import Importance, resolve
from ..masking import attach_mask, base_type, masks
from ..oneshot import prune
from ..progress import progress_bar
from ..selection import by_ratio
from ..sparsify import SPARSE_CLASS, input_shapes, sparsify, time_layer
from ..timing import time_interleaved
from .model_summary import summary
from .sensitivity import Sensitivity, check_sparsities, metric_of, scored_layers, sensitivity

__all__ = ["auto", "AutoPlan", "KINDS", "SEARCHES", "DEFAULT_LEVELS", "interpolate", "latency_against_dense"]

KINDS = ("latency", "macs", "params")
SEARCHES = ("curves", "greedy")
#: A sparse kernel counts as faster only below this fraction of the plain forward timed beside it:
#: a smaller gain is within the noise of two medians, and a move for it would spend metric for no speed.
FASTER = 0.95
DEFAULT_LEVELS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


class AutoPlan:
    """What `auto` found.

    * ``scope``: {layer: sparsity} for `tp.prune` / `tp.Pruner` (``scope=plan.scope``), the layers it
      prunes; empty when no move saves anything (a latency budget on layers whose sparse kernels
      never beat dense here), and then there is nothing to prune;
    * ``kind``, ``budget``: the budget asked for, a fraction of the dense model's cost;
    * ``estimated``, ``measured``: the plan's cost as a fraction of dense, from the tables and as
      measured on the pruned copy (for latency: sparsified and timed against dense); ``met``:
      ``measured <= budget``;
    * ``baseline``, ``metric``: ``evaluate`` on the model as given, and on the pruned copy;
    * ``search``: "curves" or "greedy" (`auto`'s ``search``);
    * ``steps``: each move in order (layer, from, to, cost after as a fraction, ``damage``: the
      loss the curves predict for it, or with ``search="greedy"`` the loss measured on the whole
      model, which may be negative, and ``metric``, the whole model's metric after it);
    * ``rounds``: each plan checked (target, estimated cost, ``measured``: its cost as last measured,
      for latency timed together with every plan checked, ``first``: as measured at its own check,
      metric); ``chosen``: which of them this plan is (the best metric among those that meet the
      budget, by ``measured``);
    * ``layers``: per layer: sparsity, cost at dense, cost at the plan, share of the dense cost;
    * ``sensitivity``: the measured curves (`tp.Sensitivity`); None with ``search="greedy"``, which
      measures none.
    """

    def __init__(self, kind: str, budget: float, scope: Dict[str, float], layers: List[dict], steps: List[dict],
                 rounds: List[dict], baseline: float, sens: Optional[Sensitivity], dense_cost: float,
                 chosen: int = -1, search: str = "curves"):
        self.kind, self.budget, self.scope, self.search = kind, budget, scope, search
        self.layers, self.steps, self.rounds = layers, steps, rounds
        self.baseline, self.sensitivity, self.dense_cost = baseline, sens, dense_cost
        self.chosen = chosen if chosen >= 0 else len(rounds) - 1

    @property
    def estimated(self) -> float:
        return self.rounds[self.chosen]["estimated"]

    @property
    def measured(self) -> float:
        return self.rounds[self.chosen]["measured"]

    @property
    def metric(self) -> float:
        return self.rounds[self.chosen]["metric"]

    @property
    def met(self) -> bool:
        return self.measured <= self.budget

    def to_dict(self) -> dict:
        return {"kind": self.kind, "budget": self.budget, "search": self.search, "scope": dict(self.scope),
                "baseline": self.baseline, "chosen": self.chosen,
                "dense_cost": self.dense_cost, "layers": self.layers, "steps": self.steps, "rounds": self.rounds,
                "sensitivity": None if self.sensitivity is None else self.sensitivity.to_dict()}

    def to_markdown(self) -> str:
        """The per-layer table, the checks of the plan, and the moves in order."""
        unit = {"latency": "ms", "macs": "MACs", "params": "weights"}[self.kind]
        scale = 1e3 if self.kind == "latency" else 1

        def amount(value: float) -> str:
            return f"{value * scale:.3f}" if self.kind == "latency" else f"{value:,.0f}"

        lines = [f"Budget: {self.kind} <= {self.budget:.3f} of dense; measured {self.measured:.3f} "
                 f"({'met' if self.met else 'missed'}); metric {self.metric:.4f} (dense {self.baseline:.4f}).", "",
                 f"| Layer | Sparsity | Dense ({unit}) | Planned ({unit}) | Share of dense |",
                 "|:---|---:|---:|---:|---:|"]
        for row in self.layers:
            lines.append(f"| {row['layer']} | {100 * row['sparsity']:.0f}% | {amount(row['dense'])} | "
                         f"{amount(row['planned'])} | {100 * row['share']:.1f}% |")
        lines += ["", "| Check | Target | Estimated | Measured at the check | Measured with the last | Metric | |",
                  "|---:|---:|---:|---:|---:|---:|:---|"]
        lines += [f"| {i + 1} | {r['target']:.3f} | {r['estimated']:.3f} | {r['first']:.3f} | {r['measured']:.3f} | "
                  f"{r['metric']:.4f} | {'chosen' if i == self.chosen else ''} |" for i, r in enumerate(self.rounds)]
        loss = "Predicted loss" if self.search == "curves" else "Measured loss"
        lines += ["", f"| Move | Layer | From | To | Cost after | {loss} |", "|---:|:---|---:|---:|---:|---:|"]
        lines += [f"| {i + 1} | {s['layer']} | {100 * s['from']:.0f}% | {100 * s['to']:.0f}% | {s['cost']:.3f} | "
                  f"{s['damage']:.4f} |" for i, s in enumerate(self.steps)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"AutoPlan(kind={self.kind!r}, budget={self.budget}, search={self.search!r}, "
                f"measured={self.measured:.3f}, metric={self.metric:.4f}, layers={len(self.scope)})")


def auto(model: nn.Module, evaluate: Callable[[nn.Module], float], budget: float, example_inputs,
         kind: str = "latency", sparsities: Sequence[float] = DEFAULT_LEVELS,
         importance: Union[str, Importance] = "magnitude", exclude: Iterable = (), data: Optional[Iterable] = None,
         loss_fn: Optional[Callable] = None, higher_is_better: bool = True, rounds: int = 4, repeats: int = 30,
         slack: float = 0.02, search: str = "curves", progress: bool = True) -> AutoPlan:
    """Per-layer sparsities for ``model`` whose cost is at most ``budget`` (a fraction of the dense
    model's ``kind``: "latency" on this machine at ``example_inputs``, "macs" or "params") with the
    least loss of ``evaluate(model)``; see the module docstring for how. ``model`` is left as it is.

    ``sparsities`` are the levels each layer may take (besides 0); ``importance``, ``exclude``,
    ``data`` and ``loss_fn`` mean what they mean in `tp.prune` and are used for the sensitivity
    curves and for the check (prune the model with the same ``importance`` and ``scope=plan.scope``).
    ``repeats`` is the number of interleaved timings of the whole model at each latency check.
    Each check re-aims the next allocation until a plan measures within ``slack`` below the budget;
    of the plans checked, the one with the best metric among those that meet the budget is kept.
    ``search``: "curves" allocates on each layer's sensitivity curve, measured once (layers x
    levels evaluations); "greedy" is NetAdapt's loop, each move chosen by evaluating the whole
    model with it (up to one evaluation per layer per move, `_Greedy`), for when the layers'
    losses do not add up and ``evaluate`` is cheap enough.
    """
    kind, budget, rounds, search = _checked(model, evaluate, budget, kind, rounds, slack, search)
    inputs = tuple(as_inputs(example_inputs, tensors_only=True))
    options = {"importance": importance, "data": data, "loss_fn": loss_fn}
    sign = 1 if higher_is_better else -1
    with warnings.catch_warnings(record=True) as caught:  # told again below, pointing at the caller
        warnings.simplefilter("always")
        sens, layers, baseline, levels = _layers(model, evaluate, sparsities, exclude, search, options, sign, progress)
    for warning in caught:
        warnings.warn(warning.message, warning.category, stacklevel=2)
    costs, dense_total = _cost_table(model, layers, levels, inputs, kind, repeats)
    allocate = _Greedy(model, evaluate, levels, costs, dense_total, baseline, sign, options, progress) \
        if sens is None else _Curves(levels, costs, sens, dense_total)

    check = _Checks(model, evaluate, inputs, kind, options, repeats, dense_total)
    found = _search(budget, rounds, slack, levels, costs, dense_total, allocate, check)
    met = [r for r in found if r["measured"] <= budget]
    chosen = max(met, key=lambda r: sign * r["metric"]) if met else min(found, key=lambda r: r["measured"])
    if not met:
        warnings.warn(f"tp.auto: the plan's measured {kind} is {chosen['measured']:.3f} of dense, over the budget "
                      f"{budget}, after {len(found)} check(s)", stacklevel=2)
    index = chosen.pop("index")
    steps = chosen.pop("steps")
    checks = [{k: v for k, v in r.items() if k not in ("index", "steps")} for r in found]
    rows = [{"layer": name, "sparsity": levels[index[name]], "dense": costs[name][0],
             "planned": costs[name][index[name]], "share": costs[name][0] / dense_total} for name in layers]
    return AutoPlan(kind, budget, {name: levels[i] for name, i in index.items() if i > 0}, rows, steps, checks,
                    baseline, sens, dense_total, found.index(chosen), search)


def _layers(model, evaluate, sparsities, exclude, search: str, options: dict, sign: int, progress: bool
            ) -> Tuple[Optional[Sensitivity], Dict[str, nn.Module], float, List[float]]:
    """(the sensitivity curves, None for "greedy"; the layers to plan; the metric of the model as
    given; the levels, 0 first), every argument checked before anything is evaluated."""
    levels = [0.0] + check_sparsities(sparsities)
    if search == "curves":
        sens = sensitivity(model, evaluate, levels[1:], exclude=exclude, higher_is_better=sign > 0,
                           progress=progress, **options)
        return sens, {name: m for name, m in model.named_modules() if name in sens.curves}, sens.baseline, levels
    resolve(options["importance"])
    layers = scored_layers(model, exclude, stacklevel=3)
    return None, layers, metric_of(evaluate, model), levels


def _search(budget: float, rounds: int, slack: float, levels, costs, dense_total: float, allocate, check
            ) -> List[dict]:
    """Allocations from scratch towards a target that each check re-aims, until one measures within
    ``slack`` below the budget (or no move is left, or ``rounds`` checks): the tables' estimate is
    off by a factor (layers timed alone are not the model's layers in the model), so the next
    target is the last estimate scaled by budget / measured, up or down, until the budget is
    bracketed, then found between the two (`_next_target`). ``check(scope)`` gives the measured cost of
    every plan so far (this one last; `_Checks`), which replaces the earlier measurements;
    ``allocate(index, target, steps)`` moves ``index`` (level per layer, all 0) to the target
    (`_allocate` on the curves, or `_Greedy`)."""
    found: List[dict] = []
    target = budget
    for _ in range(rounds):
        index, steps = {name: 0 for name in costs}, []
        allocate(index, target * dense_total, steps)
        if any(index == r["index"] for r in found):
            break  # the re-aimed target gives a plan already checked: nothing new to measure
        estimated = _estimate(index, costs, dense_total) / dense_total
        everyone, metric = check({name: levels[i] for name, i in index.items() if i > 0})
        found.append({"index": index, "steps": steps, "target": target, "estimated": estimated,
                      "first": everyone[-1], "metric": metric})
        for row, measured in zip(found, everyone):
            row["measured"] = measured
        measured = everyone[-1]
        if budget - slack <= measured <= budget or (measured > budget and _exhausted(index, levels, costs)):
            break
        # the plan with the highest target that undershot, and the one with the lowest that went over,
        # by the latest measurements: (target, measured)
        under = max([(r["target"], r["measured"]) for r in found if r["measured"] <= budget], default=None)
        over = min([(r["target"], r["measured"]) for r in found if r["measured"] > budget], default=None)
        target = _next_target(target, estimated, measured, budget, slack, under, over)
    return found


def _next_target(target: float, estimated: float, measured: float, budget: float, slack: float,
                 under: Optional[Tuple[float, float]], over: Optional[Tuple[float, float]]) -> float:
    """The next allocation's target. Until the budget is bracketed, the last estimate scaled by
    budget / measured (at most 1). Once a plan has measured under the budget and one with a higher
    target over it (``under``, ``over``: their (target, measured)), the target where the line through
    those two points reaches the middle of the slack window below the budget (regula falsi), inside
    the two: the tables' estimate is not off by the same factor at every level (all-MiniLM-L6-v2 on
    an Intel Xeon: a plan estimated at 0.652 measured 0.471, one at 0.829 measured 0.780), and
    scaling by the last factor alone aimed at 0.638, which gave the first plan again and ended the
    search 0.13 under the budget. Plans re-timed together can contradict each other (the higher
    target under the budget, the lower one over it): no bracket holds then, and the scaled target
    is taken."""
    scaled = min(1.0, estimated * budget / measured) if measured > 0 else target
    if under is None or over is None or not under[0] < over[0]:
        return scaled
    (low, low_measured), (high, high_measured) = under, over  # low_measured <= budget < high_measured
    aim = budget - slack / 2
    return min(high, max(low, low + (aim - low_measured) * (high - low) / (high_measured - low_measured)))


def interpolate(points: Sequence[Tuple[float, float]], cost: float) -> Optional[float]:
    """The metric at ``cost``, linear between the two (cost, metric) ``points`` that bracket it
    (the better metric when both have that cost), or None outside them: how a plan is compared
    with uniform sparsity at the same measured cost."""
    ordered = sorted(points)
    for (low_cost, low), (high_cost, high) in zip(ordered, ordered[1:]):
        if low_cost <= cost <= high_cost:
            if high_cost == low_cost:
                return max(low, high)
            return low + (cost - low_cost) / (high_cost - low_cost) * (high - low)
    return None


def _checked(model, evaluate, budget, kind, rounds, slack, search) -> Tuple[str, float, int, str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(evaluate):
        raise TypeError(f"`evaluate` must be callable, got {type(evaluate).__name__}")
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0 < budget < 1:
        raise ValueError(f"`budget` must be a fraction of the dense model's {kind} in (0, 1), got {budget!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 1:
        raise ValueError(f"`rounds` must be a positive int, got {rounds!r}")
    if isinstance(slack, bool) or not isinstance(slack, numbers.Real) or not 0 <= slack < budget:
        raise ValueError(f"`slack` must be a number in [0, budget), got {slack!r}")
    if search not in SEARCHES:
        raise ValueError(f"`search` must be one of {SEARCHES}, got {search!r}")
    return kind, float(budget), int(rounds), search


def _monotone(values: List[float]) -> List[float]:
    """Each damage at least the one before: pruning more cannot really help."""
    out, running = [], 0.0
    for value in values:
        running = max(running, value)
        out.append(running)
    return out


def _cost_table(model: nn.Module, layers: Dict[str, nn.Module], levels: List[float], inputs, kind: str,
                repeats: int) -> Tuple[Dict[str, List[float]], float]:
    """Each layer's cost at each level, and the dense model's total cost."""
    if kind == "params":
        total = float(sum(p.numel() for p in model.parameters()))
        return {name: [layer.weight.numel() * (1 - s) for s in levels] for name, layer in layers.items()}, total
    if kind == "macs":
        report = summary(model, example_inputs=inputs)
        macs = {row["name"]: row["macs_dense"] or 0 for row in report.rows}
        return ({name: [macs.get(name, 0) * (1 - s) for s in levels] for name in layers},
                float(report.totals["macs_dense"]))
    timed = {name: layer for name, layer in layers.items() if base_type(layer) in SPARSE_CLASS}
    shapes = input_shapes(model, inputs, timed)  # a layer with no sparse kernel never saves: cost 0 throughout
    cache: Dict[tuple, List[float]] = {}
    costs = {}
    for name, layer in layers.items():
        key = (base_type(layer), tuple(layer.weight.shape), tuple(tuple(s) for s in shapes.get(name, ())),
               layer.weight.dtype)
        if key not in cache:
            cache[key] = _layer_latencies(layer, shapes.get(name, []), levels)
        costs[name] = cache[key]
    dense = _plain(model)
    with torch.no_grad():
        total = time_interleaved({"dense": lambda: dense(*inputs)}, repeats)["dense"]
    return costs, total


def _plain(model: nn.Module) -> nn.Module:
    """The reference the plan is timed against: a copy of ``model`` as given, in eval mode."""
    return copy.deepcopy(model).eval()


def _layer_latencies(layer: nn.Module, shapes: List[torch.Size], levels: List[float]) -> List[float]:
    """The layer's latency at each level: its sparse kernel's, with the layer's weights pruned by
    magnitude to the level, where that beats the plain forward timed beside it by 5% (`FASTER`); else the plain
    forward's time at level 0 (so timing noise between two dense timings is never a saving). Zero
    throughout when the layer is never called or has no sparse kernel."""
    if not shapes or base_type(layer) not in SPARSE_CLASS:
        return [0.0] * len(levels)
    plain = copy.deepcopy(layer)
    plain.__class__ = base_type(layer)  # a masked layer's plain class: the dense reference
    if hasattr(plain, "weight_mask"):
        del plain.weight_mask
    dense, _ = time_layer(plain, shapes, sparse=plain)
    out = [dense]
    for level in levels[1:]:
        masked = copy.deepcopy(plain)
        attach_mask(masked, by_ratio(masked.weight.detach().abs(), None, level))
        dense_s, sparse_s = time_layer(plain, shapes, sparse=SPARSE_CLASS[base_type(layer)].from_dense(masked))
        out.append(sparse_s if sparse_s < FASTER * dense_s else dense)
    return out


def _estimate(index: Dict[str, int], costs: Dict[str, List[float]], dense_total: float) -> float:
    return dense_total - sum(costs[name][0] - costs[name][i] for name, i in index.items())


def _allocate(index, levels, costs, damage, dense_total: float, target: float, steps: List[dict]) -> None:
    """Greedy moves until the estimated cost is at most ``target``: each time the (layer, higher
    level) with the least added damage per unit of cost saved (ties: the smaller jump, then the
    earlier layer), unless a move that reaches the target adds no more damage than that one: then
    that move ends it (a big jump would overshoot the budget and lose more than needed). Stops
    early when no move saves anything."""
    current = _estimate(index, costs, dense_total)
    while current > target:
        moves = [(name, j, costs[name][i] - costs[name][j], damage[name][j] - damage[name][i], j - i, order)
                 for order, (name, i) in enumerate(index.items()) for j in range(i + 1, len(levels))
                 if costs[name][i] > costs[name][j]]
        if not moves:
            return
        best = min(moves, key=lambda m: (m[3] / m[2], m[4], m[5]))
        finishing = [m for m in moves if current - m[2] <= target]
        if finishing:
            cheapest = min(finishing, key=lambda m: m[3])
            if cheapest[3] <= best[3]:
                best = cheapest
        name, j, saved, added = best[:4]
        current -= saved
        steps.append({"layer": name, "from": levels[index[name]], "to": levels[j], "cost": current / dense_total,
                      "damage": added})
        index[name] = j


def _exhausted(index, levels, costs) -> bool:
    """No move left that saves anything."""
    return not any(costs[name][i] - costs[name][j] > 0
                   for name, i in index.items() for j in range(i + 1, len(levels)))


class _Curves:
    """The default search: `_allocate` on the cost table and each layer's damage from its curve
    (made monotone), from scratch for each target."""

    def __init__(self, levels, costs, sens: Sensitivity, dense_total: float):
        self.levels, self.costs, self.dense_total = levels, costs, dense_total
        self.damage = {name: _monotone([0.0] + [sens.damage(name, s) for s in levels[1:]]) for name in costs}

    def __call__(self, index: Dict[str, int], target: float, steps: List[dict]) -> None:
        _allocate(index, self.levels, self.costs, self.damage, self.dense_total, target, steps)


class _Greedy:
    """NetAdapt's search (Yang et al. 2018), ``search="greedy"``: every move is chosen by evaluating
    the whole model with it. From the current plan, each layer's next level that saves anything (a
    jump over levels whose kernel is no faster) is tried on a pruned copy of the model, the current
    plan with that one layer moved; the move kept loses the least metric per unit of cost saved.

    Why, beside the curves: the curves price each layer pruned alone, and the allocation adds those
    prices up. Measured together, layers interact: on the digits MLP (64-300-100-10) the classifier
    pruned alone to 95% costs little after fine-tuning, and with both hidden layers at 90-95% it
    costs several points. Here the price of a move is measured with every earlier move in place.
    The cost: up to one evaluation per layer per move (the curves: one per layer per level, once).

    The moves form one path from dense, extended only as far as a target needs and shared by every
    target the checks re-aim to (a higher one takes an earlier point of it), so re-aiming evaluates
    nothing twice. Each candidate is pruned from a fresh copy with the whole scope, as `_Checks` and
    `tp.prune(model, scope=plan.scope)` do, so a plan's metric here is the metric it will have."""

    def __init__(self, model, evaluate, levels, costs, dense_total: float, baseline: float, sign: int,
                 options: dict, progress: bool):
        self.model, self.evaluate, self.levels, self.costs = model, evaluate, levels, costs
        self.dense_total, self.sign, self.options, self.progress = dense_total, sign, options, progress
        self.path = [({name: 0 for name in costs}, dense_total, baseline)]  # (index, estimated cost, metric)
        self.moves: List[dict] = []

    def __call__(self, index: Dict[str, int], target: float, steps: List[dict]) -> None:
        """``index`` (all 0) set to the first plan of the path whose estimate is at most ``target``
        (the last one when none is), and its moves appended to ``steps``."""
        most = len(self.costs) * (len(self.levels) - 1)  # every layer to the highest level, one at a time
        bar = progress_bar(most, "auto: greedy", len(self.moves)) if self.progress else None
        while self.path[-1][1] > target and self._extend():
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        at = next((k for k, (_, cost, _) in enumerate(self.path) if cost <= target), len(self.path) - 1)
        index.update(self.path[at][0])
        steps.extend(dict(move) for move in self.moves[:at])

    def _extend(self) -> bool:
        """One more move on the path; False when no layer has a level left that saves anything."""
        index, current, metric = self.path[-1]
        tried = []
        for order, (name, i) in enumerate(index.items()):
            cost = self.costs[name]
            j = next((j for j in range(i + 1, len(self.levels)) if cost[j] < cost[i]), None)
            if j is not None:
                value = self._metric({**index, name: j})
                saved = cost[i] - cost[j]
                tried.append((self.sign * (metric - value) / saved, order, name, j, saved, value))
        if not tried:
            return False
        _, _, name, j, saved, value = min(tried)
        self.moves.append({"layer": name, "from": self.levels[index[name]], "to": self.levels[j],
                           "cost": (current - saved) / self.dense_total, "damage": self.sign * (metric - value),
                           "metric": value})
        self.path.append(({**index, name: j}, current - saved, value))
        return True

    def _metric(self, index: Dict[str, int]) -> float:
        scope = {name: self.levels[i] for name, i in index.items() if i > 0}
        return metric_of(self.evaluate, _pruned_copy(self.model, scope, self.options))


def _pruned_copy(model: nn.Module, scope: Dict[str, float], options: dict) -> nn.Module:
    """A copy of ``model`` pruned to ``scope`` with `auto`'s ``importance``, ``data`` and
    ``loss_fn`` (``options``), as ``tp.prune(model, scope=plan.scope)`` will; the copy as it is when
    ``scope`` is empty (`tp.prune` refuses an empty scope)."""
    pruned = copy.deepcopy(model)
    if scope:
        prune(pruned, scope=scope, **options)
    return pruned


class _Checks:
    """The plans applied to copies of the model, one call per plan: ``checks(scope)`` gives (the
    measured cost of every plan so far, as a fraction of dense, this one last; this plan's metric).
    Parameters and MACs are counted once. Latency: the new plan is sparsified and kept, and all the
    kept plans are timed together beside dense in one interleaved run (module docstring), so every
    call re-measures the earlier plans too. ``dense_total`` is `_cost_table`'s: the dense model's
    parameters or MACs (latency is re-timed beside the plans instead)."""

    def __init__(self, model, evaluate, inputs, kind, options: dict, repeats, dense_total: float):
        self.model, self.evaluate, self.inputs, self.kind = model, evaluate, inputs, kind
        self.options, self.repeats, self.dense_total = options, repeats, dense_total
        self.counted: List[float] = []  # params / macs: each plan's cost, measured once
        self.fast: List[nn.Module] = []  # latency: each plan, sparsified

    def __call__(self, scope) -> Tuple[List[float], float]:
        pruned = _pruned_copy(self.model, scope, self.options)
        metric = metric_of(self.evaluate, pruned)
        if self.kind == "params":  # the parameters not masked out, as the estimate counts them
            masked_out = sum(int((~mask).sum()) for mask in masks(pruned).values())
            self.counted.append((self.dense_total - masked_out) / self.dense_total)
            return list(self.counted), metric
        if self.kind == "macs":
            self.counted.append(summary(pruned, example_inputs=self.inputs).totals["macs_effective"] / self.dense_total)
            return list(self.counted), metric
        self.fast.append(sparsify(pruned, example_inputs=self.inputs).eval())
        labels = {f"check {i + 1}": fast for i, fast in enumerate(self.fast)}
        ratios, _ = latency_against_dense(_plain(self.model), labels, self.inputs, self.repeats)
        return [ratios[label] for label in labels], metric


def latency_against_dense(dense: nn.Module, models: Dict[str, nn.Module], inputs: tuple,
                          repeats: int) -> Tuple[Dict[str, float], float]:
    """``dense`` and each of ``models`` called as ``model(*inputs)`` round-robin, under no_grad
    (`tp.timing`: medians of ``repeats``), each sample the second of two calls in a row (settle=1:
    a model is timed as it runs deployed, not right after another model): ({label: its time /
    dense time}, dense seconds)."""
    if "dense" in models:
        raise ValueError("`models` must not name one 'dense': that label is the reference")
    runners = {label: (lambda m=m: m(*inputs)) for label, m in {"dense": dense, **models}.items()}
    with torch.no_grad():
        times = time_interleaved(runners, repeats, settle=1)
    return {label: times[label] / times["dense"] for label in models}, times["dense"]

