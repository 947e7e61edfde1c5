"""Tracing by running (structured/record.py): every model first, including those whose own forward
torch.fx cannot trace; the same groups as fx where it can."""

import copy
import functools

import pytest
import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

import torchprune as tp
from torchprune.importance import resolve
from torchprune.structured import DependencyGraph
from torchprune.structured.channels import choose_removal
from torchprune.structured.plan import apply_plan, plan_from_removed, zero_channels

import zoo
from conftest import by_fx
from error_bounds import assert_same_function


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
        assert_same_function(pruned, masked, *x)
        other = torch.randn(3, 3, 16, 16)
        assert_same_function(pruned, masked, other)


def _summary(graph):
    return sorted((sorted(g.indices), len(g), g.prunable, g.exact) for g in graph.groups)


@pytest.mark.parametrize("name", [n for n in zoo.ZOO if n != "dynamic"])
def test_recorded_run_finds_the_groups_fx_finds(name):
    model, x = zoo.build(name)
    traced, by_run = by_fx(model, x), DependencyGraph(model, x)
    assert traced.tracing == "torch.fx" and by_run.tracing == "recorded run"
    assert _summary(by_run) == _summary(traced)
    for a, b in zip(sorted(traced.groups, key=lambda g: sorted(g.indices)),
                    sorted(by_run.groups, key=lambda g: sorted(g.indices))):
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
    assert ({("a", "weight", 0), ("fc", "weight", 0), ("fc", "weight", 1), ("out", "weight", 1)}
            <= set(group_of(graph, ("a", "weight", 0)).indices))
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
    traced, by_run = by_fx(model, x), DependencyGraph(model, x)
    assert by_run.tracing == "recorded run" and _summary(by_run) == _summary(traced)
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
    from torchprune.structured.tracing import record as record_module

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

    def hook(self, module, args, kwargs, out):
        alive = sum(1 for ref, _ in self.values.values() if ref() is not None and ref().dim() == 4)
        most[0] = max(most[0], alive)
        return original(self, module, args, kwargs, out)

    record_module.Recorder.hook = hook
    try:
        graph = DependencyGraph(Deep(), torch.randn(2, 4, 8, 8))
    finally:
        record_module.Recorder.hook = original
    assert graph.tracing == "recorded run" and 1 <= most[0] <= 3


# -- adversarial models: removal equals zeroing, or the channels stay ------------------------------


class _Pair(nn.Module):
    """Two convs feeding ``combine(a(x), b(x), x)``, then a conv ``c`` (or nothing)."""

    def __init__(self, combine, c_in=8, unused=False):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(c_in, 4, 3, padding=1)
        self.register_buffer("buf", torch.randn(8))
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.combine = combine
        if unused:  # a layer that does not run: torch.fx labels the model
            self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.c(self.combine(self, self.a(x), self.b(x), x))


_ADVERSARIAL = {
    # a stack (or a cat along the batch dim) then reduced: the inputs must keep equal channels
    "stack_sum": lambda m, a, b, x: torch.stack([a, b], 0).sum(0),
    "stack_amax": lambda m, a, b, x: torch.stack((a, b), dim=-1).amax(-1),
    "cat_batch_sum": lambda m, a, b, x: torch.cat([a, b], 0).sum(0, keepdim=True).expand(x.shape[0], -1, -1, -1),
    "cat_keywords": lambda m, a, b, x: torch.cat(tensors=(a, b), dim=1)[:, ::2],
    # a sum over channels of values that are not 0 where the channel is zeroed
    "sum_gate": lambda m, a, b, x: b * torch.sigmoid(a).sum(1, keepdim=True),
    "full_sum_used": lambda m, a, b, x: b * torch.sigmoid(a).sum(),
    # a 0-dim parameter, and a buffer indexed (a constant under torch.fx)
    "scalar_param": lambda m, a, b, x: a * m.scale + b,
    "indexed_buffer": lambda m, a, b, x: a + m.buf[None, :, None, None],
}


@pytest.mark.parametrize("unused", [False, True], ids=["recorded", "fx"])
@pytest.mark.parametrize("name", list(_ADVERSARIAL))
def test_adversarial_models_remove_like_zeroing(name, unused):
    torch.manual_seed(0)
    c_in = 8
    model = _Pair(_ADVERSARIAL[name], c_in, unused).eval()
    x = (torch.randn(1, 3, 8, 8),)
    before = {k for k in vars(model)}
    graph = DependencyGraph(model, x)
    assert {k for k in vars(model)} == before  # fx's constants do not stay on the model
    for importance in ("l2", "random"):
        for sparsity in (0.5, 0.9):
            removed = choose_removal(model, graph, sparsity, resolve(importance), only_exact=True)
            masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
            zero_channels(masked, removed)
            apply_plan(pruned, plan_from_removed(pruned, removed))
            with torch.no_grad():
                for inputs in (x, (torch.randn(4, 3, 8, 8),)):
                    assert_same_function(pruned, masked, *inputs)


