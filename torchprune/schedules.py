"""Sparsity schedules: how sparse the model should be after each training step.

A schedule knows nothing about criteria or layers: it maps a step index to a target sparsity and
says at which steps the masks are updated. Every schedule but `OneShot` and `Iterative` takes

* ``begin``: the first step at which masks are updated (before it nothing is pruned),
* ``end``: the step at which ``final`` is reached (the last update),
* ``every``: steps between updates; updates happen at ``begin, begin + every, ...`` and always at
  ``end`` itself, so the final sparsity is reached even when ``end - begin`` is not a multiple,
* ``initial``: the sparsity of the first update (default 0),
* ``final``: the sparsity reached at ``end``; None means "the Pruner's target" (see `resolved`).

``sparsity_at(step)`` is the sparsity the masks hold after the update at the latest update step
``<= step`` (0 before ``begin``, ``final`` from ``end`` on): a staircase, as in training.

`Adaptive` is the one schedule that is not a fixed curve: it raises the sparsity while a metric
of the model holds, so its steps depend on the run; it keeps what it decided (`state_dict`).

>>> schedule = tp.schedules.Cubic(begin=0, end=1000, every=100, final=0.9)
>>> [round(schedule.sparsity_at(t), 3) for t in (0, 99, 100, 500, 1000)]
[0.0, 0.0, 0.244, 0.787, 0.9]
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Callable, List, Optional, Sequence

__all__ = ["Schedule", "OneShot", "Constant", "Linear", "Cubic", "Exponential", "Iterative", "Adaptive", "plot"]


def _check_step(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"`{what}` must be a non-negative int, got {value!r}")
    return int(value)


def _check_fraction(value, what: str, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"`{what}` must be a number in [0, 1), got {value!r}")
    return float(value)


class Schedule:
    """Base class: update steps from ``begin`` to ``end`` every ``every`` steps; subclasses give
    the curve through `_curve(progress)` with ``progress`` in [0, 1]."""

    def __init__(self, begin: int = 0, end: int = 0, every: int = 1, initial: float = 0.0,
                 final: Optional[float] = None):
        self.begin = _check_step(begin, "begin")
        self.end = _check_step(end, "end")
        if self.end < self.begin:
            raise ValueError(f"`end` must be >= `begin` ({self.begin}), got {end!r}")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"`every` must be a positive int, got {every!r}")
        self.every = int(every)
        self.initial = _check_fraction(initial, "initial")
        self.final = _check_fraction(final, "final", allow_none=True)
        self._check_order()

    def _check_order(self) -> None:
        if self.final is not None and self.initial > self.final:
            raise ValueError(f"`initial` ({self.initial}) must not exceed `final` ({self.final}): masks only grow")

    def resolved(self, final: float) -> "Schedule":
        """This schedule with ``final`` filled in (a copy); a schedule whose final is set keeps it."""
        if self.final is not None:
            return self
        out = copy.copy(self)
        out.final = _check_fraction(final, "final")
        out._check_order()
        return out

    def is_update(self, step: int) -> bool:
        """Whether the masks are updated at ``step``."""
        step = _check_step(step, "step")
        if step < self.begin or step > self.end:
            return False
        return step == self.end or (step - self.begin) % self.every == 0

    def update_steps(self) -> List[int]:
        """All update steps, in order."""
        steps = list(range(self.begin, self.end + 1, self.every))
        if steps[-1] != self.end:
            steps.append(self.end)
        return steps

    def sparsity_at(self, step: int) -> float:
        """The target sparsity after the latest update at or before ``step`` (0 before ``begin``)."""
        step = _check_step(step, "step")
        if self.final is None:
            raise ValueError(f"{type(self).__name__} has no `final` sparsity: pass final=..., or use it in a Pruner")
        if step < self.begin:
            return 0.0
        if step >= self.end:
            return self.final
        last = self.begin + (step - self.begin) // self.every * self.every
        span = self.end - self.begin
        return self._curve((last - self.begin) / span)

    def _curve(self, progress: float) -> float:
        raise NotImplementedError

    def fresh(self) -> "Schedule":
        """The schedule a new Pruner runs: this one (a fixed curve holds no state of a run)."""
        return self

    def advance(self, step: int) -> Optional[str]:
        """Called by the Pruner once at every step, before its update: nothing for a fixed curve."""
        return None

    def state_dict(self) -> dict:
        """What a run decided (nothing for a fixed curve)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()` output."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class OneShot(Schedule):
    """All of ``final`` at step ``at``: one update, the one-shot baseline inside a training loop."""

    def __init__(self, at: int = 0, final: Optional[float] = None):
        super().__init__(begin=at, end=at, every=1, initial=0.0, final=final)

    def _curve(self, progress: float) -> float:
        return self.final


class Constant(Schedule):
    """``final`` at every update from ``begin`` to ``end``: the same sparsity re-applied, so that
    the ranking is refreshed as training moves the weights (masks still only grow)."""

    def __init__(self, begin: int = 0, end: int = 0, every: int = 1, final: Optional[float] = None):
        super().__init__(begin=begin, end=end, every=every, initial=0.0, final=final)

    def _curve(self, progress: float) -> float:
        return self.final


class Linear(Schedule):
    """s = initial + (final - initial) * p, with p = (t - begin) / (end - begin)."""

    def _curve(self, progress: float) -> float:
        return self.initial + (self.final - self.initial) * progress


class Cubic(Schedule):
    """Zhu & Gupta (2017): s_t = final + (initial - final) * (1 - (t - t0) / (n * dt))^power.

    Prunes fast at first, while there are many redundant weights, and slowly near the end.
    ``power=3`` is the paper's curve; ``n * dt`` is ``end - begin``.
    """

    def __init__(self, begin: int = 0, end: int = 0, every: int = 1, initial: float = 0.0,
                 final: Optional[float] = None, power: float = 3):
        if isinstance(power, bool) or not isinstance(power, numbers.Real) or not power > 0:
            raise ValueError(f"`power` must be a positive number, got {power!r}")
        self.power = power
        super().__init__(begin=begin, end=end, every=every, initial=initial, final=final)

    def _curve(self, progress: float) -> float:
        if progress <= 0:  # exactly `initial`, not final + (initial - final) rounded
            return self.initial
        return self.final + (self.initial - self.final) * (1.0 - progress) ** self.power


class Exponential(Schedule):
    """The kept fraction shrinks by the same factor at every update:
    s = 1 - (1 - initial) * ((1 - final) / (1 - initial)) ** p."""

    def _curve(self, progress: float) -> float:
        ratio = (1.0 - self.final) / (1.0 - self.initial)
        return 1.0 - (1.0 - self.initial) * math.pow(ratio, progress)


class Iterative(Schedule):
    """Prune-then-fine-tune cycles: at ``milestones[i]`` the sparsity jumps to ``sparsities[i]``.

    >>> tp.schedules.Iterative(milestones=[0, 500, 1000], sparsities=[0.5, 0.75, 0.9])
    """

    def __init__(self, milestones: Sequence[int], sparsities: Sequence[float]):
        try:
            milestones, sparsities = list(milestones), list(sparsities)
        except TypeError:
            raise TypeError("`milestones` and `sparsities` must be sequences") from None
        if not milestones or len(milestones) != len(sparsities):
            raise ValueError(
                "`milestones` and `sparsities` must be non-empty and of equal length, "
                f"got {len(milestones)} and {len(sparsities)}")
        self.milestones = [_check_step(m, "milestones") for m in milestones]
        self.sparsities = [_check_fraction(s, "sparsities") for s in sparsities]
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"`milestones` must be strictly increasing, got {self.milestones}")
        if any(b < a for a, b in zip(self.sparsities, self.sparsities[1:])):
            raise ValueError(f"`sparsities` must be non-decreasing (masks only grow), got {self.sparsities}")
        super().__init__(begin=self.milestones[0], end=self.milestones[-1], every=1,
                         initial=self.sparsities[0], final=self.sparsities[-1])

    def is_update(self, step: int) -> bool:
        return _check_step(step, "step") in self.milestones

    def update_steps(self) -> List[int]:
        return list(self.milestones)

    def sparsity_at(self, step: int) -> float:
        step = _check_step(step, "step")
        value = 0.0
        for milestone, sparsity in zip(self.milestones, self.sparsities):
            if milestone <= step:
                value = sparsity
        return value


class Adaptive(Schedule):
    """A performance-driven pruning rate: the sparsity rises while ``metric()`` holds.

    Every ``every`` steps from ``begin`` (a check), the Pruner calls ``metric()`` (a callback that
    evaluates the model, e.g. validation accuracy; higher is better, or lower with
    ``mode="min"``) and compares it with the best value seen so far:

    * within ``tolerance`` of the best (``metric >= best - tolerance``): the current sparsity holds;
      the schedule remembers it and raises the sparsity by ``increment`` (a fraction of the way to
      ``final``: 0.1 is ten raises from 0 to final). When ``final`` holds, or at the last check
      (none comes before ``end``, so a raise would never be checked), it stops there ("done");
    * worse: it pauses (no raise) while the model trains on, and checks again. After ``patience``
      checks in a row that fail it goes back to the last sparsity that held (the Pruner restores
      those masks, with the weights they had then) and halves the increment, so that it next tries
      a smaller step. When the increment falls below ``min_increment`` (default ``increment / 8``)
      it stops there instead: the highest sparsity that held. A last check (none comes before
      ``end``) that fails also goes back, so a run never ends at a sparsity that did not hold.

    After ``end`` no check runs and the sparsity stays. The first check (at ``begin``) measures the
    unpruned model: that is the first best value, and the first raise.

    Each Pruner runs its own copy (`fresh`): read the decisions from ``pruner.schedule``:
    ``history`` lists each check's step, metric, level (the fraction of ``final``) and action
    ("raise", "pause", "revert", "stop": reverted for good, "done": ``final`` reached and held).
    `state_dict` / `load_state_dict` keep them, and `tp.Pruner.state_dict` includes them, so a
    resumed run decides as the uninterrupted one would. With a dict scope the levels are fractions
    of each layer's own final sparsity.

    >>> schedule = tp.schedules.Adaptive(lambda: accuracy(model, val), begin=0, end=3000, every=100,
    ...                                  final=0.95, increment=0.1, tolerance=0.01)
    """

    def __init__(self, metric: Callable[[], float], begin: int = 0, end: int = 0, every: int = 1,
                 final: Optional[float] = None, increment: float = 0.1, tolerance: float = 0.0,
                 patience: int = 3, min_increment: Optional[float] = None, mode: str = "max"):
        if not callable(metric):
            raise TypeError(f"`metric` must be a callable returning a number, got {type(metric).__name__}")
        super().__init__(begin=begin, end=end, every=every, initial=0.0, final=final)
        for value, what in ((increment, "increment"), (min_increment, "min_increment")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not 0 < float(value) <= 1):
                raise ValueError(f"`{what}` must be a number in (0, 1], got {value!r}")
        if (isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real)
                or not 0 <= float(tolerance) < math.inf):
            raise ValueError(f"`tolerance` must be a non-negative number, got {tolerance!r}")
        if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 1:
            raise ValueError(f"`patience` must be a positive int, got {patience!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"`mode` must be 'max' or 'min', got {mode!r}")
        self.metric = metric
        self.increment = float(increment)
        self.tolerance = float(tolerance)
        self.patience = int(patience)
        self.min_increment = self.increment / 8 if min_increment is None else float(min_increment)
        self.mode = mode
        self._run = _AdaptiveRun(self.increment)

    def fresh(self) -> "Adaptive":
        """A copy with a run of its own (its per-layer copies, made by `resolved`, share it)."""
        out = copy.copy(self)
        out._run = _AdaptiveRun(self.increment)
        return out

    @property
    def history(self) -> List[dict]:
        """Each check so far: step, metric, level (fraction of final), action."""
        return [dict(row) for row in self._run.history]

    @property
    def stopped(self) -> bool:
        """Whether the schedule has stopped raising (final reached, or gone back to what held)."""
        return self._run.stopped

    def is_update(self, step: int) -> bool:
        step = _check_step(step, "step")
        return not self._run.stopped and self.begin <= step <= self.end and (step - self.begin) % self.every == 0

    def update_steps(self) -> List[int]:
        """The checks still to come, at most (the schedule may stop earlier)."""
        return [] if self._run.stopped else list(range(self.begin, self.end + 1, self.every))

    def sparsity_at(self, step: int) -> float:
        """The sparsity decided at the latest check at or before ``step`` (0 before the first)."""
        step = _check_step(step, "step")
        if self.final is None:
            raise ValueError("Adaptive has no `final` sparsity: pass final=..., or use it in a Pruner")
        level = 0.0
        for row in self._run.history:
            if row["step"] <= step:
                level = row["level"]
        return self.final * level

    def advance(self, step: int) -> Optional[str]:
        """At a check: evaluates ``metric()`` and decides (the action); None at other steps."""
        if not self.is_update(step):
            return None
        value = self.metric()
        if hasattr(value, "item") and not isinstance(value, numbers.Real):  # a tensor or numpy value
            count = value.numel() if hasattr(value, "numel") else getattr(value, "size", 1)
            if count != 1:
                raise ValueError(f"`metric` must return a finite number, got {count} values at step {step}")
            value = (value.detach() if hasattr(value, "detach") else value).item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(f"`metric` must return a finite number, got {value!r} at step {step}")
        return self._run.decide(step, float(value) if self.mode == "max" else -float(value), self)

    def state_dict(self) -> dict:
        return self._run.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._run.load_state_dict(state)


class _AdaptiveRun:
    """What an `Adaptive` schedule decided so far; shared by its per-layer copies."""

    FIELDS = ("best", "held", "level", "increment", "fails", "stopped")

    def __init__(self, increment: float):
        self.best: Optional[float] = None  # in "higher is better" units
        self.held = 0.0  # the last level that held
        self.level = 0.0
        self.increment = increment
        self.fails = 0
        self.stopped = False
        self.history: List[dict] = []

    def decide(self, step: int, value: float, schedule: Adaptive) -> str:
        last = step + schedule.every > schedule.end  # no check to come: end at what held
        if self.best is None or value >= self.best - schedule.tolerance:
            self.best = value if self.best is None else max(self.best, value)
            self.held, self.fails = self.level, 0
            if self.level >= 1.0 or last:  # at the last check a raise would never be checked
                action, self.stopped = "done", True
            else:  # rounded, and snapped to 1 when within 1e-9 of it: ten raises of 0.1 make exactly 1
                level = round(self.level + self.increment, 12)
                action, self.level = "raise", 1.0 if level > 1 - 1e-9 else level
        else:
            self.fails += 1
            if self.fails < schedule.patience and not last:
                action = "pause"
            else:
                self.level, self.fails, self.increment = self.held, 0, self.increment / 2
                self.stopped = last or self.increment < schedule.min_increment
                action = "stop" if self.stopped else "revert"
        metric = value if schedule.mode == "max" else -value
        self.history.append({"step": step, "metric": metric, "level": self.level, "action": action})
        return action

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.FIELDS}, "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Checks every field first: a bad state raises ValueError and changes nothing."""
        if not isinstance(state, dict) or any(k not in state for k in (*self.FIELDS, "history")):
            raise ValueError(f"`state` must be a dict returned by Adaptive.state_dict(), with keys {self.FIELDS} "
                             "and 'history'")
        problems = [key for key in ("held", "level") if not _is_number(state[key]) or not 0 <= state[key] <= 1]
        problems += [] if _is_number(state["increment"]) and 0 < state["increment"] <= 1 else ["increment"]
        problems += [] if state["best"] is None or _is_number(state["best"]) else ["best"]
        problems += [] if isinstance(state["stopped"], bool) else ["stopped"]
        fails = state["fails"]
        problems += [] if isinstance(fails, int) and not isinstance(fails, bool) and fails >= 0 else ["fails"]
        history = state["history"]
        rows_ok = isinstance(history, list) and all(
            isinstance(r, dict) and isinstance(r.get("step"), int) and not isinstance(r.get("step"), bool)
            and r["step"] >= 0 and _is_number(r.get("metric")) and _is_number(r.get("level"))
            and 0 <= r["level"] <= 1 and r.get("action") in ACTIONS for r in history)
        problems += [] if rows_ok else ["history"]
        if problems:
            raise ValueError(f"`state` is not a valid Adaptive.state_dict(): bad {', '.join(problems)}")
        for key in self.FIELDS:
            setattr(self, key, state[key])
        self.history = [dict(r) for r in history]


#: What an `Adaptive` check can decide.
ACTIONS = ("raise", "pause", "revert", "stop", "done")


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))


def plot(schedules, steps: Optional[int] = None, path=None, ax=None, title: str = "Sparsity schedule"):
    """Plots ``sparsity_at`` of one schedule or a ``{label: schedule}`` dict; returns the figure.

    Uses matplotlib's Agg backend when no ``ax`` is given; writes a PNG to ``path`` when given.

    >>> tp.schedules.plot({"cubic": Cubic(0, 1000, 100, final=0.9)}, path="schedule.png")
    """
    if isinstance(schedules, Schedule):
        schedules = {type(schedules).__name__: schedules}
    if not isinstance(schedules, dict) or not schedules or not all(isinstance(s, Schedule) for s in schedules.values()):
        raise TypeError("`schedules` must be a Schedule or a non-empty dict {label: Schedule}")
    if steps is None:
        steps = max(s.end for s in schedules.values()) + max(1, max(s.end for s in schedules.values()) // 10)
    steps = _check_step(steps, "steps")
    if ax is None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        figure, ax = plt.subplots(figsize=(6, 3.5))
    else:
        figure = ax.figure
    xs = list(range(steps + 1))
    for label, schedule in schedules.items():
        ax.step(xs, [100 * schedule.sparsity_at(t) for t in xs], where="post", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("sparsity (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure
