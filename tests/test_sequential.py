"""Layer-by-layer (sequential) calibration: torchprune/sequential.py through tp.prune(sequential=...)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp
from torchprune import sequential
from torchprune.importance import Wanda
from torchprune.masking import prunable_layers

from conftest import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """A residual MLP block that takes keyword arguments, as transformer layers do."""

    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x, mask=None, scale=1.0):
        h = self.down(F.gelu(self.up(x)))
        if mask is not None:
            h = h * mask[..., None]
        return (x + scale * h,)


class Net(nn.Module):
    """head Linear -> blocks (hidden passed positionally or by keyword) -> tail Linear."""

    def __init__(self, d=12, n=3, by_keyword=False, per_block_scale=False):
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 4)
        self.by_keyword, self.per_block_scale = by_keyword, per_block_scale

    def forward(self, x):
        mask = (x[..., 0] > -1.5).float()  # a (batch, tokens) mask made once, as HF models do
        h = self.embed(x)
        for i, layer in enumerate(self.layers):
            scale = 0.5 + i if self.per_block_scale else 0.5
            h = layer(x=h, mask=mask, scale=scale)[0] if self.by_keyword else layer(h, mask=mask, scale=scale)[0]
        return self.head(h.mean(1))


def make_net(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Net(**kwargs)


def data(batches=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 5, 6, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(batches)]


def stage_names(net):
    blocks = [[f"layers.{k}.up", f"layers.{k}.down"] for k in range(len(net.layers))]
    return [["embed"], *blocks, ["head"]]


# ---------------------------------------------------------------------------------------------- blocks


def test_find_blocks_takes_the_largest_container_of_one_class():
    net = make_net()
    assert [name for name, _ in sequential.find_blocks(net)] == ["layers.0", "layers.1", "layers.2"]
    assert sequential.find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))) == []
    stack = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])  # a container of layers: each one is a block
    assert [name for name, _ in sequential.find_blocks(stack)] == ["0", "1", "2"]


def test_named_blocks_and_their_errors():
    net = make_net()
    assert [n for n, _ in sequential.find_blocks(net, "layers")] == ["layers.0", "layers.1", "layers.2"]
    assert [n for n, _ in sequential.find_blocks(net, ["layers.0", "layers.2"])] == ["layers.0", "layers.2"]
    with pytest.raises(ValueError, match="`blocks` names no module of the model: \\['nope'\\]"):
        sequential.find_blocks(net, "nope")
    with pytest.raises(ValueError, match="`blocks` must name an nn.ModuleList or nn.Sequential"):
        sequential.find_blocks(net, "embed")
    with pytest.raises(TypeError, match="`blocks` must be a module name or a list"):
        sequential.find_blocks(net, 3)


@pytest.mark.parametrize("by_keyword", [False, True])
def test_plan_puts_each_layer_in_its_stage(by_keyword):
    net = make_net(by_keyword=by_keyword)
    plan = sequential.plan(net, prunable_layers(net), data())
    assert [list(s.layers) for s in plan.stages] == stage_names(net)
    assert plan.problem is None
    assert plan.slot == ("x" if by_keyword else 0)


# ------------------------------------------------------------------------------------- equivalence


def manual_stage_by_stage(net, importance, sparsity, batches, loss_fn=None):
    """What sequential calibration must equal: each stage pruned on full passes of the model whose
    earlier stages are already pruned (a dict scope restricts tp.prune to the stage)."""
    for names in stage_names(net):
        tp.prune(net, importance=importance, scope={n: sparsity for n in names}, data=batches, loss_fn=loss_fn,
                 sequential=False)
    return tp.masks(net)


@pytest.mark.parametrize("importance", ["wanda", "activation", "apoz", "sparsegpt"])
@pytest.mark.parametrize("by_keyword", [False, True])
def test_forward_criteria_equal_pruning_stage_after_stage(importance, by_keyword):
    batches = data()
    twin = make_net(by_keyword=by_keyword)
    expected = manual_stage_by_stage(twin, importance, 0.5, batches)
    net = make_net(by_keyword=by_keyword)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the blocks replay: no warning
        tp.prune(net, 0.5, importance=importance, data=batches, sequential=True)
    for name, layer in prunable_layers(net).items():
        assert torch.equal(layer.weight_mask, expected[name]), name
        assert torch.equal(layer.weight, prunable_layers(twin)[name].weight), name  # SparseGPT's too


@pytest.mark.parametrize("importance", ["taylor", "gradient"])
def test_gradient_criteria_equal_pruning_stage_after_stage(importance):
    batches = data()
    expected = manual_stage_by_stage(make_net(), importance, 0.5, batches, F.cross_entropy)
    net = make_net()
    tp.prune(net, 0.5, importance=importance, data=batches, loss_fn=F.cross_entropy, sequential=True)
    for name, mask in tp.masks(net).items():
        assert torch.equal(mask, expected[name]), name


class Recording(Wanda):
    """Wanda that keeps every input it observes, per layer."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def observe_forward(self, module, inputs, output):
        self.seen.setdefault(id(module), []).append(inputs[0].detach().clone())
        super().observe_forward(module, inputs, output)


