"""The performance-driven schedule `tp.schedules.Adaptive` and how `tp.Pruner` runs it.

What is checked:

* the decisions, on scripted metrics worked out by hand: raise while the metric holds, pause,
  revert after ``patience`` failures with the increment halved, stop when the increment falls below
  ``min_increment`` (given or the default ``increment / 8``), stop at the last check that fails,
  "done" at level 1 and at a last check (``step + every > end``) that holds (no raise there: it would
  never be checked), ``mode="min"``, the tolerance boundary (exactly ``best - tolerance`` holds, the
  best never drops); checks only at ``begin, begin + every, ... <= end`` and none after a stop (the
  metric is never called elsewhere); ``sparsity_at`` is the staircase of the checks' levels; levels
  rounded after each raise (ten raises of 0.1 reach exactly 1);
* the masks follow the levels (round(level * final * numel) per layer, or over all layers with
  ``scope="global"``), and a revert restores the remembered masks exactly, with the weights that
  come back bit for bit as they were then (the others as they are) and zero Adam moments;
* resume through torch.save / torch.load bit for bit (also between a raise and its revert: the held
  snapshot travels), and the states that must not load (with / without Adaptive, a corrupt
  ``schedule`` field or history row, a corrupt or missing ``held`` entry) raise ValueError and change
  nothing;
* `Adaptive.fresh`: every Pruner has its own run, the user's object stays unused, per-layer copies
  (dict scope) share the decisions; ``copy.deepcopy`` of a Pruner; `tp.schedules.plot`;
* the argument errors, and a metric that returns no finite number (a 0-dim tensor or numpy scalar
  is a number; a tensor of several elements is not).
"""

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torchprune as tp
from torchprune.schedules import Adaptive, Cubic

from conftest import assert_unchanged, checkpoint, labelled_batches, make_mlp64, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

FINAL = 0.8
LAYERS = ("0", "2", "4")


# ----------------------------------------------------------------------------------------------------
# helpers


DATA = labelled_batches(26, dtype=torch.float64)


class Script:
    """A metric returning ``values`` in order (from ``start``); records the Pruner's step at each call.
    Called more often than scripted, it fails the test."""

    def __init__(self, values, start=0):
        self.values = list(values)
        self.next = start
        self.steps = []
        self.pruner = None

    def __call__(self):
        step = None if self.pruner is None else self.pruner.steps  # the step being taken
        assert self.next < len(self.values), f"metric called more often than scripted, at step {step}"
        self.steps.append(step)
        value = self.values[self.next]
        self.next += 1
        return value


def masks_of(model):
    return {name: mask.clone() for name, mask in tp.masks(model).items()}


def weights_of(model):
    return {name: model.get_submodule(name).weight.detach().clone() for name in LAYERS}


def level_at(history, step):
    """The level of the latest check at or before ``step`` (0 before the first)."""
    level = 0.0
    for row in history:
        if row["step"] <= step:
            level = row["level"]
    return level


def assert_masks_at(model, level, scope, finals=None):
    """Each layer (or all together, global scope) pruned to round(final * level * numel)."""
    finals = finals or {name: FINAL for name in LAYERS}
    masks = tp.masks(model)
    if scope == "global":
        total = sum(m.numel() for m in masks.values())
        pruned = sum(int((~m).sum()) for m in masks.values())
        assert pruned == int(round(FINAL * level * total)), (level, pruned, total)
        return
    for name, final in finals.items():
        mask = masks[name]
        assert int((~mask).sum()) == int(round(final * level * mask.numel())), (name, level)


def equal_nested(a, b):
    """Bit-exact equality of nested dicts / lists / tensors / numbers."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(
            equal_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(equal_nested(x, y) for x, y in zip(a, b)))
    return type(a) is type(b) and a == b


def through_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ----------------------------------------------------------------------------------------------------
# 1. decisions (scripted metrics, worked out by hand); masks and staircase on the way
#
# Every case: begin=1, every=2 (checks at 1, 3, 5, ...), and the Pruner steps on to end + 5. Rows are
# (step, action, level); the level is the fraction of `final` after the check.

CASES = {
    # raise, pause, revert after 2 failures (increment 0.25 -> 0.125), a pause that a hold ends (the
    # failures count from 0 again), revert (0.125 -> 0.0625 >= 0.25 / 8); the last check (21: 21 + 2 >
    # 21) holds: "done" at 0.5, no raise to 0.5625 that no check would test.
    "raise-pause-revert": (
        dict(end=21, increment=0.25, patience=2),
        [1.0, 1.0, 0.5, 0.5, 1.0, 0.9, 1.0, 1.0, 0.0, 0.0, 1.0],
        [(1, "raise", 0.25), (3, "raise", 0.5), (5, "pause", 0.5), (7, "revert", 0.25), (9, "raise", 0.375),
         (11, "pause", 0.375), (13, "raise", 0.5), (15, "raise", 0.625), (17, "pause", 0.625),
         (19, "revert", 0.5), (21, "done", 0.5)]),
    # min_increment 0.25: the first revert halves 0.5 to 0.25 (not below: revert), the second to
    # 0.125 (below: stop at the level that held). No check after the stop.
    "stop-min-increment": (
        dict(end=21, increment=0.5, patience=1, min_increment=0.25),
        [1.0, 1.0, 0.0, 1.0, 0.0],
        [(1, "raise", 0.5), (3, "raise", 1.0), (5, "revert", 0.5), (7, "raise", 0.75), (9, "stop", 0.5)]),
    # the default min_increment is 0.5 / 8: reverts at increments 0.25, 0.125, 0.0625, a stop at
    # 0.03125; nothing above the unpruned model ever held, so the run ends unpruned.
    "default-min-increment": (
        dict(end=21, increment=0.5, patience=1),
        [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0],
        [(1, "raise", 0.5), (3, "revert", 0.0), (5, "raise", 0.25), (7, "revert", 0.0), (9, "raise", 0.125),
         (11, "revert", 0.0), (13, "raise", 0.0625), (15, "stop", 0.0)]),
    # end=8: checks 1, 3, 5, 7 (none forced at end); 7 is the last (7 + 2 > 8): its failure stops,
    # patience (3) not reached.
    "stop-at-last-check": (
        dict(end=8, increment=0.25, patience=3),
        [1.0, 1.0, 0.5, 0.5],
        [(1, "raise", 0.25), (3, "raise", 0.5), (5, "pause", 0.5), (7, "stop", 0.25)]),
    # end=10: checks 1, 3, 5, 7, 9 (none at 10); pauses that holds end; 9 is the last (9 + 2 > 10) and
    # holds after a pause: "done" at 0.5 (patience 3 never reached).
    "done-at-last-check": (
        dict(end=10, increment=0.25, patience=3),
        [1.0, 0.5, 1.0, 0.5, 1.0],
        [(1, "raise", 0.25), (3, "pause", 0.25), (5, "raise", 0.5), (7, "pause", 0.5), (9, "done", 0.5)]),
    # end=2: the only check (1) is also the last: the unpruned model holds, "done" at 0.
    "single-check": (
        dict(end=2, increment=0.25),
        [1.0],
        [(1, "done", 0.0)]),
    "done": (
        dict(end=21, increment=0.5),
        [1.0, 1.0, 1.0],
        [(1, "raise", 0.5), (3, "raise", 1.0), (5, "done", 1.0)]),
    # level 1 fails: back to 0.5, then up by 0.25 twice, then held at 1: done.
    "revert-from-final-then-done": (
        dict(end=21, increment=0.5, patience=1),
        [1.0, 1.0, 0.0, 1.0, 1.0, 1.0],
        [(1, "raise", 0.5), (3, "raise", 1.0), (5, "revert", 0.5), (7, "raise", 0.75), (9, "raise", 1.0),
         (11, "done", 1.0)]),
    # "raise-pause-revert" with a loss: lower is better, the same decisions.
    "mode-min": (
        dict(end=21, increment=0.25, patience=2, mode="min"),
        [-1.0, -1.0, -0.5, -0.5, -1.0, -0.9, -1.0, -1.0, 0.0, 0.0, -1.0],
        [(1, "raise", 0.25), (3, "raise", 0.5), (5, "pause", 0.5), (7, "revert", 0.25), (9, "raise", 0.375),
         (11, "pause", 0.375), (13, "raise", 0.5), (15, "raise", 0.625), (17, "pause", 0.625),
         (19, "revert", 0.5), (21, "done", 0.5)]),
    # tolerance 0.5: 1.5 is exactly best (2) - 0.5 and holds, without lowering the best: 1.0 then fails
    # (it would hold against 1.5). 2.5 is a new best; 2.0 holds exactly; 2 - 2**-10 fails (back to
    # 0.1875, increment 0.03125); 2.0 holds at the last check (13): "done" at 0.1875.
    "tolerance-max": (
        dict(end=13, increment=0.125, patience=1, tolerance=0.5),
        [2.0, 1.5, 1.0, 2.5, 2.0, 2.0 - 2 ** -10, 2.0],
        [(1, "raise", 0.125), (3, "raise", 0.25), (5, "revert", 0.125), (7, "raise", 0.1875), (9, "raise", 0.25),
         (11, "revert", 0.1875), (13, "done", 0.1875)]),
    "tolerance-min": (
        dict(end=13, increment=0.125, patience=1, tolerance=0.5, mode="min"),
        [2.0, 2.5, 3.0, 1.5, 2.0, 2.0 + 2 ** -10, 2.0],
        [(1, "raise", 0.125), (3, "raise", 0.25), (5, "revert", 0.125), (7, "raise", 0.1875), (9, "raise", 0.25),
         (11, "revert", 0.1875), (13, "done", 0.1875)]),
}


def final_increment(case):
    """The increment after the case's run: halved at every revert and stop (not at "done")."""
    kwargs, _, rows = CASES[case]
    return kwargs["increment"] / 2 ** sum(action in ("revert", "stop") for _, action, _ in rows)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("case", list(CASES))
