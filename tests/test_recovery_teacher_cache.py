"""tp.recover(teacher_cache=True): the teacher runs once per batch of a list, the targets are the
teacher's rounded through bfloat16 in every round (so the run is the one a bfloat16-rounding teacher
would give), and a resumed run with an empty cache ends bit-identical to an uninterrupted one.
"""

import copy

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.recovery.teacher import STORED, TeacherCache

pytestmark = pytest.mark.usefixtures("one_thread")


class Counting(nn.Module):
    """A teacher that counts its calls and can round its outputs (and its hidden layer's) through bfloat16."""

    def __init__(self, seed=0, rounding=False):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.out = nn.Linear(32, 8)
        self.calls, self.rounding = 0, rounding

    def forward(self, x):
        self.calls += 1
        h = self.hidden(x)
        y = self.out(h)
        return y.to(STORED).float() if self.rounding else y


def data(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 16, generator=g) for _ in range(n)]


def student_of(teacher):
    student = copy.deepcopy(teacher)
    tp.prune(student, 0.7)
    return student


def go(student, teacher, batches, steps=10, **kwargs):
    return tp.recover(student, teacher, batches, steps, lr=1e-2, progress=False, log_every=1, **kwargs)


@pytest.mark.parametrize("container", [list, tuple])
def test_the_teacher_runs_once_per_batch(container):
    teacher = Counting()
    student = student_of(teacher)
    result = go(student, teacher, container(data(3)), steps=10, teacher_cache=True)
    assert teacher.calls == 3
    assert result.cache_bytes == 3 * 8 * 8 * 2  # three [8, 8] outputs in bfloat16
    uncached = Counting()
    assert go(student_of(uncached), uncached, data(3), steps=10).cache_bytes == 0
    assert uncached.calls == 10


def test_cached_run_is_the_run_of_a_teacher_rounded_through_bfloat16():
    """Loss by loss and weight by weight the same as a run whose teacher rounds its output through
    bfloat16 itself (no intermediate layers: those are rounded too, checked below)."""
    teacher, rounding = Counting(), Counting(rounding=True)
    a, b = student_of(teacher), student_of(teacher)
    cached = go(a, teacher, data(), steps=9, teacher_cache=True)
    plain = go(b, rounding, data(), steps=9)
    assert [r["loss"] for r in cached.history] == [r["loss"] for r in plain.history]
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_intermediate_layers_are_cached_rounded_and_used():
    teacher = Counting()
    student = student_of(teacher)
    run = go(student, teacher, data(2), steps=6, layers=["hidden"], teacher_cache=True)
    assert teacher.calls == 2 and len(run.history) == 6
    assert run.history[-1]["loss"] < run.history[0]["loss"]


def test_resumed_cached_run_is_bit_identical(tmp_path, monkeypatch):
    import torchprune.recovery.loop as loop
    teacher = Counting()
    straight_student = student_of(teacher)
    straight = go(straight_student, teacher, data(), steps=10, layers=["hidden"], teacher_cache=True)

    path = tmp_path / "c.pt"
    original = loop._save

    def stop_at_5(where, state):
        original(where, state)
        if state["done"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save", stop_at_5)
    first = student_of(teacher)
    with pytest.raises(KeyboardInterrupt):
        go(first, teacher, data(), steps=10, layers=["hidden"], teacher_cache=True, checkpoint=path,
           checkpoint_every=5)
    monkeypatch.undo()
    resumed_student = student_of(Counting(seed=3))
    resumed = go(resumed_student, teacher, data(), steps=10, layers=["hidden"], teacher_cache=True,
                 checkpoint=path, checkpoint_every=5)
    assert resumed.resumed_from == 5
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[5:]]
    for (name, x), (_, y) in zip(resumed_student.state_dict().items(), straight_student.state_dict().items()):
        assert torch.equal(x, y), name


def test_teacher_cache_keeps_bfloat16_gives_back_the_dtype_and_counts_bytes():
    cache = TeacherCache()
    out = torch.tensor([1.0, 1.0 + 2 ** -12, 3.0], dtype=torch.float64)
    layers = {"a": torch.ones(2, 3), "ids": torch.tensor([1, 2])}
    calls = []

    def compute():
        calls.append(1)
        return out, layers

    first = cache.targets(0, compute)
    second = cache.targets(0, compute)
    assert len(calls) == 1
    for got in (first, second):
        assert got[0].dtype == torch.float64 and got[0].tolist() == [1.0, 1.0, 3.0]  # 2^-12 is below bfloat16's step
        assert got[1]["a"].dtype == torch.float32 and torch.equal(got[1]["ids"], layers["ids"])
    assert cache.nbytes == 3 * 2 + 6 * 2 + 2 * 8
    cache.targets(1, compute)
    assert len(calls) == 2 and cache.nbytes == 2 * (3 * 2 + 6 * 2 + 2 * 8)