def test_each_block_is_calibrated_on_the_pruned_blocks_outputs():
    batches = data()
    dense = make_net()
    net = make_net()
    criterion = Recording()
    tp.prune(net, 0.6, importance=criterion, data=batches, sequential=True)
    for k in range(len(net.layers)):  # the model with stages before block k pruned, block k on dense
        probe = make_net()
        probe.load_state_dict(dense.state_dict())
        for name, layer in prunable_layers(net).items():  # pruned weights are zero in storage
            if name == "embed" or any(name.startswith(f"layers.{j}.") for j in range(k)):
                probe.get_submodule(name).weight.data.copy_(layer.weight.data)
        seen = []
        hook = probe.layers[k].up.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
        with torch.no_grad():
            for x, _ in batches:
                probe(x)
        hook.remove()
        recorded = criterion.seen[id(net.layers[k].up)]
        assert len(recorded) == len(seen)
        for a, b in zip(recorded, seen):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sequential_differs_from_one_pass_after_the_first_block():
    batches = data()
    one, seq = make_net(), make_net()
    tp.prune(one, 0.7, importance="wanda", data=batches)
    tp.prune(seq, 0.7, importance="wanda", data=batches, sequential=True)
    masks_one, masks_seq = tp.masks(one), tp.masks(seq)
    assert torch.equal(masks_one["embed"], masks_seq["embed"])  # the head sees the same data either way
    assert not all(torch.equal(masks_one[n], masks_seq[n]) for n in masks_one)


# --------------------------------------------------------------------------------- fallbacks, errors


def test_a_single_named_block_is_replayed():
    batches = data()
    expected = manual_stage_by_stage(make_net(n=1), "wanda", 0.5, batches)
    net = make_net(n=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one block: nothing to chain, still replayed
        tp.prune(net, 0.5, importance="wanda", data=batches, sequential=True, blocks=["layers.0"])
    for name, layer in prunable_layers(net).items():
        assert torch.equal(layer.weight_mask, expected[name]), name


def test_no_blocks_warns_and_calibrates_in_one_pass():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    twin = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    twin.load_state_dict(mlp.state_dict())
    batches = [(torch.randn(4, 6), None)]
    with pytest.warns(UserWarning, match="no repeated blocks found"):
        tp.prune(mlp, 0.5, importance="wanda", data=batches, sequential=True)
    tp.prune(twin, 0.5, importance="wanda", data=batches)
    assert all(torch.equal(tp.masks(mlp)[n], m) for n, m in tp.masks(twin).items())


@pytest.mark.parametrize("importance", ["wanda", "sparsegpt"])
def test_blocks_that_cannot_be_replayed_are_calibrated_on_full_passes(importance):
    batches = data()
    expected = manual_stage_by_stage(make_net(per_block_scale=True), importance, 0.5, batches)
    net = make_net(per_block_scale=True)
    with pytest.warns(UserWarning, match="block 'layers.1' gets another argument 'scale'.*same result, slower"):
        tp.prune(net, 0.5, importance=importance, data=batches, sequential=True)
    for name, layer in prunable_layers(net).items():
        assert torch.equal(layer.weight_mask, expected[name]), name


class Failing(Wanda):
    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def score(self, module):
        if module is self.bad:
            raise RuntimeError("scoring failed")
        return super().score(module)


def test_an_error_in_a_later_block_leaves_the_model_as_it_was():
    net = make_net()
    tp.prune(net, 0.2, exclude=["head"])  # some masks exist before: they must come back too
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="scoring failed"):
        tp.prune(net, 0.6, importance=Failing(net.layers[2].up), data=data(), sequential=True)
    assert_unchanged(net, before)


def test_arguments_are_checked():
    net = make_net()
    with pytest.raises(ValueError, match="`sequential=True` calibrates layer by layer on `data`"):
        tp.prune(net, 0.5, sequential=True)
    with pytest.raises(TypeError, match="`sequential` must be True, False or None"):
        tp.prune(net, 0.5, importance="wanda", data=data(), sequential="yes")
    with pytest.raises(ValueError, match="`blocks` names the repeated blocks"):
        tp.prune(net, 0.5, blocks="layers")
    with pytest.raises(ValueError, match="`sequential`/`blocks` apply to weight and N:M granularity"):
        tp.prune(net, 0.5, granularity="channel", sequential=True, example_inputs=data()[0][0])


def test_a_layer_a_block_never_calls_is_named():
    net = make_net()
    net.layers[1].unused = nn.Linear(12, 12)
    with pytest.raises(ValueError, match=r"layers \['layers.1.unused'\] were not called"):
        tp.prune(net, 0.5, importance="wanda", data=data(), sequential=True)


def test_a_one_shot_iterator_is_read_as_often_as_needed():
    batches = data()
    net, twin = make_net(), make_net()
    tp.prune(net, 0.5, importance="wanda", data=iter(batches), sequential=True)
    tp.prune(twin, 0.5, importance="wanda", data=batches, sequential=True)
    assert all(torch.equal(tp.masks(net)[n], m) for n, m in tp.masks(twin).items())


def test_global_scope_takes_each_layers_share_from_one_ranking():
    net = make_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tp.prune(net, 0.6, importance="activation", scope="global", data=data(), sequential=True)
    assert tp.sparsity(net) == pytest.approx(0.6, abs=0.01)
    shares = {n: float((~m).float().mean()) for n, m in tp.masks(net).items()}
    assert len({round(v, 2) for v in shares.values()}) > 1  # not uniform: ranked across layers