def test_decisions_levels_masks_and_staircase(case, scope):
    kwargs, values, expected = CASES[case]
    script = Script(values)
    schedule = Adaptive(script, begin=1, every=2, **kwargs)
    model = make_mlp64()
    pruner = tp.Pruner(model, FINAL, schedule, scope=scope)
    script.pruner = pruner
    steps = kwargs["end"] + 5
    for step in range(steps):
        pruner.step()
        assert_masks_at(model, level_at(pruner.schedule.history, step), scope)

    history = pruner.schedule.history
    assert [(row["step"], row["action"], row["level"]) for row in history] == expected
    assert [row["metric"] for row in history] == values  # as returned, also with mode="min"
    assert all(type(row["metric"]) is float and type(row["level"]) is float for row in history)
    assert script.steps == [row[0] for row in expected]  # called at the checks only, once each
    assert pruner.schedule.state_dict()["increment"] == final_increment(case)

    # the staircase: the latest check's level, 0 before the first check (also past the run)
    for step in range(steps + 10):
        level = level_at(history, step)
        assert pruner.schedule.sparsity_at(step) == FINAL * level
        assert pruner.target_at(step) == {name: FINAL * level for name in LAYERS}
    assert pruner.schedule.sparsity_at(0) == 0.0

    # every run stops: earlier, or at its last check at the latest (which holds: done, or fails: stop)
    assert expected[-1][1] in ("stop", "done") and pruner.schedule.stopped is True
    assert all(action not in ("stop", "done") for _, action, _ in expected[:-1])
    assert pruner.schedule.update_steps() == []
    assert not any(pruner.schedule.is_update(t) for t in range(steps + 10))
    # the user's object ran nothing
    assert schedule.history == [] and not schedule.stopped and schedule.final is None


@pytest.mark.parametrize("end", [14, 16, 18])
def test_no_check_after_end_nor_between_checks(end):
    script = Script([1.0] * 20)
    schedule = Adaptive(script, begin=4, end=end, every=5, increment=0.125)  # checks 4, 9, 14 (none at 16, 18)
    pruner = tp.Pruner(make_mlp64(), FINAL, schedule)
    script.pruner = pruner
    for step in range(30):
        pruner.step()
        assert len(script.steps) == sum(1 for t in (4, 9, 14) if t <= step)
    assert script.steps == [4, 9, 14]
    # 14 is the last check (14 + 5 > end): it holds, so "done" at 0.25 (no raise to 0.375)
    assert [(row["action"], row["level"]) for row in pruner.schedule.history] == \
        [("raise", 0.125), ("raise", 0.25), ("done", 0.25)]
    assert pruner.schedule.stopped
    assert [pruner.schedule.sparsity_at(t) for t in (0, 3, 4, 8, 9, 13, 14, 100)] == \
        [0.0, 0.0, FINAL * 0.125, FINAL * 0.125, FINAL * 0.25, FINAL * 0.25, FINAL * 0.25, FINAL * 0.25]
    assert_masks_at(pruner.model, 0.25, "layer")


# increment -> the levels of the raises, worked out by hand: each raise is rounded to 12 digits and
# capped at 1, so 0.1 makes 0.1, 0.2, ..., exactly 1.0 (ten raises) and 0.3 makes 0.3, 0.6, 0.9, 1.0.
RAISES = {
    0.1: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
    0.3: [0.3, 0.6, 0.9, 1.0],
    0.25: [0.25, 0.5, 0.75, 1.0],
}


@pytest.mark.parametrize("increment", list(RAISES))
def test_raises_reach_final_exactly(increment):
    levels = RAISES[increment]
    n = len(levels)
    script = Script([1.0] * (n + 1))
    pruner = tp.Pruner(make_mlp64(), FINAL, Adaptive(script, begin=0, end=30, every=1, increment=increment))
    script.pruner = pruner
    for _ in range(n + 5):
        pruner.step()
    history = pruner.schedule.history
    assert [row["action"] for row in history] == ["raise"] * n + ["done"]  # done at the next holding check
    assert [row["level"] for row in history] == levels + [1.0]
    assert script.steps == list(range(n + 1))  # no check after "done"
    assert pruner.schedule.sparsity_at(n - 1) == FINAL and pruner.schedule.sparsity_at(n - 2) < FINAL
    assert pruner.schedule.sparsity_at(100) == FINAL
    assert_masks_at(pruner.model, 1.0, "layer")


def test_three_raises_of_a_third_reach_final():
    pruner = tp.Pruner(make_mlp64(), FINAL, Adaptive(lambda: 1.0, begin=0, end=30, every=1, increment=1 / 3))
    for _ in range(4):
        pruner.step()
    assert [row["action"] for row in pruner.schedule.history] == ["raise"] * 3 + ["done"]


# ----------------------------------------------------------------------------------------------------
# 2. the masks and weights while training: reverts restore what was held


def train_run(model, optimizer, pruner, data, start=0, watch=None):
    """Training steps ``start, start + 1, ...`` on ``data``; ``watch(step, before)`` after each
    pruner.step(), with the masks, weights and Adam state as they were just before it."""
    for step, (x, y) in enumerate(data, start):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        before = None
        if watch is not None:
            before = (masks_of(model), weights_of(model))
        pruner.step()
        if watch is not None:
            watch(step, before)


CASE_A = CASES["raise-pause-revert"]


def make_training(scope="layer", values=None, start=0, seed=0, **kwargs):
    model = make_mlp64(seed)
    script = Script(CASE_A[1] if values is None else values, start=start)
    options = dict(CASE_A[0], **kwargs)
    pruner = tp.Pruner(model, FINAL, Adaptive(script, begin=1, every=2, **options), scope=scope)
    script.pruner = pruner
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, optimizer, pruner, script


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_revert_restores_the_held_masks_and_weights(scope):
    model, optimizer, pruner, _ = make_training(scope)
    held = {}
    seen = []

    def watch(step, before):
        history = pruner.schedule.history
        assert_masks_at(model, level_at(history, step), scope)
        if not history or history[-1]["step"] != step:
            return
        action = history[-1]["action"]
        masks_before, weights_before = before
        if action == "raise":  # remembered before this step's update: the level that held
            held.update(masks=masks_before, weights=weights_before)
            return
        if action not in ("revert", "stop"):
            return
        seen.append(step)
        now_masks, now_weights = masks_of(model), weights_of(model)
        for name in LAYERS:
            assert torch.equal(now_masks[name], held["masks"][name]), name
            back = held["masks"][name] & ~masks_before[name]
            kept = held["masks"][name] & masks_before[name]
            assert bool(back.any()), name
            weight = now_weights[name]
            assert torch.equal(weight[back], held["weights"][name][back]), name  # as they were, bit for bit
            assert bool((held["weights"][name][back] != 0).any())
            assert torch.equal(weight[kept], weights_before[name][kept]), name  # as they are
            assert bool((weight[~now_masks[name]] == 0).all()), name
            state = optimizer.state[model.get_submodule(name).weight]
            for key in ("exp_avg", "exp_avg_sq"):
                assert bool((state[key][back] == 0).all()), (name, key)

    train_run(model, optimizer, pruner, DATA[:24], watch=watch)
    assert seen == [7, 19]
    assert [row["action"] for row in pruner.schedule.history] == [a for _, a, _ in CASE_A[2]]


def test_weights_that_come_back_train_again():
    model, optimizer, pruner, _ = make_training()
    train_run(model, optimizer, pruner, DATA[:8])  # reverted at 7
    back_masks = masks_of(model)
    weights = weights_of(model)
    train_run(model, optimizer, pruner, DATA[8:9], start=8)  # a plain step (no check at 8)
    for name in LAYERS:
        moved = model.get_submodule(name).weight.detach() != weights[name]
        assert bool(moved[back_masks[name]].any())


# ----------------------------------------------------------------------------------------------------
# 3. resume


def assert_same_run(a, b):
    (model_a, opt_a, pruner_a), (model_b, opt_b, pruner_b) = a, b
    assert equal_nested(dict(model_a.state_dict()), dict(model_b.state_dict()))
    assert equal_nested(opt_a.state_dict(), opt_b.state_dict())
    assert equal_nested(pruner_a.state_dict(), pruner_b.state_dict())
    assert pruner_a.schedule.history == pruner_b.schedule.history
    assert pruner_a.steps == pruner_b.steps


@pytest.mark.parametrize("stops", [(1,), (2,), (6,), (8,), (18,), (22,), (2, 6, 8, 18)],
                         ids=["before-first-check", "after-first-raise", "between-pause-and-revert",
                              "after-revert", "raise-pause-then-revert", "after-end", "several"])
def test_resume_is_the_uninterrupted_run(stops):
    straight = make_training()
    train_run(*straight[:3], DATA[:24])
    assert [a for _, a, _ in CASE_A[2]] == [row["action"] for row in straight[2].schedule.history]

    model, optimizer, pruner, script = make_training()
    train_run(model, optimizer, pruner, DATA[:stops[0]])
    for start, stop in zip(stops, stops[1:] + (24,)):
        state = checkpoint(model, optimizer, pruner)
        if start > 1:  # the first check raised: the held snapshot travels
            assert "held" in state["pruner"] and set(state["pruner"]["held"]) == set(LAYERS)
        calls = len(state["pruner"]["schedule"]["history"])
        model, optimizer, pruner, script = make_training(start=calls, seed=start + 100)  # all from `state`
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        pruner.load_state_dict(state["pruner"])
        assert pruner.steps == start and len(pruner.schedule.history) == calls
        train_run(model, optimizer, pruner, DATA[start:stop], start=start)
    assert_same_run(straight[:3], (model, optimizer, pruner))
    assert script.next == len(CASE_A[1])


