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

>>> schedule = tp.schedules.Cubic(begin=0, end=1000, every=100, final=0.9)
>>> [round(schedule.sparsity_at(t), 3) for t in (0, 99, 100, 500, 1000)]
[0.0, 0.0, 0.244, 0.787, 0.9]
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import List, Optional, Sequence

__all__ = ["Schedule", "OneShot", "Constant", "Linear", "Cubic", "Exponential", "Iterative", "plot"]


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
