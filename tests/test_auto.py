"""``tp.auto``: per-layer sparsities that meet a latency, MACs or parameter budget with the least
loss of a metric (torchprune/analysis/auto.py).

What is checked:

* the argument errors, each naming its argument, raised before anything is evaluated;
* the model passed in is left as it was (tensors, masks, classes, modes, hooks) for every kind,
  a partly masked model with BatchNorm in train mode included;
* "params" and "macs": the plan meets the budget, its estimate is the cost measured on the pruned
  copy (both exact counts, recomputed here from `tp.summary`), its levels are the given ones,
  `tp.prune(copy, scope=plan.scope)` gives ``plan.metric`` exactly, its moves are consistent;
* the greedy allocation: against a brute force over every level assignment (same cost table, same
  monotone damages), and `_allocate` on hand-made tables (a jump over a level that saves nothing,
  the finishing move that avoids overshooting, ties, the stop when nothing saves anything);
* "latency" with fake timings (`time_layer`, `time_interleaved` patched in auto's namespace): the
  cost table is min(dense, sparse), layers sharing (type, weight shape, input shapes, dtype) are
  timed once, a layer never called costs 0, a measured miss starts a round towards the scaled
  target, the warning after the last round, ``met``;
* ``search="greedy"`` (NetAdapt): losses that do not add up (the curves' plan loses 12, greedy's
  3), a loss metric, a move that improves the metric, re-aiming along one path with no plan
  evaluated twice and no level that saves nothing tried, the stop when nothing is left;
* `AutoPlan`: Markdown, JSON-serialisable dict, repr; and one real (unfaked) latency run whose scope
  `tp.prune` and `tp.Pruner` take. Nothing here asserts a speed.
"""

import copy
import importlib
import itertools
import json
import warnings
from collections import Counter

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.masking import effective_weight

from conftest import TinyGPT, assert_unchanged, make_mlp, snapshot

A = importlib.import_module("torchprune.analysis.auto")  # the module (tp.auto is the function)

pytestmark = pytest.mark.usefixtures("one_thread")

LEVELS = (0.25, 0.5, 0.75)  # whole weight counts for every layer below (sizes are multiples of 4)


# ----------------------------------------------------------------------------------------------------
# helpers


def zero_fraction(layer):
    weight = effective_weight(layer)
    return float((weight == 0).sum()) / weight.numel()


def layer_metric(weights, powers=None):
    """A deterministic metric: 1 - sum over layers of weight * (its sparsity) ** power. The damage of
    one layer at sparsity s is exactly weight * s ** power."""
    powers = powers or {}

    def evaluate(model):
        modules = dict(model.named_modules())
        return 1.0 - sum(w * zero_fraction(modules[name]) ** powers.get(name, 1) for name, w in weights.items())

    return evaluate


def output_metric(x):
    """Minus the mean squared change of the outputs (in eval mode) from those of the first call, the
    baseline: a real, deterministic metric that leaves the model's train/eval modes as they were."""
    reference = []

    def evaluate(model):
        modes = [m.training for m in model.modules()]
        model.eval()
        with torch.no_grad():
            out = model(x)
        for m, mode in zip(model.modules(), modes):
            m.training = mode
        if not reference:
            reference.append(out)
        return -float(((out - reference[0]) ** 2).mean())

    return evaluate


def make_mlp4(seed=0):
    torch.manual_seed(seed)  # weights 128, 256, 192, 48
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 4))


def make_cnn(seed=0):
    torch.manual_seed(seed)  # weights 216, 1152, 1024; input (N, 3, 6, 6)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(256, 4))


class BnNet(nn.Module):
    """Conv2d + BatchNorm (its bias starts at zero), Conv1d (unless ``conv1d=False``) and Linear."""

    def __init__(self, conv1d=True):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1) if conv1d else None
        self.fc = nn.Linear(8 * 16, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))  # (N, 8, 4, 4)
        if self.conv1d is not None:
            x = torch.relu(self.conv1d(x.flatten(2)))  # (N, 8, 16)
        return self.fc(x.flatten(1))


def prunable(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}


def monotone_damage(sens, name, levels):
    out, running = [0.0], 0.0
    for s in levels:
        running = max(running, sens.damage(name, s))
        out.append(running)
    return out


def assert_steps_consistent(plan, levels):
    """Each move takes one layer from where it was to a higher given level; the cost only goes down;
    the moves end where the scope says; the damages add up to the plan's predicted damage (greedy:
    each is the drop of the whole model's metric from the move before, and the last metric is the
    plan's)."""
    at, last, metric = {}, 1.0, plan.baseline
    for step in plan.steps:
        assert step["from"] == at.get(step["layer"], 0.0)
        assert step["to"] > step["from"] and step["to"] in levels
        assert step["cost"] < last
        if plan.search == "greedy":
            assert step["damage"] == metric - step["metric"]
            metric = step["metric"]
        else:
            assert step["damage"] >= 0
        at[step["layer"]], last = step["to"], step["cost"]
    assert at == plan.scope
    assert set(plan.scope.values()) <= set(levels)
    if plan.steps:
        assert plan.steps[-1]["cost"] == pytest.approx(plan.estimated, rel=1e-12)
    if plan.search == "greedy":
        assert metric == plan.metric
        return
    sens = plan.sensitivity
    sorted_levels = sorted(levels)
    predicted = sum(monotone_damage(sens, name, sorted_levels)[[0.0, *sorted_levels].index(s)]
                    for name, s in plan.scope.items())
    assert sum(step["damage"] for step in plan.steps) == pytest.approx(predicted, abs=1e-12)


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


class FakeTimes:
    """Deterministic stand-ins for `time_layer` and `time_interleaved` in auto's namespace.

    A layer's dense time is ``dense[weight shape] * (number of input shapes)``; its sparse kernel at
    level s takes ``factor[s]`` times that. The whole dense model takes ``total``; the plan of the
    k-th check takes ``measured[k]`` (the last one repeated) times that whenever it is timed, unless
    ``by_call`` is given: then in the k-th timing of plans, plan i takes ``by_call[k][i]`` times it."""

    def __init__(self, dense, factor, total, measured=(0.5,), by_call=None):
        self.dense, self.factor, self.total, self.measured = dense, factor, total, list(measured)
        self.by_call = by_call
        self.layer_calls = []  # (type, weight shape, input shapes, dtype, level)
        self.checks = 0  # timings of plans (each check times every plan so far, in one call)

    def time_layer(self, layer, shapes, sparse=None):
        assert sparse is not None  # auto always passes the module to compare with
        level = 0.0 if sparse is layer else round(tp.summary(sparse).rows[0]["sparsity"], 6)
        self.layer_calls.append((type(layer), tuple(layer.weight.shape), tuple(tuple(s) for s in shapes),
                                 layer.weight.dtype, level))
        dense = self.dense[tuple(layer.weight.shape)] * len(shapes)
        return dense, dense * self.factor.get(level, 1.0)

    def time_interleaved(self, runners, repeats, *args, **kwargs):
        for run in runners.values():  # each runs
            run()
        if set(runners) == {"dense"}:
            return {"dense": self.total}
        plans = [label for label in runners if label != "dense"]
        assert "dense" in runners and (plans == ["plan"] or plans == [f"check {i + 1}" for i in range(len(plans))])
        call, self.checks = self.checks, self.checks + 1
        if plans == ["plan"]:  # latency_against_dense called directly
            return {"dense": self.total, "plan": self.measured[min(call, len(self.measured) - 1)] * self.total}
        fractions = (self.by_call[call] if self.by_call is not None else
                     [self.measured[min(i, len(self.measured) - 1)] for i in range(len(plans))])
        return {"dense": self.total, **{label: f * self.total for label, f in zip(plans, fractions)}}