def progressed(adaptive=True, steps=10):
    """A Pruner that has taken ``steps`` steps without training, with or without Adaptive."""
    model = make_mlp64()
    if adaptive:
        schedule = Adaptive(Script([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), begin=1, end=21, every=2,
                            increment=0.125, patience=1)
    else:
        schedule = Cubic(begin=1, end=21, every=2)
    pruner = tp.Pruner(model, FINAL, schedule)
    for _ in range(steps):
        pruner.step()
    return model, pruner


def assert_nothing_changed(model, pruner, before):
    model_before, state_before, steps_before, history_before = before
    assert_unchanged(model, model_before)
    assert equal_nested(pruner.state_dict(), state_before)
    assert pruner.steps == steps_before
    assert getattr(pruner.schedule, "history", None) == history_before


def frozen(model, pruner):
    history = copy.deepcopy(getattr(pruner.schedule, "history", None))
    return snapshot(model), pruner.state_dict(), pruner.steps, history


@pytest.mark.parametrize("saved_adaptive", [False, True])
def test_a_state_with_or_without_adaptive_only_loads_alike(saved_adaptive):
    _, saved = progressed(adaptive=saved_adaptive, steps=4)
    state = through_bytes(saved.state_dict())
    assert ("schedule" in state) is saved_adaptive
    model, pruner = progressed(adaptive=not saved_adaptive, steps=10)
    before = frozen(model, pruner)
    with pytest.raises(ValueError, match="Adaptive"):
        pruner.load_state_dict(state)
    assert_nothing_changed(model, pruner, before)


def corrupt_schedule_missing_key(state):
    del state["schedule"]["level"]


def corrupt_held_shape(state):
    state["held"]["2"]["mask"] = torch.ones(3, 3, dtype=torch.bool)


def corrupt_held_name(state):
    state["held"]["9"] = state["held"].pop("2")


def corrupt_history_rows(state):
    state["schedule"]["history"] = [1, 2]


def corrupt_history_not_a_list(state):
    state["schedule"]["history"] = tuple(state["schedule"]["history"])


# (field, bad value) of the schedule's state: each is refused by name, before anything is assigned
BAD_FIELDS = [
    ("level", "high"), ("level", 1.5), ("level", -0.125), ("level", math.nan), ("level", None),
    ("held", 2.0), ("held", -1), ("held", math.inf), ("held", True),
    ("increment", 0), ("increment", 0.0), ("increment", 1.5), ("increment", -0.1), ("increment", None),
    ("best", math.nan), ("best", math.inf), ("best", "1.0"), ("best", True),
    ("stopped", 1), ("stopped", "no"), ("stopped", None),
    ("fails", -1), ("fails", 1.0), ("fails", True), ("fails", "0"),
]

# (key of the last history row, bad value, or DELETE)
DELETE = object()
BAD_ROWS = [
    ("step", 3.0), ("step", "3"), ("step", None), ("step", DELETE),
    ("metric", math.nan), ("metric", math.inf), ("metric", "1.0"), ("metric", None), ("metric", DELETE),
    ("level", math.inf), ("level", "0.25"), ("level", None), ("level", DELETE),
    ("action", "jump"), ("action", None), ("action", "RAISE"), ("action", DELETE),
]


def bad_field(field, value):
    def corrupt(state):
        state["schedule"][field] = value
    return corrupt


def bad_row(key, value):
    def corrupt(state):
        row = state["schedule"]["history"][-1]
        if value is DELETE:
            del row[key]
        else:
            row[key] = value
    return corrupt


CORRUPT = [
    (corrupt_schedule_missing_key, "Adaptive.state_dict"),
    (corrupt_held_shape, "held"),  # the strategy refuses it after the schedule loaded: the schedule goes back
    (corrupt_held_name, "held"),
    (corrupt_history_rows, "bad history"),
    (corrupt_history_not_a_list, "bad history"),
    *[(bad_field(field, value), f"bad {field}") for field, value in BAD_FIELDS],
    *[(bad_row(key, value), "bad history") for key, value in BAD_ROWS],
]
CORRUPT_IDS = [
    "schedule_missing_key", "held_shape", "held_name", "history_rows", "history_not_a_list",
    *[f"{field}={value!r}" for field, value in BAD_FIELDS],
    *[f"row-{key}={'deleted' if value is DELETE else repr(value)}" for key, value in BAD_ROWS],
]


@pytest.mark.parametrize("corrupt, message", CORRUPT, ids=CORRUPT_IDS)
def test_a_corrupt_state_raises_and_changes_nothing(corrupt, message):
    _, saved = progressed(steps=4)  # another level, history and held snapshot than the Pruner loaded into
    state = through_bytes(saved.state_dict())
    corrupt(state)
    model, pruner = progressed(steps=10)
    before = frozen(model, pruner)
    with pytest.raises(ValueError, match=message):
        pruner.load_state_dict(state)
    assert_nothing_changed(model, pruner, before)
    # and it goes on as the run it was: the schedule did not keep any part of the bad state
    straight_model, straight = progressed(steps=12)
    for _ in range(2):
        pruner.step()
    assert pruner.schedule.history == straight.schedule.history
    assert equal_nested(pruner.state_dict(), straight.state_dict())


@pytest.mark.parametrize("field, value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_the_schedule_alone_refuses_a_bad_state_and_changes_nothing(field, value):
    _, pruner = progressed(steps=4)
    schedule = pruner.schedule
    state = schedule.state_dict()
    before, history = copy.deepcopy(state), schedule.history
    bad = dict(state, **{field: value})
    with pytest.raises(ValueError, match=f"bad {field}"):
        schedule.load_state_dict(bad)
    assert equal_nested(schedule.state_dict(), before) and schedule.history == history


def test_the_schedule_loads_the_edges_of_valid_states():
    schedule = Adaptive(ok_metric, begin=0, end=10, every=1, final=0.5).fresh()
    edge = {"best": None, "held": 0, "level": 1, "increment": 1, "fails": 0, "stopped": True,
            "history": [{"step": 0, "metric": -3, "level": 1, "action": "done"}]}
    schedule.load_state_dict(copy.deepcopy(edge))
    assert schedule.state_dict() == edge and schedule.stopped and schedule.sparsity_at(0) == 0.5
    other = dict(edge, best=-2.5, held=1.0, level=0.0, increment=2 ** -30, fails=7, stopped=False, history=[])
    schedule.load_state_dict(other)
    assert schedule.state_dict() == other and not schedule.stopped and schedule.history == []
    for not_a_dict in ("garbage", None, [1]):
        with pytest.raises(ValueError, match="Adaptive.state_dict"):
            schedule.load_state_dict(not_a_dict)
    assert schedule.state_dict() == other


def schedule_a_string(state):
    state["schedule"] = "garbage"


def schedule_a_list(state):
    state["schedule"] = [1]


def history_an_int(state):
    state["schedule"]["history"] = 5


@pytest.mark.parametrize("corrupt", [schedule_a_string, schedule_a_list, history_an_int])
def test_a_schedule_entry_of_the_wrong_type_raises_value_error(corrupt):
    _, saved = progressed(steps=4)
    state = through_bytes(saved.state_dict())
    corrupt(state)
    model, pruner = progressed(steps=10)
    before = frozen(model, pruner)
    try:
        with pytest.raises(ValueError):
            pruner.load_state_dict(state)
    finally:  # whatever it raises, it raises before changing anything
        assert_nothing_changed(model, pruner, before)


def test_a_raise_without_a_held_entry_does_not_load():
    _, saved = progressed(steps=4)  # raised at 1 and 3: a revert would go back to the held masks
    state = through_bytes(saved.state_dict())
    assert [row["action"] for row in state["schedule"]["history"]] == ["raise", "raise"]
    del state["held"]
    model, pruner = progressed(steps=10)
    before = frozen(model, pruner)
    with pytest.raises(ValueError, match="held"):
        pruner.load_state_dict(state)
    assert_nothing_changed(model, pruner, before)


def held_empty(state):
    state["held"] = {}


def held_without_a_layer(state):
    del state["held"]["2"]


@pytest.mark.parametrize("corrupt", [held_empty, held_without_a_layer])
def test_a_held_entry_without_every_layer_does_not_load(corrupt):
    _, saved = progressed(steps=4)
    state = through_bytes(saved.state_dict())
    corrupt(state)
    model, pruner = progressed(steps=10)
    before = frozen(model, pruner)
    with pytest.raises(ValueError, match="held"):
        pruner.load_state_dict(state)
    assert_nothing_changed(model, pruner, before)


def test_a_run_that_never_raised_loads_without_a_held_entry():
    def single_check():  # the only check (1) is the last: "done" unpruned, nothing remembered
        model = make_mlp64()
        return model, tp.Pruner(model, FINAL, Adaptive(Script([1.0]), begin=1, end=2, every=2))

    _, saved = single_check()
    for _ in range(3):
        saved.step()
    state = through_bytes(saved.state_dict())
    assert "held" not in state and [row["action"] for row in state["schedule"]["history"]] == ["done"]
    model, pruner = single_check()
    pruner.load_state_dict(state)
    assert pruner.steps == 3 and pruner.schedule.stopped and pruner.schedule.history == saved.schedule.history
    assert equal_nested(pruner.state_dict(), saved.state_dict())
    fresh = tp.Pruner(make_mlp64(), FINAL, Adaptive(Script([]), begin=1, end=21, every=2))
    before = frozen(fresh.model, fresh)
    fresh.load_state_dict(through_bytes(fresh.state_dict()))  # before the first check: nothing held either
    assert_nothing_changed(fresh.model, fresh, before)


# ----------------------------------------------------------------------------------------------------
# 4. fresh(): a run per Pruner; per-layer schedules share it


def test_each_pruner_runs_its_own_copy():
    schedule = Adaptive(lambda: 1.0, begin=1, end=21, every=2, increment=0.25)
    fixed = Cubic(0, 10, 2)
    assert fixed.fresh() is fixed
    first = tp.Pruner(make_mlp64(0), FINAL, schedule)
    second = tp.Pruner(make_mlp64(1), FINAL, schedule)
    assert first.schedule is not schedule and second.schedule is not schedule
    for _ in range(6):
        first.step()
    assert [row["step"] for row in first.schedule.history] == [1, 3, 5]
    assert second.schedule.history == [] and second.target_at(5) == {name: 0.0 for name in LAYERS}
    assert all(not bool((~m).any()) for m in tp.masks(second.model).values())
    for _ in range(2):
        second.step()
    assert [row["step"] for row in second.schedule.history] == [1]
    assert [row["level"] for row in first.schedule.history] == [0.25, 0.5, 0.75]
    assert second.target_at(5) == {name: FINAL * 0.25 for name in LAYERS}
    # the user's object decided nothing and still has no final
    assert schedule.history == [] and not schedule.stopped and schedule.final is None
    assert schedule.state_dict()["level"] == 0.0
    with pytest.raises(ValueError, match="final"):
        schedule.sparsity_at(5)


def test_dict_scope_layers_share_the_decisions():
    finals = {"0": 0.5, "2": 0.9, "4": 0.25}
    script = Script([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    schedule = Adaptive(script, begin=1, end=13, every=2, increment=0.25, patience=1)
    model = make_mlp64()
    pruner = tp.Pruner(model, None, schedule, scope=finals)
    script.pruner = pruner
    for step in range(16):
        pruner.step()
        level = level_at(pruner.schedule.history, step)
        assert_masks_at(model, level, "layer", finals)
        assert pruner.target_at(step) == {name: final * level for name, final in finals.items()}
    # 13 is the last check (13 + 2 > 13) and holds: "done" at 0.625
    assert [(row["action"], row["level"]) for row in pruner.schedule.history] == [
        ("raise", 0.25), ("raise", 0.5), ("revert", 0.25), ("raise", 0.375), ("raise", 0.5), ("raise", 0.625),
        ("done", 0.625)]
    assert script.steps == [1, 3, 5, 7, 9, 11, 13]  # one metric call per check, not one per layer


# ----------------------------------------------------------------------------------------------------
# 5. errors


def ok_metric():
    return 1.0


@pytest.mark.parametrize("kwargs, error, argument", [
    (dict(metric=5), TypeError, "metric"),
    (dict(metric=None), TypeError, "metric"),
    (dict(increment=0), ValueError, "increment"),
    (dict(increment=1.5), ValueError, "increment"),
    (dict(increment=True), ValueError, "increment"),
    (dict(increment=-0.1), ValueError, "increment"),
    (dict(increment="0.1"), ValueError, "increment"),
    (dict(increment=math.nan), ValueError, "increment"),
    (dict(min_increment=0), ValueError, "min_increment"),
    (dict(min_increment=1.5), ValueError, "min_increment"),
    (dict(min_increment=True), ValueError, "min_increment"),
    (dict(min_increment=math.nan), ValueError, "min_increment"),
    (dict(tolerance=-0.1), ValueError, "tolerance"),
    (dict(tolerance=math.inf), ValueError, "tolerance"),
    (dict(tolerance=math.nan), ValueError, "tolerance"),
    (dict(tolerance=True), ValueError, "tolerance"),
    (dict(tolerance="0"), ValueError, "tolerance"),
    (dict(patience=0), ValueError, "patience"),
    (dict(patience=True), ValueError, "patience"),
    (dict(patience=1.5), ValueError, "patience"),
    (dict(patience=-1), ValueError, "patience"),
    (dict(mode="up"), ValueError, "mode"),
    (dict(mode=None), ValueError, "mode"),
    (dict(begin=5, end=3), ValueError, "end"),
    (dict(every=0), ValueError, "every"),
    (dict(every=True), ValueError, "every"),
    (dict(begin=-1), ValueError, "begin"),
    (dict(final=1.0), ValueError, "final"),
])
def test_argument_errors_name_the_argument(kwargs, error, argument):
    options = dict(metric=ok_metric, begin=0, end=10, every=1)
    options.update(kwargs)
    with pytest.raises(error, match=f"`{argument}`"):
        Adaptive(**options)


def test_valid_edges_are_accepted():
    schedule = Adaptive(ok_metric, begin=3, end=3, every=1, increment=1, min_increment=1, tolerance=0, patience=1,
                        mode="min", final=0.5)
    assert schedule.min_increment == 1.0 and schedule.update_steps() == [3]
    assert Adaptive(ok_metric, increment=0.4).min_increment == 0.05


@pytest.mark.parametrize("bad", [
    math.nan, math.inf, -math.inf, None, "0.9", True, [1.0],
    torch.tensor([1.0, 2.0]), torch.ones(2, 2, dtype=torch.float64), torch.tensor([]),  # not one number
    torch.tensor(math.nan), torch.tensor(-math.inf), torch.tensor(True), np.float64(math.nan),
], ids=lambda bad: repr(bad).replace(" ", "").replace("\n", ""))
def test_a_metric_without_a_finite_number_raises_and_changes_nothing(bad):
    script = Script([1.0, bad])
    model = make_mlp64()
    pruner = tp.Pruner(model, FINAL, Adaptive(script, begin=1, end=21, every=2, increment=0.25))
    script.pruner = pruner
    for _ in range(3):
        pruner.step()
    before = frozen(model, pruner)
    with pytest.raises(ValueError, match=r"(?s)`metric`.*step 3"):  # (?s): a tensor's repr has newlines
        pruner.step()
    assert_nothing_changed(model, pruner, before)


def test_a_metric_returning_a_numpy_array_names_the_metric():
    schedule = Adaptive(lambda: np.array([1.0, 2.0]), begin=0, end=3, final=0.5).fresh()
    with pytest.raises(ValueError, match=r"`metric`.*step 0"):  # a ValueError, but "Regex pattern did not match"
        schedule.advance(0)
    assert schedule.history == []


# 0-dim tensors (also one that needs grad, as a loss does) and numpy scalars are numbers: the decisions of
# "raise-pause-revert" (and "mode-min") as with floats, and the history holds Python floats
TENSOR_VALUES = [torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64), np.float32(0.5), np.float64(0.5),
                 torch.tensor(1, dtype=torch.int64), torch.tensor(0.875, requires_grad=True) * 1, np.int64(1),
                 torch.tensor(1.0), torch.tensor(0.0, dtype=torch.float16), np.float64(0.0),
                 torch.tensor(1.0, dtype=torch.bfloat16)]


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
@pytest.mark.parametrize("mode", ["max", "min"])
def test_a_metric_may_return_a_0_dim_tensor_or_numpy_scalar(mode):
    kwargs, floats, expected = CASES["raise-pause-revert"]
    assert [float(v) for v in TENSOR_VALUES] == [1.0, 1.0, 0.5, 0.5, 1.0, 0.875, 1.0, 1.0, 0.0, 0.0, 1.0]
    values = TENSOR_VALUES if mode == "max" else [-v for v in TENSOR_VALUES]
    script = Script(values)
    pruner = tp.Pruner(make_mlp64(), FINAL, Adaptive(script, begin=1, every=2, mode=mode, **kwargs))
    script.pruner = pruner
    for step in range(kwargs["end"] + 3):
        pruner.step()
        assert_masks_at(pruner.model, level_at(pruner.schedule.history, step), "layer")
    history = pruner.schedule.history
    assert [(row["step"], row["action"], row["level"]) for row in history] == expected  # 0.875 fails like 0.9
    sign = 1.0 if mode == "max" else -1.0
    assert [row["metric"] for row in history] == [sign * float(v) for v in TENSOR_VALUES]
    assert all(type(row["metric"]) is float for row in history)
    state = through_bytes(pruner.state_dict())  # plain numbers: it saves and loads with weights_only=True
    assert state["schedule"]["history"] == history and type(state["schedule"]["best"]) is float


def test_channel_granularity_refuses_adaptive():
    schedule = Adaptive(ok_metric, begin=0, end=10, every=2)
    model = make_mlp64()
    before = snapshot(model)
    with pytest.raises(ValueError, match="`schedule`"):
        tp.Pruner(model, 0.5, schedule, granularity="channel", example_inputs=torch.randn(2, 16, dtype=torch.float64))
    assert_unchanged(model, before)
    assert schedule.history == []


# ----------------------------------------------------------------------------------------------------
# 6. deepcopy


def test_a_deep_copy_carries_the_run_and_goes_on_alone():
    straight = make_training()
    train_run(*straight[:3], DATA[:24])

    model, optimizer, pruner, _ = make_training()
    train_run(model, optimizer, pruner, DATA[:18])  # raised at 15, paused at 17: the revert at 19 to come
    clone = copy.deepcopy(pruner)
    assert clone.model is not model and clone.schedule is not pruner.schedule
    assert clone.schedule.history == pruner.schedule.history
    assert equal_nested(clone.state_dict(), pruner.state_dict())
    clone_optimizer = torch.optim.Adam(clone.model.parameters(), lr=0.01)
    clone_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))

    before, state, history = snapshot(model), pruner.state_dict(), pruner.schedule.history
    train_run(clone.model, clone_optimizer, clone, DATA[18:24], start=18)
    assert_unchanged(model, before)
    assert equal_nested(pruner.state_dict(), state) and pruner.schedule.history == history
    assert pruner.target_at(18) == {name: FINAL * 0.625 for name in LAYERS}  # the original's level, not the copy's
    assert clone.target_at(23) == {name: FINAL * 0.5 for name in LAYERS}  # reverted at 19, done at 21
    assert_same_run(straight[:3], (clone.model, clone_optimizer, clone))
    # the original goes on as if nothing happened
    train_run(model, optimizer, pruner, DATA[18:24], start=18)
    assert_same_run(straight[:3], (model, optimizer, pruner))


# ----------------------------------------------------------------------------------------------------
# 7. plot


def test_plot_draws_the_run():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    script = Script(CASE_A[1])
    pruner = tp.Pruner(make_mlp64(), FINAL, Adaptive(script, begin=1, every=2, **CASE_A[0]))
    for _ in range(24):
        pruner.step()
    figure = tp.schedules.plot({"adaptive": pruner.schedule, "cubic": Cubic(1, 21, 2, final=FINAL)}, steps=30)
    try:
        line = figure.axes[0].lines[0]
        assert list(line.get_xdata()) == list(range(31))
        assert list(line.get_ydata()) == [100 * (FINAL * level_at(pruner.schedule.history, t)) for t in range(31)]
    finally:
        plt.close(figure)
    unused = tp.schedules.plot(Adaptive(ok_metric, 0, 10, 2, final=0.5))  # nothing decided: 0 throughout
    try:
        assert set(unused.axes[0].lines[0].get_ydata()) == {0.0}
    finally:
        plt.close(unused)
