"""Tracing by running (structured/record.py): every model first, including those whose own forward
torch.fx cannot trace; the same groups as fx where it can."""

import copy

import pytest
import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

import torchprune as tp
import zoo
from torchprune.importance import resolve
from torchprune.structured import DependencyGraph
from torchprune.structured import graph as graph_module
from torchprune.structured.prune import choose_removal
from torchprune.structured.record import record
from torchprune.structured.remove import apply_plan, plan_from_removed, zero_channels
from torchprune.structured.trace import _LeafTracer, trace_fx


def group_of(graph, member):
    return next(g for g in graph.groups if member in g.indices)


def test_control_flow_in_the_model_itself_is_recorded():
    model, x = zoo.build("dynamic")
    with pytest.raises(Exception):
        fx.symbolic_trace(model)
    graph = DependencyGraph(model, x)
    assert graph.tracing == "recorded run" and "recorded run" in repr(graph)
    stream = group_of(graph, ("stem.0", "weight", 0))
    assert stream.prunable and len(stream) == 8
    for member in [("stem.1", "running_mean", 0), ("block.conv1", "weight", 1), ("block.conv2", "weight", 0),
                   ("gate", "weight", 0), ("gate", "weight", 1), ("fc", "weight", 1)]:
        assert member in stream.indices
    assert group_of(graph, ("block.conv1", "weight", 0)).prunable
    assert not group_of(graph, ("fc", "weight", 0)).prunable  # the model output


def test_recorded_model_prunes_like_zeroing_and_keeps_working():
    model, x = zoo.build("dynamic")
    graph = DependencyGraph(model, x)
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    assert pruned.gate.in_channels == 4 and pruned.block.conv1.out_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(pruned(*x), masked(*x), rtol=1e-4, atol=1e-5)
        other = torch.randn(3, 3, 16, 16)
        torch.testing.assert_close(pruned(other), masked(other), rtol=1e-4, atol=1e-5)


def _by_fx(model, x):
    """A DependencyGraph from torch.fx's symbolic trace and a labelled run of its graph."""
    original = graph_module.trace
    graph_module.trace = trace_fx
    try:
        return DependencyGraph(model, x)
    finally:
        graph_module.trace = original


def _summary(graph):
    return sorted((sorted(g.indices), len(g), g.prunable, g.exact) for g in graph.groups)


@pytest.mark.parametrize("name", [n for n in zoo.ZOO if n != "dynamic"])
def test_recorded_run_finds_the_groups_fx_finds(name):
    model, x = zoo.build(name)
    by_fx, by_run = _by_fx(model, x), DependencyGraph(model, x)
    assert by_fx.tracing == "torch.fx" and by_run.tracing == "recorded run"
    assert _summary(by_run) == _summary(by_fx)
    for a, b in zip(sorted(by_fx.groups, key=lambda g: sorted(g.indices)), sorted(by_run.groups, key=lambda g: sorted(g.indices))):
        for member in a.indices:
            assert sorted(a.indices[member].tolist()) == sorted(b.indices[member].tolist()), member


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if x.sum() > 0:
            h = h + self.fc(h)
        return self.out(h)


def test_a_module_that_did_not_run_is_refused():
    model = Branchy()
    with pytest.raises(ValueError, match=r"did not run: \['fc'\]"):
        DependencyGraph(model, -torch.ones(2, 4))
    graph = DependencyGraph(model, torch.ones(2, 4))
    assert {("a", "weight", 0), ("fc", "weight", 0), ("fc", "weight", 1), ("out", "weight", 1)} <= set(group_of(graph, ("a", "weight", 0)).indices)
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=torch.ones(2, 4))
    assert model.fc.out_features == 4
    model(-torch.ones(2, 4))  # the other branch still runs


class ReadsShape(nn.Module):
    """``n, c, hh, ww = h.shape`` reads the channel count (fx cannot unpack a traced shape)."""

    def __init__(self, read_channels: bool):
        super().__init__()
        self.read_channels = read_channels
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        if bool(x.isnan().any()):  # control flow on a value: torch.fx cannot trace this forward
            raise ValueError("NaN input")
        h = torch.relu(self.conv(x))
        if self.read_channels:
            n, c, hh, ww = h.shape
            h = h.reshape(n, c, hh * ww)
        else:
            n = h.shape[0]
            h = h.flatten(2)
        return self.fc(h.mean(-1))


def test_reading_a_size_pins_only_that_dim():
    x = torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(ReadsShape(True), x)
    g = group_of(graph, ("conv", "weight", 0))
    assert graph.tracing == "recorded run" and not g.prunable and any("size of a pruned dim" in r for r in g.reasons)
    graph = DependencyGraph(ReadsShape(False), x)
    assert graph.tracing == "recorded run" and group_of(graph, ("conv", "weight", 0)).prunable


class Operators(nn.Module):
    """Tensor operators and attributes that the run sees as Tensor.__rsub__, .T, __neg__, ..."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 5)
        self.d = nn.Linear(5, 2)

    def forward(self, x):
        h = self.a(x)
        h = 2 - torch.sigmoid(h) * h
        h = (h + self.b(h)) / 2
        h = self.c(h.T.T)
        return self.d(-h)


def test_operators_are_recorded_like_fx():
    model, x = Operators().eval(), torch.randn(3, 6)
    by_fx, by_run = _by_fx(model, x), DependencyGraph(model, x)
    assert by_run.tracing == "recorded run" and _summary(by_run) == _summary(by_fx)
    stream = group_of(by_run, ("a", "weight", 0))
    assert stream.prunable and {("b", "weight", 0), ("b", "weight", 1), ("c", "weight", 1)} <= set(stream.indices)
    assert group_of(by_run, ("c", "weight", 0)).prunable


def test_an_error_inside_a_layer_leaves_torch_function_modes_as_they_were():
    """The recorder takes its mode off torch's stack while a layer runs: an error in the layer
    must not leave it off (nor on) the stack."""

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(5, 2)  # wrong input width: fails inside the layer

        def forward(self, x):
            if x.sum() > 0:  # fx cannot trace this: the run is recorded
                x = x * 2
            return self.b(torch.relu(self.a(x)))

    class Outer(TorchFunctionMode):  # the caller's own mode, under ours
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Outer() as outer:
        with pytest.raises(RuntimeError):
            DependencyGraph(Broken(), torch.ones(2, 4))
        assert torch._C._len_torch_function_stack() == 1 and torch._C._get_function_stack_at(0) is outer
    assert torch._C._len_torch_function_stack() == 0
    graph = DependencyGraph(zoo.build("dynamic")[0], zoo.build("dynamic")[1])
    assert graph.tracing == "recorded run" and graph.prunable_groups


def test_the_run_holds_no_activation_the_model_frees():
    """Labels are kept by weak reference: a deep stack of layers does not keep every activation."""
    from torchprune.structured import record as record_module

    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(12))

        def forward(self, x):
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x.mean((2, 3))

    most = [0]
    original = record_module.Recorder.hook

    def hook(self, module, args, out):
        alive = sum(1 for ref, _ in self.values.values() if ref() is not None and ref().dim() == 4)
        most[0] = max(most[0], alive)
        return original(self, module, args, out)

    record_module.Recorder.hook = hook
    try:
        graph = DependencyGraph(Deep(), torch.randn(2, 4, 8, 8))
    finally:
        record_module.Recorder.hook = original
    assert graph.tracing == "recorded run" and 1 <= most[0] <= 3