@pytest.fixture
def fake_times(monkeypatch):
    def install(*args, **kwargs):
        fake = FakeTimes(*args, **kwargs)
        monkeypatch.setattr(A, "time_layer", fake.time_layer)
        monkeypatch.setattr(A, "time_interleaved", fake.time_interleaved)
        return fake

    return install


# ----------------------------------------------------------------------------------------------------
# 1. argument errors


def test_argument_errors_name_the_argument_and_nothing_is_evaluated():
    model = make_mlp()
    before = snapshot(model)
    x = torch.randn(4, 16)
    calls = []

    def evaluate(m):
        calls.append(1)
        return 1.0

    def run(**changes):
        kwargs = dict(model=model, evaluate=evaluate, budget=0.5, example_inputs=x, kind="params", progress=False)
        kwargs.update(changes)
        return tp.auto(**kwargs)

    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        run(model=model.state_dict())
    with pytest.raises(TypeError, match="`evaluate` must be callable"):
        run(evaluate=0.5)
    for budget in (0, 1, 1.5, -0.2, True, "a", None, float("nan")):
        with pytest.raises(ValueError, match="`budget` must be a fraction"):
            run(budget=budget)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        run(kind="flops")
    for rounds in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="`rounds` must be a positive int"):
            run(rounds=rounds)
    for slack in (-0.1, 0.5, 0.9, True, "a", float("nan")):
        with pytest.raises(ValueError, match="`slack` must be"):
            run(slack=slack)
    for sparsities in ((), (0.5, 1.0), (0.0, 0.5), (True,), [0.5, -0.1]):
        with pytest.raises(ValueError, match="`sparsities` must be"):
            run(sparsities=sparsities)
    for sparsities in (None, 0.5, ("a",), [0.5, object()]):
        with pytest.raises(TypeError, match="`sparsities` must be"):
            run(sparsities=sparsities)
    with pytest.raises(ValueError, match="`importance` must be one of"):
        run(importance="hessian")
    with pytest.raises(ValueError, match="`importance` must be one of"):
        run(importance="hessian", search="greedy")
    for sparsities in ((), (0.5, 1.0)):
        with pytest.raises(ValueError, match="`sparsities` must be"):
            run(sparsities=sparsities, search="greedy")
    for search in ("netadapt", None, 1):
        with pytest.raises(ValueError, match=r"`search` must be one of \('curves', 'greedy'\), got"):
            run(search=search)
    assert calls == []
    assert_unchanged(model, before)


def test_an_evaluate_that_does_not_return_a_number_is_refused():
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(TypeError, match="`evaluate` must return a number"):
        tp.auto(model, lambda m: "good", 0.5, torch.randn(2, 16), kind="params", progress=False)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------------------
# 2. the model passed in is left as it was


@pytest.mark.parametrize("search", A.SEARCHES)
@pytest.mark.parametrize("kind", A.KINDS)
def test_the_model_is_left_unchanged(kind, search, fake_times):
    if kind == "latency":  # fake layer and model timings (the check's tp.sparsify still times for real)
        fake_times({(8, 3, 3, 3): 2.0, (4, 128): 1.0}, {0.5: 0.75, 0.75: 0.5}, 8.0, (0.6,))
    # BatchNorm in train mode: a forward in train mode would move its running stats. No Conv1d for
    # latency: see test_latency_with_a_conv1d_layer
    model = BnNet(conv1d=kind != "latency")
    tp.prune(model, scope={"conv": 0.25, "fc": 0.5})  # partly masked already
    model.train()
    x = torch.randn(4, 3, 4, 4)
    before = snapshot(model)
    masks = {k: v.clone() for k, v in tp.masks(model).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a missed budget warns; not what is checked here
        plan = tp.auto(model, output_metric(x), 0.6, x, kind=kind, sparsities=(0.5, 0.75), search=search,
                       progress=False)
    assert plan.scope  # something was pruned on the copy
    assert_unchanged(model, before)
    now = tp.masks(model)
    assert set(now) == set(masks) and all(torch.equal(now[k], masks[k]) for k in masks)
    assert no_hooks(model)


def test_the_model_is_left_unchanged_with_a_real_latency_run():
    model = make_mlp()
    tp.prune(model, scope={"2": 0.25})
    x = torch.randn(8, 16)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tp.auto(model, output_metric(x), 0.8, x, kind="latency", sparsities=(0.5, 0.9), repeats=3, progress=False)
    assert_unchanged(model, before)
    assert no_hooks(model)


# ----------------------------------------------------------------------------------------------------
# 3. "params" and "macs": the budget, the estimate against the measurement, the scope


def randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


CASES = [  # (model, input, budget)
    (make_mlp, randn(16, 16), 0.5),
    (make_mlp4, randn(8, 8), 0.35),
    (make_cnn, randn(2, 3, 6, 6), 0.6),
]


@pytest.mark.parametrize("search", A.SEARCHES)
@pytest.mark.parametrize("kind", ["params", "macs"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_counted_kinds_meet_the_budget_and_the_estimate_is_the_measurement(kind, case, search):
    build, x, budget = CASES[case]
    model = build()
    evaluate = output_metric(x)
    plan = tp.auto(model, evaluate, budget, x, kind=kind, sparsities=LEVELS, search=search, progress=False)
    assert isinstance(plan, tp.AutoPlan) and plan.kind == kind and plan.budget == budget and plan.search == search
    assert plan.met and plan.measured <= budget
    assert len(plan.rounds) == 1 and plan.rounds[0]["target"] == budget

    pruned = copy.deepcopy(model)
    tp.prune(pruned, scope=plan.scope)
    assert evaluate(pruned) == plan.metric  # the check is tp.prune with the plan's scope, exactly
    for name, layer in prunable(pruned).items():
        assert zero_fraction(layer) == plan.scope.get(name, 0.0)

    after, dense = tp.summary(pruned, example_inputs=x).totals, tp.summary(model, example_inputs=x).totals
    if kind == "params":
        measured = after["nonzeros"] / dense["params"]
        weights = {name: layer.weight.numel() for name, layer in prunable(model).items()}
        by_hand = (dense["params"] - sum(weights[n] * s for n, s in plan.scope.items())) / dense["params"]
    else:
        measured = after["macs_effective"] / dense["macs_dense"]
        rows = {row["name"]: row for row in tp.summary(model, example_inputs=x).rows}
        by_hand = (dense["macs_dense"] - sum(rows[n]["macs_dense"] * s for n, s in plan.scope.items())) / dense[
            "macs_dense"]
    assert plan.measured == pytest.approx(measured, rel=1e-12)
    assert plan.estimated == pytest.approx(measured, rel=1e-12)
    assert by_hand == pytest.approx(measured, rel=1e-12)
    assert plan.dense_cost == (dense["params"] if kind == "params" else dense["macs_dense"])
    assert_steps_consistent(plan, LEVELS)
    assert plan.baseline == evaluate(model) == 0.0


def test_a_loss_metric_gives_the_plan_of_the_same_accuracy_metric():
    model, x = make_mlp4(), torch.randn(8, 8)
    accuracy = layer_metric({"0": 1.0, "2": 0.5, "4": 2.0, "6": 3.0}, {"0": 2, "4": 3})
    up = tp.auto(model, accuracy, 0.5, x, kind="params", sparsities=LEVELS, progress=False)
    down = tp.auto(model, lambda m: 5.0 - accuracy(m), 0.5, x, kind="params", sparsities=LEVELS,
                   higher_is_better=False, progress=False)
    assert up.scope == down.scope
    assert [(s["layer"], s["to"]) for s in up.steps] == [(s["layer"], s["to"]) for s in down.steps]


def test_excluded_layers_are_not_in_the_plan_and_count_as_they_are():
    model, x = make_mlp(), torch.randn(4, 16)
    # 1436 params; without layer 2 at most 0.75 * (512 + 96) = 456 go: 980 / 1436 > 0.6
    with pytest.warns(UserWarning, match=r"measured params is 0\.682 of dense, over the budget 0\.6, "
                                         r"after 1 check\(s\)"):
        plan = tp.auto(model, layer_metric({"0": 1.0, "2": 1.0, "4": 1.0}), 0.6, x, kind="params",
                       sparsities=LEVELS, exclude=["2"], progress=False)
    assert "2" not in plan.scope and "2" not in plan.sensitivity.curves
    assert [row["layer"] for row in plan.layers] == ["0", "4"]
    assert plan.scope == {"0": 0.75, "4": 0.75} and not plan.met
    assert plan.measured == plan.estimated == pytest.approx(980 / 1436, rel=1e-12)


def test_a_tied_output_layer_is_left_out():
    model = TinyGPT()
    with pytest.warns(UserWarning, match="layer 'lm_head' left unpruned"):
        plan = tp.auto(model, lambda m: 1.0, 0.9, torch.arange(8).view(1, 8), kind="params", sparsities=(0.5,),
                       progress=False)
    assert plan.scope == {"mlp": 0.5} and plan.measured == pytest.approx((200 - 32) / 200)


def test_the_tied_layer_warning_points_at_the_caller():
    with pytest.warns(UserWarning, match="layer 'lm_head' left unpruned") as record:
        tp.auto(TinyGPT(), lambda m: 1.0, 0.9, torch.arange(8).view(1, 8), kind="params", sparsities=(0.5,),
                progress=False)
    assert [r.filename for r in record] == [__file__]


def test_params_estimate_is_the_measurement_with_zero_valued_parameters():
    model, x = BnNet(), torch.randn(2, 3, 4, 4)
    plan = tp.auto(model, output_metric(x), 0.5, x, kind="params", sparsities=LEVELS, progress=False)
    assert plan.estimated == pytest.approx(plan.measured, rel=1e-12)


def test_sparsities_may_be_a_generator():
    model, x = make_mlp(), torch.randn(4, 16)
    evaluate = layer_metric({"0": 1.0, "2": 1.0, "4": 1.0})
    expected = tp.auto(model, evaluate, 0.5, x, kind="params", sparsities=LEVELS, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        plan = tp.auto(model, evaluate, 0.5, x, kind="params", sparsities=(s for s in LEVELS), progress=False)
    assert plan.scope == expected.scope


def test_repeated_sparsities_are_one_level(fake_times, monkeypatch):
    fake = fake_times({(32, 16): 4.0, (24, 32): 6.0, (4, 24): 1.0}, {0.5: 0.75, 0.75: 0.5}, 16.0, (0.5,))
    calls = itertools.count()
    plain = fake.time_layer

    def noisy(layer, shapes, sparse=None):  # each timing a little faster than the one before: noise
        dense, fast = plain(layer, shapes, sparse)
        return dense, fast * (1 - 0.01 * next(calls))

    monkeypatch.setattr(A, "time_layer", noisy)
    # the budget is out of reach of the tables (10.5 of 16 at best): every move that saves is taken
    plan = tp.auto(make_mlp(), lambda m: 1.0, 0.5, torch.randn(4, 16), kind="latency", sparsities=(0.5, 0.5, 0.75),
                   progress=False)
    assert [(s["from"], s["to"]) for s in plan.steps if s["layer"] == "0"] == [(0.0, 0.5), (0.5, 0.75)]
    assert len(fake.layer_calls) == 3 * 3  # three layers, each at 0, 0.5 and 0.75


# ----------------------------------------------------------------------------------------------------
# 4. the greedy allocation: brute force and hand-made tables


def brute_force(costs, damage, total, budget):
    """The least total damage over every level assignment whose estimated cost is within budget."""
    names = list(costs)
    best = None
    for assignment in itertools.product(*(range(len(costs[n])) for n in names)):
        cost = total - sum(costs[n][0] - costs[n][i] for n, i in zip(names, assignment))
        if cost <= budget * total:
            lost = sum(damage[n][i] for n, i in zip(names, assignment))
            best = lost if best is None else min(best, lost)
    return best


@pytest.mark.parametrize("kind", ["params", "macs"])
@pytest.mark.parametrize("seed", range(4))
def test_greedy_against_brute_force(kind, seed):
    model, x = make_mlp4(), torch.randn(4, 8)
    g = torch.Generator().manual_seed(seed)
    weights = {n: float(torch.rand(1, generator=g)) + 0.05 for n in ("0", "2", "4", "6")}
    powers = {n: int(torch.randint(1, 4, (1,), generator=g)) for n in ("0", "2", "4", "6")}
    budget = (0.35, 0.45, 0.6, 0.75)[seed]  # the least reachable: 0.30 of params, 0.25 of MACs
    plan = tp.auto(model, layer_metric(weights, powers), budget, x, kind=kind, sparsities=LEVELS, progress=False)
    levels = [0.0, *LEVELS]
    layers = {name: layer for name, layer in model.named_modules() if name in plan.sensitivity.curves}
    costs, total = A._cost_table(model, layers, levels, (x,), kind, 1)
    damage = {n: monotone_damage(plan.sensitivity, n, LEVELS) for n in layers}
    for n, w in weights.items():  # the curves are the metric's exact damages
        assert damage[n] == pytest.approx([w * s ** powers[n] for s in levels], abs=1e-12)
    assert plan.met and plan.estimated <= budget + 1e-12
    greedy = sum(damage[n][levels.index(plan.scope.get(n, 0.0))] for n in layers)
    optimum = brute_force(costs, damage, total, budget)
    assert optimum is not None and greedy >= optimum - 1e-12
    assert greedy <= 1.25 * optimum + 1e-9, (greedy, optimum, plan.scope)  # 1.09 at worst here


def allocate(costs, damage, target, total=100.0, levels=(0.0, 0.5, 0.8), start=None):
    index = dict(start or {name: 0 for name in costs})
    steps = []
    A._allocate(index, list(levels), costs, damage, total, target, steps)
    return index, [(s["layer"], s["from"], s["to"], round(s["cost"] * total, 9), s["damage"]) for s in steps]


def test_allocate_jumps_over_a_level_that_saves_nothing():
    # a's sparse kernel is slower than dense at 50% (its cost there is the dense cost): only 0 -> 80% saves
    costs = {"a": [10.0, 10.0, 4.0], "b": [10.0, 9.0, 8.0]}
    damage = {"a": [0.0, 0.1, 0.6], "b": [0.0, 0.5, 1.0]}
    index, steps = allocate(costs, damage, 94.0)
    assert steps == [("a", 0.0, 0.8, 94.0, 0.6)] and index == {"a": 2, "b": 0}


def test_allocate_the_finishing_move_avoids_overshooting():
    costs = {"a": [50.0, 30.0, 10.0], "b": [10.0, 8.0, 2.0]}
    damage = {"a": [0.0, 1.0, 3.0], "b": [0.0, 0.5, 4.0]}
    # best ratio: a -> 50% (saves 20 for 1); but b -> 50% already reaches 99 for 0.5: it ends it
    assert allocate(costs, damage, 99.0)[1] == [("b", 0.0, 0.5, 98.0, 0.5)]
    # to 75: the only finishing move (a -> 80%, damage 3) loses more than the best ratio one (damage 1):
    # a -> 50% first, then a -> 80% finishes with damage 2, not b -> 80% (damage 4)
    index, steps = allocate(costs, damage, 75.0)
    assert steps == [("a", 0.0, 0.5, 80.0, 1.0), ("a", 0.5, 0.8, 60.0, 2.0)] and index == {"a": 2, "b": 0}


def test_allocate_ties_smaller_jump_then_earlier_layer():
    # one layer: 0 -> 50% and 0 -> 80% have the same ratio: the smaller jump first
    index, steps = allocate({"a": [10.0, 8.0, 6.0]}, {"a": [0.0, 1.0, 2.0]}, 97.0)
    assert steps == [("a", 0.0, 0.5, 98.0, 1.0), ("a", 0.5, 0.8, 96.0, 1.0)]
    # two same layers: every ratio ties; the earlier layer's one-level move first each time
    same = {"a": [10.0, 8.0, 6.0], "b": [10.0, 8.0, 6.0]}
    index, steps = allocate(same, {"a": [0.0, 1.0, 2.0], "b": [0.0, 1.0, 2.0]}, 95.0)
    assert steps == [("a", 0.0, 0.5, 98.0, 1.0), ("a", 0.5, 0.8, 96.0, 1.0), ("b", 0.0, 0.5, 94.0, 1.0)]


def test_allocate_ties_across_layers_prefer_the_smaller_jump():
    # a: 0 -> 80% (two levels, saves 6 for 3); b: 0 -> 50% (one level, saves 4 for 2): both 0.5 per unit
    costs = {"a": [10.0, 10.0, 4.0], "b": [10.0, 6.0, 5.0]}
    damage = {"a": [0.0, 0.0, 3.0], "b": [0.0, 2.0, 4.0]}
    steps = allocate(costs, damage, 50.0)[1]
    assert steps[0][:3] == ("b", 0.0, 0.5)


def test_allocate_stops_when_no_move_saves_anything():
    flat = {"a": [5.0, 5.0, 5.0]}
    assert allocate(flat, {"a": [0.0, 0.1, 0.2]}, 50.0) == ({"a": 0}, [])
    costs = {"a": [10.0, 7.0, 7.0], "b": [5.0, 5.0, 5.0]}
    index, steps = allocate(costs, {"a": [0.0, 1.0, 2.0], "b": [0.0, 0.0, 0.0]}, 0.0)
    assert steps == [("a", 0.0, 0.5, 97.0, 1.0)] and index == {"a": 1, "b": 0}
    assert A._exhausted(index, [0.0, 0.5, 0.8], costs)
    # already within the target: nothing to do
    assert allocate(costs, {"a": [0.0, 1.0, 2.0], "b": [0.0, 0.0, 0.0]}, 100.0) == ({"a": 0, "b": 0}, [])


def test_allocate_goes_on_from_where_it_was():
    costs = {"a": [50.0, 30.0, 10.0], "b": [10.0, 8.0, 2.0]}
    damage = {"a": [0.0, 1.0, 3.0], "b": [0.0, 0.5, 4.0]}
    index, steps = allocate(costs, damage, 75.0, start={"a": 1, "b": 0})
    assert steps == [("a", 0.5, 0.8, 60.0, 2.0)] and index == {"a": 2, "b": 0}


def test_monotone_damage():
    assert A._monotone([0.0, 0.2, 0.1, -0.5, 0.3]) == [0.0, 0.2, 0.2, 0.2, 0.3]
    assert A._monotone([0.0, -0.1, -0.2]) == [0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------------------------------
# 5. latency with fake timings


MLP_DENSE = {(32, 16): 4.0, (24, 32): 6.0, (4, 24): 1.0}  # seconds per layer; the rest of the model: 5
SLOW_AT_25 = {0.25: 1.5, 0.5: 0.75, 0.75: 0.5}  # sparse / dense: slower at 25%
MLP_METRIC = {"0": 1.0, "2": 1.0, "4": 4.0}  # damages: layers 0, 2: s; layer 4: 4 s


def latency_plan(fake_times, measured, rounds=3, budget=0.75):
    fake = fake_times(MLP_DENSE, SLOW_AT_25, 16.0, measured)
    plan = tp.auto(make_mlp(), layer_metric(MLP_METRIC), budget, torch.randn(4, 16), kind="latency",
                   sparsities=LEVELS, rounds=rounds, progress=False)
    return fake, plan


def test_latency_cost_table_is_the_faster_of_dense_and_sparse(fake_times):
    fake = fake_times(MLP_DENSE, SLOW_AT_25, 16.0)
    model = make_mlp()
    layers = prunable(model)
    costs, total = A._cost_table(model, layers, [0.0, *LEVELS], (torch.randn(4, 16),), "latency", 5)
    assert total == 16.0
    assert costs == {"0": [4.0, 4.0, 3.0, 2.0], "2": [6.0, 6.0, 4.5, 3.0], "4": [1.0, 1.0, 0.75, 0.5]}
    assert sorted(level for *_, level in fake.layer_calls) == [0.0] * 3 + [0.25] * 3 + [0.5] * 3 + [0.75] * 3


def test_latency_plan_by_hand(fake_times):
    fake, plan = latency_plan(fake_times, (0.7,))
    # from 16: layer 2 -> 75% (saves 3 for 0.75: the best ratio) to 13; then layer 0 -> 50% (saves 1 for 0.5)
    # reaches 12 = 0.75 * 16 with less damage than the best-ratio move (layer 0 -> 75%, 0.75): it ends it
    assert [(s["layer"], s["from"], s["to"], s["cost"], s["damage"]) for s in plan.steps] == [
        ("2", 0.0, 0.75, 13 / 16, 0.75), ("0", 0.0, 0.5, 12 / 16, 0.5)]
    assert plan.scope == {"0": 0.5, "2": 0.75}
    assert plan.rounds == [{"estimated": 0.75, "first": 0.7, "measured": 0.7, "metric": 1.0 - 0.5 - 0.75,
                            "target": 0.75}]
    assert plan.met and plan.dense_cost == 16.0 and fake.checks == 1
    assert [(r["layer"], r["sparsity"], r["dense"], r["planned"], r["share"]) for r in plan.layers] == [
        ("0", 0.5, 4.0, 3.0, 0.25), ("2", 0.75, 6.0, 3.0, 6 / 16), ("4", 0.0, 1.0, 1.0, 1 / 16)]


def test_latency_a_check_re_aims_the_next_allocation_from_scratch(fake_times):
    # costs: "0" [4, 4, 3, 2], "2" [6, 6, 4.5, 3], "4" [1, 1, .75, .5] of 16; damages s, s, 4 s.
    # Round 1, target 0.75 (12): "2" -> 75% (best ratio, 13), then the finishing "0" -> 50% (12): measured 0.8.
    # Round 2, from scratch, target 0.75 * 0.75 / 0.8 (11.25): "2" -> 75%, "0" -> 75% (11): measured 0.7, met,
    # but more than `slack` (0.02) below the budget. Round 3, target 0.6875 * 0.75 / 0.7 (11.79): the same plan
    # as round 2, so nothing new is measured.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # met: no warning
        fake, plan = latency_plan(fake_times, (0.8, 0.7))
    assert len(plan.rounds) == 2 and fake.checks == 2
    assert [r["target"] for r in plan.rounds] == [0.75, 0.75 * 0.75 / 0.8]
    assert [r["measured"] for r in plan.rounds] == [0.8, 0.7]
    assert [r["estimated"] for r in plan.rounds] == [0.75, 11 / 16]
    assert plan.steps == [{"layer": "2", "from": 0.0, "to": 0.75, "cost": 13 / 16, "damage": 0.75},
                          {"layer": "0", "from": 0.0, "to": 0.75, "cost": 11 / 16, "damage": 0.75}]
    assert plan.chosen == 1 and plan.scope == {"0": 0.75, "2": 0.75} and plan.met and plan.measured == 0.7
    assert plan.metric == 1.0 - 0.75 - 0.75


def test_latency_a_plan_within_slack_ends_the_search(fake_times):
    fake, plan = latency_plan(fake_times, (0.74,))
    assert len(plan.rounds) == 1 and fake.checks == 1 and plan.met and plan.scope == {"0": 0.5, "2": 0.75}


def test_latency_an_undershoot_re_aims_upwards_and_the_best_metric_that_meets_wins(fake_times):
    # round 1 measures 0.5 (far below 0.75): round 2 aims at 0.75 * 0.75 / 0.5 = 1.125 -> 1.0 (prunes nothing),
    # which measures 0.74: it meets the budget with the better metric, so it is chosen
    fake, plan = latency_plan(fake_times, (0.5, 0.74))
    assert [r["target"] for r in plan.rounds] == [0.75, 1.0] and fake.checks == 2
    assert plan.chosen == 1 and plan.scope == {} and plan.metric == 1.0 and plan.met


def test_latency_each_check_re_times_the_earlier_plans_and_the_choice_uses_the_latest(fake_times):
    # round 1's plan ({"0": 50%, "2": 75%}, the better metric) measures 0.76 at its check, over 0.75;
    # round 2's ({"0": 75%, "2": 75%}) measures 0.70 beside it, while round 1's now measures 0.74:
    # taken together both meet the budget, so the better metric, round 1's, is chosen
    fake = fake_times(MLP_DENSE, SLOW_AT_25, 16.0, by_call=[[0.76], [0.74, 0.70]])
    plan = tp.auto(make_mlp(), layer_metric(MLP_METRIC), 0.75, torch.randn(4, 16), kind="latency",
                   sparsities=LEVELS, rounds=2, progress=False)
    assert fake.checks == 2
    assert [r["first"] for r in plan.rounds] == [0.76, 0.70]
    assert [r["measured"] for r in plan.rounds] == [0.74, 0.70]
    assert plan.chosen == 0 and plan.scope == {"0": 0.5, "2": 0.75} and plan.met and plan.measured == 0.74


def test_latency_checks_keep_each_plan_sparsified_and_time_them_together(fake_times, monkeypatch):
    fake_times(MLP_DENSE, SLOW_AT_25, 16.0, (0.8, 0.7))
    timed = []
    real = A.latency_against_dense

    def spy(dense, models, inputs, repeats):
        timed.append({label: tp.summary(m).totals["sparsity"] for label, m in models.items()})
        assert all(any(isinstance(x, tuple(A.SPARSE_CLASS.values())) for x in m.modules()) for m in models.values())
        return real(dense, models, inputs, repeats)

    monkeypatch.setattr(A, "latency_against_dense", spy)
    plan = tp.auto(make_mlp(), layer_metric(MLP_METRIC), 0.75, torch.randn(4, 16), kind="latency",
                   sparsities=LEVELS, progress=False)
    assert [list(t) for t in timed] == [["check 1"], ["check 1", "check 2"]]
    assert timed[1]["check 1"] == timed[0]["check 1"] < timed[1]["check 2"]  # the same first plan, re-timed
    assert len(plan.rounds) == 2


def test_latency_warns_when_the_budget_is_missed_after_the_last_round(fake_times):
    # round 2 (target 0.7401, 11.84): "2" -> 75%, "0" -> 75% (11); round 3 (target 0.6784, 10.86): then
    # "4" -> 50% (10.75, the finishing move with the least damage). Every plan measures 0.76: the first is kept.
    with pytest.warns(UserWarning, match=r"measured latency is 0\.760 of dense, over the budget 0\.75, "
                                         r"after 3 check\(s\)") as record:
        fake, plan = latency_plan(fake_times, (0.76,))
    assert record[0].filename == __file__
    assert len(plan.rounds) == 3 and fake.checks == 3 and not plan.met
    targets = [r["target"] for r in plan.rounds]
    assert targets == pytest.approx([0.75, 0.75 ** 2 / 0.76, 11 / 16 * 0.75 / 0.76], rel=1e-15)
    assert [r["estimated"] for r in plan.rounds] == [0.75, 11 / 16, 10.75 / 16]
    assert plan.chosen == 0 and plan.scope == {"0": 0.5, "2": 0.75}


def test_latency_rounds_one_checks_once_and_warns(fake_times):
    with pytest.warns(UserWarning, match="over the budget"):
        fake, plan = latency_plan(fake_times, (0.8,), rounds=1)
    assert len(plan.rounds) == 1 and fake.checks == 1
    assert not plan.met and plan.measured == 0.8 and plan.estimated == 0.75


def test_latency_stops_when_nothing_is_left_to_save(fake_times):
    # round 2 (target 0.568, 9.09): "2" -> 75%, "0" -> 75%, "4" -> 75% (10.5), then no move is left
    with pytest.warns(UserWarning, match=r"after 2 check\(s\)"):
        fake, plan = latency_plan(fake_times, (0.99,))
    assert len(plan.rounds) == 2 and fake.checks == 2 and not plan.met
    assert plan.rounds[1]["estimated"] == 10.5 / 16
    assert plan.chosen == 0 and plan.scope == {"0": 0.5, "2": 0.75}  # ties in measured cost: the first plan


def test_latency_with_a_conv1d_layer(fake_times):
    fake = fake_times({(8, 3, 3, 3): 2.0, (8, 8, 3): 1.0, (4, 128): 1.0}, {0.5: 0.75, 0.75: 0.5}, 8.0, (0.6,))
    model, x = BnNet(), torch.randn(2, 3, 4, 4)
    plan = tp.auto(model, output_metric(x), 0.8, x, kind="latency", sparsities=(0.5, 0.75), progress=False)
    assert "conv1d" not in plan.scope  # no sparse kernel: it never saves anything, so it is never timed
    assert not [call for call in fake.layer_calls if call[1] == (8, 8, 3)]


def test_latency_noise_in_dense_timings_is_no_saving(fake_times, monkeypatch):
    fake = fake_times(MLP_DENSE, {0.25: 2.0, 0.5: 2.0, 0.75: 2.0}, 16.0, (1.0,))  # sparse always slower
    calls = itertools.count()
    plain = fake.time_layer

    def noisy(layer, shapes, sparse=None):  # each dense timing 1% below the one before: noise
        dense, _ = plain(layer, shapes, sparse)
        dense *= 1 - 0.01 * next(calls)
        return dense, 2 * dense

    monkeypatch.setattr(A, "time_layer", noisy)
    with pytest.warns(UserWarning, match="over the budget"):
        plan = tp.auto(make_mlp(), layer_metric(MLP_METRIC), 0.9, torch.randn(4, 16), kind="latency",
                       sparsities=LEVELS, progress=False)
    assert plan.scope == {}


class SameShapes(nn.Module):
    """a and b: same type, weight shape, input shapes and dtype; c: same weight, other input shape;
    d: float64; e: never called."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.d = nn.Linear(16, 16).double()
        self.e = nn.Linear(16, 8)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        h = self.c(h.unsqueeze(0)).squeeze(0)
        return self.d(h.double()).float()


def test_latency_same_layers_are_timed_once_and_an_uncalled_layer_costs_nothing(fake_times):
    fake = fake_times({(16, 16): 2.0, (8, 16): 1.0}, {0.5: 0.5, 0.75: 0.25}, 10.0, (0.5,))
    model, x = SameShapes(), torch.randn(4, 16)
    costs, total = A._cost_table(model, prunable(model), [0.0, 0.5, 0.75], (x,), "latency", 5)
    keys = Counter(call[:4] for call in fake.layer_calls)
    f32, f64 = torch.float32, torch.float64
    assert keys == {(nn.Linear, (16, 16), ((4, 16),), f32): 3, (nn.Linear, (16, 16), ((1, 4, 16),), f32): 3,
                    (nn.Linear, (16, 16), ((4, 16),), f64): 3}
    assert not any(call[1] == (8, 16) for call in fake.layer_calls)
    assert costs["a"] == costs["b"] == costs["c"] == costs["d"] == [2.0, 1.0, 0.5]
    assert costs["e"] == [0.0, 0.0, 0.0]

    fake.layer_calls.clear()
    plan = tp.auto(model, layer_metric({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0, "e": 1.0}), 0.5, x, kind="latency",
                   sparsities=(0.5, 0.75), progress=False)
    assert len(fake.layer_calls) == 9
    row = {r["layer"]: r for r in plan.layers}["e"]
    assert (row["dense"], row["planned"], row["share"]) == (0.0, 0.0, 0.0)
    assert "e" not in plan.scope  # pruning it saves nothing


def test_latency_masked_layers_are_timed_as_their_plain_class(fake_times):
    fake = fake_times(MLP_DENSE, SLOW_AT_25, 16.0, (0.5,))
    model = make_mlp()
    tp.prune(model, scope={"0": 0.5})
    costs, _ = A._cost_table(model, prunable(model), [0.0, *LEVELS], (torch.randn(4, 16),), "latency", 5)
    assert {call[0] for call in fake.layer_calls} == {nn.Linear}
    # the sparse kernel at each level is built from the layer's own weights pruned to that level; they
    # are half zero already, so its 25% is 50%, as tp.prune on top of the mask would leave it
    assert [call[4] for call in fake.layer_calls if call[1] == (32, 16)] == [0.0, 0.5, 0.5, 0.75]
    assert costs["0"] == [4.0, 3.0, 3.0, 2.0] and costs["2"] == [6.0, 6.0, 4.5, 3.0]


# ----------------------------------------------------------------------------------------------------
# 5b. search="greedy" (NetAdapt: each move chosen by evaluating the whole model)


def make_three(seed=0):
    torch.manual_seed(seed)  # three layers of 64 weights and 8 biases: 216 parameters
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


def joint_metric(alone, together):
    """Minus the sum of ``alone[name]`` over the pruned layers, minus ``together[pair]`` when both
    layers of a pair are pruned: losses that do not add up, as measured on a whole model."""
    def evaluate(model):
        modules = dict(model.named_modules())
        pruned = {name for name in alone if zero_fraction(modules[name]) > 0}
        return -sum(alone[n] for n in pruned) - sum(v for pair, v in together.items() if set(pair) <= pruned)
    return evaluate


def test_greedy_sees_losses_that_do_not_add_up_and_the_curves_do_not():
    # two of the three layers must go to 50% (0.75 of 216 parameters). Alone, 0 and 2 cost 1 and 4
    # costs 2: the curves take 0 and 2, which together cost 12. Greedy takes 0 (the earlier of the
    # two cheapest), then measures 2 on top of it (+11) against 4 (+2) and takes 4.
    metric = joint_metric({"0": 1.0, "2": 1.0, "4": 2.0}, {("0", "2"): 10.0})
    x = torch.randn(2, 8)
    by_curves = tp.auto(make_three(), metric, 0.75, x, kind="params", sparsities=(0.5,), progress=False)
    greedy = tp.auto(make_three(), metric, 0.75, x, kind="params", sparsities=(0.5,), search="greedy",
                     progress=False)
    assert by_curves.scope == {"0": 0.5, "2": 0.5} and by_curves.metric == -12.0
    assert greedy.scope == {"0": 0.5, "4": 0.5} and greedy.metric == -3.0 and greedy.met
    assert greedy.sensitivity is None and greedy.search == "greedy" and greedy.baseline == 0.0
    assert [(s["layer"], s["from"], s["to"], s["damage"], s["metric"]) for s in greedy.steps] == \
        [("0", 0.0, 0.5, 1.0, -1.0), ("4", 0.0, 0.5, 2.0, -3.0)]
    assert [s["cost"] for s in greedy.steps] == pytest.approx([184 / 216, 152 / 216], rel=1e-12)
    pruned = make_three()
    tp.prune(pruned, scope=greedy.scope)
    assert metric(pruned) == greedy.metric  # the plan's metric is what applying it gives


def test_greedy_with_a_loss_metric_gives_the_plan_of_the_accuracy_metric():
    accuracy = joint_metric({"0": 1.0, "2": 1.0, "4": 2.0}, {("0", "2"): 10.0})
    x = torch.randn(2, 8)
    options = dict(kind="params", sparsities=(0.5,), search="greedy", progress=False)
    by_accuracy = tp.auto(make_three(), accuracy, 0.75, x, **options)
    by_loss = tp.auto(make_three(), lambda m: -accuracy(m), 0.75, x, higher_is_better=False, **options)
    assert by_loss.scope == by_accuracy.scope and by_loss.metric == -by_accuracy.metric
    assert [s["damage"] for s in by_loss.steps] == [s["damage"] for s in by_accuracy.steps]


def test_greedy_a_move_that_improves_the_metric_is_taken_first():
    # pruning 4 raises the metric (a negative loss): it is the best move per unit saved
    metric = joint_metric({"0": 1.0, "2": 1.0, "4": -0.5}, {})
    plan = tp.auto(make_three(), metric, 0.9, torch.randn(2, 8), kind="params", sparsities=(0.5,), search="greedy",
                   progress=False)
    assert plan.scope == {"4": 0.5} and plan.steps[0]["damage"] == -0.5 and plan.metric == 0.5


def test_greedy_re_aims_along_one_path_and_evaluates_no_plan_twice(fake_times, monkeypatch):
    # the first check measures over the budget, the second under it: the path is extended, then an
    # earlier point of it taken. Every candidate is evaluated once, on the path's plan plus one move.
    fake_times(MLP_DENSE, SLOW_AT_25, 16.0, (0.8, 0.6, 0.72))
    tried, real = [], A._Greedy._metric

    def spy(self, index):
        tried.append(tuple(sorted(index.items())))
        return real(self, index)

    monkeypatch.setattr(A._Greedy, "_metric", spy)
    plan = tp.auto(make_mlp(), layer_metric(MLP_METRIC), 0.75, torch.randn(4, 16), kind="latency",
                   sparsities=LEVELS, search="greedy", progress=False)
    assert len(tried) == len(set(tried)) and len(plan.rounds) >= 2
    # 25% never saves here (its kernel is slower than dense): each layer's first move jumps to 50%
    assert all(s["to"] != 0.25 for s in plan.steps) and all(s["from"] in (0.0, 0.5) for s in plan.steps)
    targets = [r["target"] for r in plan.rounds]
    assert targets[1] < targets[0]  # re-aimed down after measuring over the budget
    assert all(r["measured"] == m for r, m in zip(plan.rounds, (0.8, 0.6, 0.72)))


def test_greedy_stops_when_no_layer_has_a_level_left_that_saves():
    with pytest.warns(UserWarning, match="over the budget"):
        plan = tp.auto(make_three(), lambda m: 1.0, 0.1, torch.randn(2, 8), kind="params", sparsities=(0.5,),
                       search="greedy", progress=False)
    assert plan.scope == {"0": 0.5, "2": 0.5, "4": 0.5} and len(plan.steps) == 3 and not plan.met


# ----------------------------------------------------------------------------------------------------
# 6. AutoPlan


@pytest.mark.parametrize("kind", A.KINDS)
def test_autoplan_markdown_dict_and_repr(kind, fake_times):
    fake_times(MLP_DENSE, SLOW_AT_25, 16.0, (0.8, 0.7))
    model, x = make_mlp(), torch.randn(4, 16)
    plan = tp.auto(model, layer_metric(MLP_METRIC), 0.75, x, kind=kind, sparsities=LEVELS, progress=False)
    text = plan.to_markdown()
    for name in ("0", "2", "4"):
        assert f"\n| {name} | " in text
    assert text.count("\n| Move |") == 1 and text.count("\n| Check |") == 1
    for i, r in enumerate(plan.rounds):
        assert (f"| {i + 1} | {r['target']:.3f} | {r['estimated']:.3f} | {r['first']:.3f} | {r['measured']:.3f} | "
                f"{r['metric']:.4f} | {'chosen' if i == plan.chosen else ''} |") in text
    assert ("met" if plan.met else "missed") in text.splitlines()[0]
    assert {"latency": "(ms)", "macs": "(MACs)", "params": "(weights)"}[kind] in text
    assert len([line for line in text.splitlines() if line.startswith("| ") and "% |" in line]) == \
        len(plan.layers) + len(plan.steps)

    data = json.loads(json.dumps(plan.to_dict(), allow_nan=False))
    assert data["kind"] == kind and data["budget"] == 0.75 and data["scope"] == {k: v for k, v in plan.scope.items()}
    assert data["rounds"] == plan.rounds and data["steps"] == plan.steps and data["layers"] == plan.layers
    assert data["sensitivity"]["curves"]["4"] == {str(s): v for s, v in plan.sensitivity.curves["4"].items()}
    assert data["baseline"] == plan.baseline == 1.0 and data["dense_cost"] == plan.dense_cost

    text = repr(plan)
    assert text.startswith(f"AutoPlan(kind={kind!r}, budget=0.75, search='curves', measured=")
    assert f"layers={len(plan.scope)})" in text


def test_autoplan_of_a_greedy_search_markdown_dict_and_repr():
    metric = joint_metric({"0": 1.0, "2": 1.0, "4": 2.0}, {("0", "2"): 10.0})
    plan = tp.auto(make_three(), metric, 0.75, torch.randn(2, 8), kind="params", sparsities=(0.5,), search="greedy",
                   progress=False)
    text = plan.to_markdown()
    assert "| Cost after | Measured loss |" in text and "Predicted loss" not in text
    assert "| 2 | 4 | 0% | 50% | 0.704 | 2.0000 |" in text
    data = json.loads(json.dumps(plan.to_dict(), allow_nan=False))
    assert data["search"] == "greedy" and data["sensitivity"] is None and data["steps"] == plan.steps
    assert repr(plan).startswith("AutoPlan(kind='params', budget=0.75, search='greedy', measured=")


# ----------------------------------------------------------------------------------------------------
# 7. a real latency run


@pytest.mark.parametrize("search", A.SEARCHES)
def test_real_latency_run_gives_a_scope_prune_and_pruner_take(search):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.randn(64, 256)
    before = snapshot(model)
    evaluate = output_metric(x)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plan = tp.auto(model, evaluate, 0.7, x, kind="latency", sparsities=(0.5, 0.9), repeats=10, search=search,
                       progress=False)
    assert_unchanged(model, before)
    missed = [w for w in record if "over the budget" in str(w.message)]
    assert bool(missed) == (not plan.met) and plan.met == (plan.measured <= 0.7)
    assert 1 <= len(plan.rounds) <= 4 and all(r["measured"] > 0 for r in plan.rounds)
    assert_steps_consistent(plan, (0.5, 0.9))
    assert all(row["planned"] <= row["dense"] for row in plan.layers)
    if not plan.scope:  # no sparse kernel was faster on this machine: nothing to apply (see the empty-scope test below)
        return
    pruned = copy.deepcopy(model)
    tp.prune(pruned, scope=plan.scope)
    assert evaluate(pruned) == plan.metric
    trained = copy.deepcopy(model)
    pruner = tp.Pruner(trained, target_sparsity=None, schedule=tp.schedules.OneShot(at=0), scope=plan.scope)
    assert pruner.step()
    masks, expected = tp.masks(trained), tp.masks(pruned)
    for name, level in plan.scope.items():
        assert zero_fraction(dict(trained.named_modules())[name]) == pytest.approx(level, abs=1 / 512)
        assert torch.equal(masks[name], expected[name])


def test_a_plan_that_prunes_nothing_has_an_empty_scope(fake_times):
    fake_times(MLP_DENSE, {0.25: 1.5, 0.5: 1.2, 0.75: 1.1}, 16.0, (1.0,))  # sparse never faster
    model = make_mlp()
    with pytest.warns(UserWarning, match="over the budget"):
        plan = tp.auto(model, lambda m: 1.0, 0.5, torch.randn(4, 16), kind="latency", sparsities=LEVELS,
                       progress=False)
    assert plan.scope == {} and plan.steps == []  # documented: nothing to prune (tp.prune refuses an empty scope)
    assert plan.metric == plan.baseline and not plan.met


def test_latency_against_dense_gives_ratios_and_refuses_a_model_named_dense(fake_times):
    fake = fake_times(MLP_DENSE, SLOW_AT_25, 16.0, (0.625,))
    model, x = make_mlp(), torch.randn(4, 16)
    ratios, dense_seconds = A.latency_against_dense(model, {"plan": copy.deepcopy(model)}, (x,), 5)
    assert ratios == {"plan": 0.625} and dense_seconds == 16.0 and fake.checks == 1
    with pytest.raises(ValueError, match="must not name one 'dense'"):
        A.latency_against_dense(model, {"dense": model}, (x,), 5)


def curves(levels, costs, damage, total):
    """`_search`'s ``allocate`` over given damages, as `_Curves` calls it."""
    return lambda index, target, steps: A._allocate(index, levels, costs, damage, total, target, steps)


def test_search_keeps_targets_between_one_that_undershot_and_one_that_went_over():
    # 8 layers of cost 1 (0.75 at 50%, 0.5 at 75%) in a model of 16. Round 1 (target 0.75) measures
    # 0.6: re-aimed up to 0.9375, which measures 0.99; the budget is now bracketed, so round 3 aims
    # where the line through (0.75, 0.6) and (0.9375, 0.99) reaches 0.74 (the middle of the slack window).
    levels = [0.0, 0.5, 0.75]
    costs = {str(i): [1.0, 0.75, 0.5] for i in range(8)}
    damage = {str(i): [0.0, 1 + i / 10, 3 + i / 10] for i in range(8)}
    measured, history = iter([0.6, 0.99, 0.74]), []

    def check(scope):  # each plan measures the same whenever it is timed
        history.append(next(measured))
        return list(history), 0.0

    found = A._search(0.75, 4, 0.02, levels, costs, 16.0, curves(levels, costs, damage, 16.0), check)
    third = 0.75 + (0.74 - 0.6) * (0.9375 - 0.75) / (0.99 - 0.6)
    assert [r["target"] for r in found] == pytest.approx([0.75, 0.9375, third], rel=1e-12)
    assert [r["measured"] for r in found] == [0.6, 0.99, 0.74]  # the third is within slack: the search ends


def test_search_brackets_by_the_latest_measurements(monkeypatch):
    # As above, but at the third check the first plan (target 0.75) is re-timed over the budget: every
    # plan now went over, none undershot, so `_next_target` is given no lower side and scales.
    levels = [0.0, 0.5, 0.75]
    costs = {str(i): [1.0, 0.75, 0.5] for i in range(8)}
    damage = {str(i): [0.0, 1 + i / 10, 3 + i / 10] for i in range(8)}
    given, real = [], A._next_target

    def spy(target, estimated, measured, budget, slack, under, over):
        given.append((under, over))
        return real(target, estimated, measured, budget, slack, under, over)

    monkeypatch.setattr(A, "_next_target", spy)
    calls = iter([[0.6], [0.6, 0.99], [0.8, 0.99, 0.9]])
    found = A._search(0.75, 3, 0.02, levels, costs, 16.0, curves(levels, costs, damage, 16.0),
                      lambda scope: (next(calls), 0.0))
    third = 0.75 + (0.74 - 0.6) * (0.9375 - 0.75) / (0.99 - 0.6)
    assert [r["first"] for r in found] == [0.6, 0.99, 0.9]
    assert [r["measured"] for r in found] == [0.8, 0.99, 0.9]
    assert given[:2] == [((0.75, 0.6), None), ((0.75, 0.6), (0.9375, 0.99))]
    assert given[2] == (None, (0.75, 0.8)) and found[2]["target"] == pytest.approx(third, rel=1e-12)


def test_next_target_scales_until_bracketed_then_interpolates_inside():
    assert A._next_target(0.5, 0.6, 0.3, 0.6, 0.02, (0.5, 0.3), None) == pytest.approx(1.0)  # capped at 1
    assert A._next_target(0.5, 0.5, 0.4, 0.5, 0.02, (0.5, 0.4), None) == pytest.approx(0.625)  # no upper side yet
    assert A._next_target(0.6, 0.6, 0.55, 0.5, 0.02, None, (0.6, 0.55)) == pytest.approx(0.6 * 0.5 / 0.55)
    # bracketed by (0.5, 0.4) and (0.6, 0.55): the line reaches 0.49 at 0.5 + 0.09 / 0.15 * 0.1
    assert A._next_target(0.6, 0.6, 0.55, 0.5, 0.02, (0.5, 0.4), (0.6, 0.55)) == pytest.approx(0.56)
    # an under-plan already inside the slack window: the line's target falls below it; kept at the lower side
    assert A._next_target(0.6, 0.6, 0.55, 0.5, 0.04, (0.5, 0.49), (0.6, 0.55)) == pytest.approx(0.5)
    # re-timed plans can contradict each other (a higher target under, a lower one over): no bracket then
    assert A._next_target(0.6, 0.6, 0.55, 0.5, 0.02, (0.7, 0.45), (0.6, 0.55)) == pytest.approx(0.6 * 0.5 / 0.55)