def test_a_full_sum_read_into_python_leaves_the_channels_alone():
    """``if h.sum() > 0`` (control flow the run sees once) does not pin h's channels; the same
    sum used in a tensor op does."""

    class Net(nn.Module):
        def __init__(self, use):
            super().__init__()
            self.a, self.b, self.use = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1), use

        def forward(self, x):
            h = torch.relu(self.a(x))
            if self.use:
                return self.b(h) * h.sum()
            return self.b(h) if h.sum() > 0 else -self.b(h)

    x = torch.randn(1, 3, 8, 8)
    assert group_of(DependencyGraph(Net(False), x), ("a", "weight", 0)).prunable
    assert not group_of(DependencyGraph(Net(True), x), ("a", "weight", 0)).prunable


def test_squeeze_pins_a_dim_that_pruning_could_leave_at_one():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.a(x)).amax((2, 3), keepdim=True).squeeze())

    model, x = Net(), torch.randn(2, 3, 8, 8)
    assert not group_of(DependencyGraph(model, x), ("a", "weight", 0)).prunable
    tp.prune(model, sparsity=0.9, granularity="channel", example_inputs=x)
    model(torch.randn(4, 3, 8, 8))


@pytest.mark.parametrize("unused", [False, True], ids=["recorded", "fx"])
def test_layers_called_with_keywords(unused):
    """nn.MultiheadAttention(query=..., key=..., value=...) and conv(input=...): the keyword inputs
    are the layer's inputs (before, they were unseen and the pruned model failed)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.attn = nn.Linear(5, 16), nn.MultiheadAttention(16, 4, batch_first=True)
            self.conv, self.out = nn.Conv1d(16, 8, 1), nn.Linear(8, 3)
            if unused:
                self.unused = nn.Linear(2, 2)

        def forward(self, x):
            y = self.proj(x)
            z = self.attn(query=y, key=y, value=y, need_weights=False)[0]
            return self.out(self.conv(input=z.transpose(1, 2)).mean(-1))

    torch.manual_seed(0)
    model, x = Net().eval(), (torch.randn(1, 7, 5),)
    graph = DependencyGraph(model, x)
    assert ("attn", "in_proj_weight", 1) in group_of(graph, ("proj", "weight", 0)).indices
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    assert pruned.proj.out_features < 16
    with torch.no_grad():
        other = torch.randn(4, 7, 5)
        assert_same_function(pruned, masked, other)


@pytest.mark.parametrize("norm", ["old", "parametrization"])
def test_a_layer_with_a_computed_weight_keeps_its_channels(norm):
    """weight_norm / parametrizations: the layer's ``weight`` is computed from other tensors, which
    removal does not slice; its channels stay (before, the pruned model failed)."""
    from torch.nn.utils import parametrizations

    wrap = torch.nn.utils.weight_norm if norm == "old" else parametrizations.weight_norm
    model = nn.Sequential(wrap(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          wrap(nn.Conv2d(8, 4, 3, padding=1)), nn.Conv2d(4, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    graph = DependencyGraph(model, x)
    assert not graph.prunable_groups
    with pytest.warns(UserWarning, match="computes its weight"):
        tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    model(torch.randn(4, 3, 8, 8))


@pytest.mark.parametrize("unused", [False, True], ids=["recorded", "fx"])
def test_tied_weights_lose_the_same_indices(unused):
    """An Embedding and an output Linear sharing one weight: both holders lose the same columns,
    so removal still equals zeroing the shared tensor."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.hidden = nn.Embedding(10, 8), nn.Linear(8, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight
            if unused:
                self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.hidden(self.emb(x))))

    torch.manual_seed(0)
    model, x = Net().eval(), (torch.randint(0, 10, (1, 5)),)
    graph = DependencyGraph(model, x)
    for importance in ("l2", "random"):
        removed = choose_removal(model, graph, 0.5, resolve(importance), only_exact=True)
        assert removed
        masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
        zero_channels(masked, removed)
        apply_plan(pruned, plan_from_removed(pruned, removed))
        with torch.no_grad():
            other = torch.randint(0, 10, (4, 5))
            assert_same_function(pruned, masked, other)


def test_an_lstm_on_a_packed_sequence_is_left_whole():
    """A PackedSequence input (a namedtuple of tensors) is not a tensor the LSTM rule can read:
    the channels that reach it stay, and nothing fails inside the trace."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.lstm, self.out = nn.Linear(5, 8), nn.LSTM(8, 6, batch_first=True), nn.Linear(6, 2)

        def forward(self, x):
            packed = pack_padded_sequence(torch.relu(self.proj(x)), torch.full((x.shape[0],), x.shape[1]),
                                          batch_first=True)
            y, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)
            return self.out(y[:, -1])

    model, x = Net(), torch.randn(2, 7, 5)
    assert not group_of(DependencyGraph(model, x), ("proj", "weight", 0)).prunable
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    model(torch.randn(4, 7, 5))


def test_a_full_sum_read_as_a_number_pins_its_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            y = torch.sigmoid(self.a(x))
            return self.b(y) * y.sum().item()

    assert not group_of(DependencyGraph(Net(), torch.randn(1, 3, 8, 8)), ("a", "weight", 0)).prunable


def _passes_through(forward):
    """A decorator like transformers' (``can_return_tuple``, ``deprecate_kwarg``): ``(*args, **kwargs)``
    around a forward with more arguments, which torch.fx cannot trace ("co_varnames is too small")."""
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)
    return wrapper


class Rotary(nn.Module):
    """LLaMA's rotary embedding in small: ``original_inv_freq`` is a spare copy its forward never reads."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.arange(1.0, 5.0))
        self.register_buffer("original_inv_freq", torch.arange(1.0, 5.0))

    def forward(self, x):
        return torch.cos(x * self.inv_freq)


class SpareBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.rotary = Rotary()
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 4)

    @_passes_through
    def forward(self, x, scale=None, shift=None, **kwargs):
        return self.fc2(torch.relu(self.fc1(x))) + self.rotary(x)


def test_a_buffer_its_module_did_not_read_is_no_unrun_layer():
    """The root cause of issue 15 (LLaMA, Qwen2): an unread buffer made the run ask torch.fx, which
    cannot trace a decorated forward; the buffer joins no group, so the run is enough."""
    model, x = SpareBuffer().eval(), torch.randn(3, 4)
    with pytest.raises(Exception):
        fx.symbolic_trace(model)
    graph = DependencyGraph(model, x)
    assert graph.tracing == "recorded run" and group_of(graph, ("fc1", "weight", 0)).prunable
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    assert pruned.fc1.out_features == 8 and pruned.rotary.original_inv_freq.shape == (4,)
    with torch.no_grad():
        assert_same_function(pruned, masked, x)
    pruned(x).sum().backward()


def test_a_parameter_its_module_did_not_read_still_counts():
    class SkipsOne(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(4, 4), nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.used(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = SkipsOne()

        def forward(self, x):
            return self.inner(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="did not run"):
        DependencyGraph(Outer(), torch.ones(2, 4))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_tiny_llama_and_qwen2_prune_their_mlp_like_zeroing(family):
    """Issue 15: the MLP width goes (gate and up rows, down columns, together); attention and the
    hidden width (RMSNorm's mean over it) stay, with the warning that names why."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model, ids = getattr(transformers, f"{family}ForCausalLM")(config).eval(), torch.randint(0, 64, (1, 8))
    graph = DependencyGraph(model, (ids,))
    assert graph.tracing == "recorded run"
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    other = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        for x in (ids, other):
            torch.testing.assert_close(pruned(x).logits, masked(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="scaled_dot_product_attention"):
        tp.prune(model, 0.5, granularity="channel", importance="l2", example_inputs=ids)
    mlp = model.model.layers[0].mlp
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (32, 32, 32)
    assert model.model.layers[0].self_attn.q_proj.out_features == 32
    model(other, labels=other).loss.backward()


def test_a_decorated_forward_that_fx_cannot_trace_is_named():
    class SkipsOne(SpareBuffer):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"SkipsOne.forward is wrapped by a decorator.*did not run: \['spare'\]"):
        DependencyGraph(SkipsOne(), torch.randn(3, 4))


class _PositionTable(nn.Module):
    """A ViT in miniature: a class token before the patch tokens (so the stream's label differs
    along the tokens), plus a learned table of one vector per position (a bare parameter, so one id
    per token and channel), then residual MLP blocks."""

    def __init__(self, tokens=50, dim=16, depth=3):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                    for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1) + self.pos
        for block in self.blocks:
            x = x + block(x).reshape(x.shape[0], x.shape[1], -1)  # a reshape with a constant token count
        return self.head(x.mean(1))


def test_a_position_table_does_not_label_every_later_op_per_token():
    """The residual stream after `embed(x) + pos` is labelled per token; the first residual add
    takes the block output's one id per channel, so later adds and checks are per channel: the
    unified pairs grow with tokens x channels once, not once per block."""
    from torchprune.structured.tracing.fx import trace

    tokens, dim = 50, 16
    model, x = _PositionTable(tokens, dim, depth=3).eval(), torch.randn(2, tokens, 8)
    deeper = _PositionTable(tokens, dim, depth=9).eval()
    shallow_pairs = trace(model, (x,)).labels.unified
    deep_pairs = trace(deeper, (x,)).labels.unified
    # 6 more blocks, each unifying its input and output (fc1, fc2, add): per channel
    assert deep_pairs - shallow_pairs <= 6 * 8 * dim
    graph = DependencyGraph(model, x)
    stream = group_of(graph, ("embed", "weight", 0))
    assert stream.prunable and len(stream) == dim
    assert all(m in stream.indices for m in [("blocks.0.0", "weight", 1), ("blocks.2.2", "weight", 0),
                                             ("head", "weight", 1)])
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    assert pruned.pos.shape[-1] < dim
    with torch.no_grad():
        assert_same_function(pruned, masked, x)
