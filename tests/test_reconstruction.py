"""Reconstructing criteria (SparseGPT) through tp.prune and tp.Pruner: masks AND kept weights."""

import warnings

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.importance import SparseGPT
from torchprune.masking import prunable_layers

from conftest import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))


def data(batches=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, 16, generator=g)  # correlated input features: reconstruction has something to use
    return [torch.randn(32, 16, generator=g) @ mix for _ in range(batches)]


def quiet_prune(model, *args, **kwargs):
    with warnings.catch_warnings():  # an MLP has no repeated blocks: sequential falls back (tested elsewhere)
        warnings.simplefilter("ignore", UserWarning)
        return tp.prune(model, *args, **kwargs)


def manual(model, batches, **amount):
    """The criterion by hand on the dense model: observe every layer, then reconstruct each."""
    criterion = SparseGPT()
    layers = prunable_layers(model)
    hooks = [layer.register_forward_hook(lambda m, i, o: criterion.observe_forward(m, i, o))
             for layer in layers.values()]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return {name: criterion.reconstruct(layer, name, **amount) for name, layer in layers.items()}


@pytest.mark.parametrize("amount", [dict(sparsity=0.5), dict(n_m=(2, 4)), dict(threshold=1e-3)])
def test_one_pass_prune_is_the_criterion_applied_to_every_layer(amount):
    batches = data()
    expected = manual(make_mlp(), batches, **amount)
    net = make_mlp()
    keyword = {"sparsity": amount.get("sparsity"), "threshold": amount.get("threshold")}
    if "n_m" in amount:
        keyword = {"granularity": "2:4"}
    quiet_prune(net, importance="sparsegpt", data=batches, sequential=False, **keyword)
    for name, layer in prunable_layers(net).items():
        mask, weight = expected[name]
        assert torch.equal(layer.weight_mask, mask), name
        assert torch.equal(layer.weight.detach(), weight), name


def test_kept_weights_are_updated_and_the_output_is_closer_than_wanda():
    batches = data()
    dense, sgpt, wanda = make_mlp(), make_mlp(), make_mlp()
    quiet_prune(sgpt, 0.6, importance="sparsegpt", data=batches)
    tp.prune(wanda, 0.6, importance="wanda", data=batches)
    for name, layer in prunable_layers(sgpt).items():
        kept = layer.weight_mask
        assert int((~kept).sum()) == round(0.6 * kept.numel())
        assert torch.all(layer.weight[~kept] == 0)
        assert not torch.equal(layer.weight[kept], prunable_layers(dense)[name].weight[kept])  # reconstructed
    x = torch.cat(data(seed=7))  # held-out inputs
    with torch.no_grad():
        error_sgpt = (sgpt(x) - dense(x)).norm()
        error_wanda = (wanda(x) - dense(x)).norm()
    assert error_sgpt < error_wanda


def test_global_scope_ranks_all_layers_once_then_reconstructs_each():
    net = make_mlp()
    quiet_prune(net, 0.7, importance="sparsegpt", scope="global", data=data())
    assert tp.sparsity(net) == pytest.approx(0.7, abs=1e-3)
    shares = [float((~m).float().mean()) for m in tp.masks(net).values()]
    assert max(shares) - min(shares) > 0.01


def test_an_existing_mask_stays_and_counts():
    net = make_mlp()
    tp.prune(net, 0.3)
    before = {name: mask.clone() for name, mask in tp.masks(net).items()}
    quiet_prune(net, 0.6, importance="sparsegpt", data=data())
    for name, mask in tp.masks(net).items():
        assert not torch.any(mask & ~before[name])  # what was pruned stays pruned
        assert int((~mask).sum()) == round(0.6 * mask.numel())


def test_a_failure_changes_nothing():
    net = make_mlp()
    before = snapshot(net)
    batches = data()
    batches[1] = batches[1].clone()
    batches[1][0, 0] = float("nan")  # a NaN in the calibration data: H is not finite
    with pytest.raises(ValueError, match="layer"):
        quiet_prune(net, 0.5, importance="sparsegpt", data=batches)
    assert_unchanged(net, before)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(16, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
                                    for _ in range(3))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return x


def test_sequential_is_the_default_and_equals_pruning_stage_after_stage_even_with_residuals_outside():
    batches = data()
    net = Stack()
    with pytest.warns(UserWarning, match="does not receive block 'blocks.0''s output unchanged"):  # x + block(x)
        tp.prune(net, 0.5, importance="sparsegpt", data=batches)
    twin = Stack()
    stages = [["embed"]] + [[f"blocks.{k}.0", f"blocks.{k}.2"] for k in range(3)]
    for names in stages:
        tp.prune(twin, importance="sparsegpt", scope={n: 0.5 for n in names}, data=batches, sequential=False)
    for name, layer in prunable_layers(twin).items():
        assert torch.equal(prunable_layers(net)[name].weight_mask, layer.weight_mask), name
        torch.testing.assert_close(prunable_layers(net)[name].weight, layer.weight, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ Pruner


def train(model, pruner, steps, batches):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps):
        x = batches[step % len(batches)]
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()


@pytest.mark.parametrize("with_data", [True, False])
def test_pruner_reconstructs_at_every_update(with_data):
    batches = data()
    net = make_mlp()
    pruner = tp.Pruner(net, 0.75, tp.schedules.Cubic(begin=0, end=6, every=2), importance="sparsegpt",
                       data=batches if with_data else None)
    train(net, pruner, 8, batches)
    for layer in prunable_layers(net).values():
        assert int((~layer.weight_mask).sum()) == round(0.75 * layer.weight_mask.numel())
        assert torch.all(layer.weight[~layer.weight_mask] == 0)
    pruner.finalize()
    assert tp.sparsity(net) == pytest.approx(0.75, abs=1e-3)


def test_pruner_n_m_and_global():
    batches = data()
    net = make_mlp()
    pruner = tp.Pruner(net, None, tp.schedules.Cubic(begin=0, end=4, every=2), importance="sparsegpt",
                       granularity="2:4", data=batches)
    train(net, pruner, 6, batches)
    for layer in prunable_layers(net).values():
        assert torch.all(layer.weight_mask.view(-1, 4).sum(1) == 2)
    net = make_mlp()
    pruner = tp.Pruner(net, 0.6, tp.schedules.Cubic(begin=0, end=4, every=2), importance="sparsegpt",
                       scope="global", data=batches)
    train(net, pruner, 6, batches)
    assert pruner.sparsity == pytest.approx(0.6, abs=1e-3)


def test_pruner_update_equals_the_criterion_on_the_model_at_that_step():
    batches = data()
    net, twin = make_mlp(), make_mlp()
    pruner = tp.Pruner(net, 0.5, tp.schedules.OneShot(at=0), importance="sparsegpt", data=batches)
    pruner.step()
    expected = manual(twin, batches, sparsity=0.5)
    for name, layer in prunable_layers(net).items():
        assert torch.equal(layer.weight_mask, expected[name][0])
        assert torch.equal(layer.weight.detach(), expected[name][1])
