"""Shared small models for the tests."""

import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn


class SmallNet(nn.Module):
    """Conv1d, Conv2d and Linear layers, with BatchNorm: every prunable type in one model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))  # (N, 8, 4, 4)
        x = torch.relu(self.conv1d(x.flatten(2)))  # (N, 8, 16)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class TinyGPT(nn.Module):
    """GPT-2's tie in small: the output layer ``lm_head`` holds the token embedding's weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(16, 8)
        self.mlp = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(torch.relu(self.mlp(self.wte(ids))))


class ViewNet(nn.Module):
    """conv2's output is flattened with a hard-coded size: removing its channels would break it
    (the group of conv2's outputs and fc's inputs stays whole whatever is excluded)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.view(-1, 16 * 4 * 4))


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


def make_mlp64(seed=0):
    """`make_mlp` in float64: for runs compared bit for bit and gradients checked against bounds."""
    return make_mlp(seed).double()


def labelled_batches(n, seed=1, dtype=torch.float32):
    """``n`` seeded (inputs [8, 16], class labels in 0..3) pairs for `make_mlp`'s shape."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g, dtype=dtype), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def train_with_pruner(model, optimizer, pruner, data):
    """One optimizer step per (x, y) of ``data`` (cross-entropy), then ``pruner.step()``."""
    for x, y in data:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        pruner.step()


@pytest.fixture
def mlp():
    return make_mlp()


@pytest.fixture
def one_thread():
    """For tests of tiny models: one thread is fastest and does not fight other processes for
    cores. A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_net():
    torch.manual_seed(0)
    return SmallNet()


def snapshot(model):
    """Everything prune() could change: tensors (cloned) and module classes."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [type(m) for m in model.modules()],
        {k: (None if p.grad is None else p.grad.clone()) for k, p in model.named_parameters()},
        [m.training for m in model.modules()],
    )


def assert_unchanged(model, before):
    state, types, grads, training = before
    now = snapshot(model)
    assert set(now[0]) == set(state)
    for k in state:  # bit-exact, NaN included
        torch.testing.assert_close(now[0][k], state[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert now[1] == types
    for k in grads:
        assert (grads[k] is None) == (now[2][k] is None)
        if grads[k] is not None:
            assert torch.equal(grads[k], now[2][k])
    assert now[3] == training


def by_fx(model, x):
    """A DependencyGraph from torch.fx's symbolic trace (the fallback used when a layer does not run
    on x) and a labelled run of its graph, for comparing with the recorded run."""
    from torchprune.structured import DependencyGraph
    from torchprune.structured import graph as graph_module
    from torchprune.structured.tracing.fx import trace_fx

    original = graph_module.trace
    graph_module.trace = trace_fx
    try:
        return DependencyGraph(model, x)
    finally:
        graph_module.trace = original


def avx2_kernels_on():
    """Whether this process runs the AVX2 kernels (an AVX2 + FMA CPU, neither switch set); False
    where that cannot be told."""
    if "TORCHPRUNE_PORTABLE" in os.environ or "TORCHPRUNE_NO_AVX2" in os.environ:
        return False
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def through_bytes(obj, weights_only=True):
    """``obj`` after a torch.save / torch.load round trip through memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=weights_only)


def checkpoint(model, optimizer, pruner):
    """A training checkpoint (model, optimizer and Pruner state_dicts) as torch.save /
    torch.load(weights_only=True) would give it back."""
    return through_bytes({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "pruner": pruner.state_dict()})


def sparse_state(layer):
    """Everything a load could change in a SparseLayer: its tensors (cloned) and its format."""
    tensors = {k: v.detach().clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    return tensors, layer.block_rows, layer.nm, layer.format, layer.get_extra_state()


def assert_sparse_unchanged(layer, before):
    """``layer`` is as ``sparse_state`` saw it: same tensors, dtypes, shapes and format."""
    tensors, block_rows, nm, fmt, extra = before
    now = layer.state_dict()
    assert set(k for k, v in now.items() if isinstance(v, torch.Tensor)) == set(tensors)
    for key, value in tensors.items():
        assert now[key].dtype == value.dtype and now[key].shape == value.shape and torch.equal(now[key], value), key
    assert (layer.block_rows, layer.nm, layer.format, layer.get_extra_state()) == (block_rows, nm, fmt, extra)


_SWITCHED_SCRIPT = """
import sys
import torch
from torchprune import ops
cases = torch.load(sys.argv[1])
op = getattr(ops, {op!r}, None) or getattr(torch.ops.torchprune, {op!r})
torch.save([op(*args) for args in cases], sys.argv[2])
print("ok")
"""


def run_op_switched(op, cases, switch, tmp_path):
    """``torchprune.ops.<op>(*args)`` (or ``torch.ops.torchprune.<op>``, for an op with no Python
    wrapper) for every tuple of ``cases``, run in a fresh interpreter with
    the environment variable ``switch`` set to 1 (TORCHPRUNE_PORTABLE, TORCHPRUNE_NO_AVX2: the kernels
    are chosen once per process). Returns the outputs."""
    torch.save(cases, tmp_path / "cases.pt")
    done = subprocess.run([sys.executable, "-c", _SWITCHED_SCRIPT.format(op=op), str(tmp_path / "cases.pt"),
                           str(tmp_path / "out.pt")], env=dict(os.environ, **{switch: "1"}), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    return torch.load(tmp_path / "out.pt")
