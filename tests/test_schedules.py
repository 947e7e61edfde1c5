"""Schedules against their formulas, monotonicity, update steps and argument checks."""

import math

import matplotlib
import pytest

import torchprune as tp
from torchprune import schedules as S


def zhu_gupta(t, t0, n, dt, s_i, s_f):
    """Eq. (1) of Zhu & Gupta (2017), written independently of the implementation."""
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


@pytest.mark.parametrize("t0,n,dt,s_i,s_f", [(0, 10, 100, 0.0, 0.9), (50, 4, 25, 0.2, 0.95), (3, 7, 1, 0.0, 0.5)])
def test_cubic_matches_zhu_gupta_at_every_update_step(t0, n, dt, s_i, s_f):
    schedule = S.Cubic(begin=t0, end=t0 + n * dt, every=dt, initial=s_i, final=s_f)
    for k in range(n + 1):
        t = t0 + k * dt
        assert schedule.is_update(t)
        assert math.isclose(schedule.sparsity_at(t), zhu_gupta(t, t0, n, dt, s_i, s_f), abs_tol=1e-12)
        if k < n:  # constant between updates
            assert schedule.sparsity_at(t + dt - 1) == schedule.sparsity_at(t)
            assert not schedule.is_update(t + dt - 1) or dt == 1
    if t0:
        assert schedule.sparsity_at(t0 - 1) == 0.0
    assert schedule.sparsity_at(t0 + n * dt + 1000) == s_f


def test_cubic_power_and_hand_values():
    schedule = S.Cubic(begin=0, end=1000, every=100, final=0.9)
    assert math.isclose(schedule.sparsity_at(100), 0.9 * (1 - 0.9 ** 3))
    assert math.isclose(schedule.sparsity_at(550), 0.9 * (1 - 0.5 ** 3))  # staircase: the update at 500
    linear_like = S.Cubic(begin=0, end=10, every=1, final=0.5, power=1)
    assert math.isclose(linear_like.sparsity_at(4), 0.2)


def test_linear_exponential_constant_oneshot_values():
    assert math.isclose(S.Linear(begin=10, end=20, every=5, initial=0.1, final=0.5).sparsity_at(15), 0.3)
    exp = S.Exponential(begin=0, end=4, every=1, initial=0.0, final=0.9375)
    assert [round(exp.sparsity_at(t), 6) for t in range(5)] == [0.0, 0.5, 0.75, 0.875, 0.9375]  # density halves
    const = S.Constant(begin=5, end=9, every=2, final=0.7)
    assert [const.sparsity_at(t) for t in (4, 5, 8, 9)] == [0.0, 0.7, 0.7, 0.7]
    assert const.update_steps() == [5, 7, 9]
    one = S.OneShot(at=7, final=0.8)
    assert [one.sparsity_at(t) for t in (6, 7, 100)] == [0.0, 0.8, 0.8]
    assert one.update_steps() == [7]


def test_final_update_is_at_end_even_off_the_grid():
    schedule = S.Linear(begin=0, end=10, every=4, final=0.6)
    assert schedule.update_steps() == [0, 4, 8, 10]
    assert schedule.is_update(10) and not schedule.is_update(9)
    assert schedule.sparsity_at(9) == pytest.approx(0.6 * 8 / 10)
    assert schedule.sparsity_at(10) == 0.6


def test_iterative_milestones():
    schedule = S.Iterative(milestones=[0, 50, 100], sparsities=[0.5, 0.75, 0.9])
    assert [schedule.sparsity_at(t) for t in (0, 49, 50, 99, 100, 500)] == [0.5, 0.5, 0.75, 0.75, 0.9, 0.9]
    assert schedule.update_steps() == [0, 50, 100] and schedule.is_update(50) and not schedule.is_update(51)
    assert schedule.final == 0.9


@pytest.mark.parametrize("schedule", [
    S.Cubic(begin=3, end=200, every=7, initial=0.1, final=0.95), S.Linear(begin=0, end=99, every=10, final=0.8),
    S.Exponential(begin=0, end=50, every=3, initial=0.2, final=0.97), S.Constant(0, 30, 5, final=0.4),
    S.Iterative([5, 9, 40], [0.1, 0.1, 0.6]), S.Cubic(begin=0, end=10, every=3, final=0.5, power=0.5),
])
def test_monotone_and_within_bounds(schedule):
    values = [schedule.sparsity_at(t) for t in range(0, 260)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] == schedule.final and min(values) >= 0.0
    changes = [t for t in range(1, 260) if values[t] != values[t - 1]]
    assert set(changes) <= set(schedule.update_steps())


def test_resolved_fills_final_and_keeps_a_set_one():
    open_ended = S.Cubic(begin=0, end=10, every=1)
    with pytest.raises(ValueError, match="no `final`"):
        open_ended.sparsity_at(5)
    resolved = open_ended.resolved(0.8)
    assert resolved.final == 0.8 and open_ended.final is None
    fixed = S.Cubic(begin=0, end=10, every=1, final=0.5)
    assert fixed.resolved(0.8) is fixed


@pytest.mark.parametrize("make,message", [
    (lambda: S.Cubic(begin=10, end=5), "`end` must be >= `begin`"),
    (lambda: S.Cubic(begin=-1, end=5), "`begin` must be a non-negative int"),
    (lambda: S.Linear(end=5, every=0), "`every` must be a positive int"),
    (lambda: S.Linear(end=5, final=1.0), r"`final` must be a number in \[0, 1\)"),
    (lambda: S.Linear(end=5, initial=0.6, final=0.5), "must not exceed `final`"),
    (lambda: S.Cubic(end=5, power=0), "`power` must be a positive number"),
    (lambda: S.Iterative([0, 10], [0.5]), "equal length"),
    (lambda: S.Iterative([10, 5], [0.1, 0.5]), "strictly increasing"),
    (lambda: S.Iterative([0, 5], [0.5, 0.1]), "non-decreasing"),
    (lambda: S.Linear(end=5, every=1.5), "`every` must be a positive int"),
])
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "schedule.png"
    figure = S.plot({"cubic": S.Cubic(0, 100, 10, final=0.9), "linear": S.Linear(0, 100, 10, final=0.9)}, path=path)
    assert path.stat().st_size > 1000 and len(figure.axes[0].lines) == 2
    assert matplotlib.get_backend().lower() == "agg"
    with pytest.raises(TypeError, match="`schedules`"):
        S.plot([1, 2])
    assert tp.schedules is S


def test_cubic_starts_exactly_at_initial():
    schedule = tp.schedules.Cubic(begin=0, end=10, initial=0.1, final=0.9)
    assert schedule.sparsity_at(0) == 0.1 and schedule.sparsity_at(10) == 0.9
