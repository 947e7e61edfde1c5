"""The channel Pruner: coupled channels zeroed in every member while training (so they contribute
nothing), following the schedule and only growing; physical removal at finalize() with the same
outputs; the same choice as one-shot channel pruning; argument checks."""

import copy

import pytest
import torch
import torch.nn.functional as F

import torchprune as tp
from torchprune.pruner import ChannelPruner
from torchprune.schedules import Linear, OneShot

import zoo
from conftest import assert_unchanged, snapshot
from error_bounds import assert_same_function

pytestmark = pytest.mark.usefixtures("one_thread")


def params(model):
    return sum(p.numel() for p in model.parameters())


def member_slices(model, pruner):
    """(name, slice) of every member tensor's entries that belong to a zeroed channel."""
    removed = pruner.removed_channels()
    for name, group in pruner.groups.items():
        units = torch.as_tensor(removed[name], dtype=torch.int64)
        for (module, tensor, dim), indices in group.indices.items():
            value = getattr(model.get_submodule(module) if module else model, tensor)
            yield f"{module}.{tensor}[{dim}]", value.detach().index_select(dim, indices[units].flatten())


@pytest.mark.parametrize("name", ["vgg", "resnet_basic", "mobilenetv2", "concat", "mlp", "transformer"])
def test_zeroed_channels_stay_zero_and_finalize_removes_them_with_the_same_outputs(name):
    model, x = zoo.build(name)
    schedule = Linear(begin=1, end=5, every=2)
    pruner = tp.Pruner(model, 0.5, schedule, granularity="channel", example_inputs=x)
    assert isinstance(pruner, ChannelPruner) and isinstance(pruner, tp.Pruner)
    # momentum built up before pruning would move zeroed weights if step() did not re-zero them
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    previous = {k: set() for k in pruner.groups}
    model.train()
    for step in range(7):
        optimizer.zero_grad()
        model(*x).float().pow(2).mean().backward()
        optimizer.step()
        updated = pruner.step()
        assert updated == (schedule.is_update(step) and schedule.resolved(0.5).sparsity_at(step) > 0)
        target = schedule.resolved(0.5).sparsity_at(step)
        for group, channels in pruner.removed_channels().items():
            assert previous[group] <= set(channels)  # only grows
            previous[group] = set(channels)
            size = len(pruner.groups[group])  # layer scope: each group keeps floor((1 - s) * n), at least 1
            assert len(channels) == size - max(1, int((1 - target) * size + 1e-9)), (step, group)
        for where, values in member_slices(model, pruner):
            assert bool((values == 0).all()), where
    assert pruner.sparsity >= 0.5 - 1e-9
    model.eval()
    masked = copy.deepcopy(model)
    before = params(model)
    assert pruner.finalize() is model
    assert params(model) < before
    assert_same_function(model, masked, *x)
    with pytest.raises(RuntimeError, match="finalized"):
        pruner.step()


@pytest.mark.parametrize("importance", ["l2", "bn_scale", "taylor", "activation"])
def test_one_update_equals_one_shot_channel_pruning(importance):
    model, x = zoo.build("resnet_basic")
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    kwargs = {"taylor": dict(data=data, loss_fn=F.cross_entropy), "activation": dict(data=data)}.get(importance, {})
    pruner = tp.Pruner(model, 0.5, OneShot(at=0), importance=importance, granularity="channel", example_inputs=x,
                       **kwargs)
    pruner.step()
    pruner.finalize()
    tp.prune(reference, sparsity=0.5, granularity="channel", example_inputs=x, importance=importance, **kwargs)
    a, b = model.state_dict(), reference.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_later_updates_rank_as_on_the_physically_pruned_model(scope):
    """Two updates (25%, then 50%) without training between choose what pruning the smaller model
    again would: each member's scores are normalized over its channels still alive."""
    model, x = zoo.build("vgg")
    reference = copy.deepcopy(model)
    pruner = tp.Pruner(model, 0.5, Linear(begin=0, end=1, every=1, initial=0.25), granularity="channel",
                       scope=scope, example_inputs=x)
    pruner.step()
    pruner.step()
    pruner.finalize()
    total = sum(len(g) for g in pruner.groups.values())
    tp.prune(reference, sparsity=0.25, granularity="channel", scope=scope, example_inputs=x)
    if scope == "global":
        first, second = int(0.25 * total + 0.5), int(0.5 * total + 0.5)
        tp.prune(reference, sparsity=(second - first) / (total - first), granularity="channel", scope="global",
                 example_inputs=x)
    else:  # vgg's groups have 8, 16, 16 and 32 channels: 25% then 50% of each
        tp.prune(reference, sparsity=1 / 3, granularity="channel", example_inputs=x)
    a, b = model.state_dict(), reference.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_finalized_model_saves_and_loads(tmp_path):
    model, x = zoo.build("concat")
    pruner = tp.Pruner(model, 0.5, OneShot(at=0), granularity="channel", example_inputs=x)
    pruner.step()
    pruner.finalize()
    tp.save(model, tmp_path / "m.pt")
    fresh, _ = zoo.build("concat", seed=1)
    tp.load(tmp_path / "m.pt", fresh)
    assert params(fresh) == params(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(*x), model(*x))


def test_state_dict_is_plain_data_and_checks_the_groups():
    model, x = zoo.build("mlp")
    pruner = tp.Pruner(model, 0.5, OneShot(at=0), granularity="channel", example_inputs=x)
    pruner.step()
    state = pruner.state_dict()
    assert state["removed"] == list(pruner.removed_channels().values())
    other = tp.Pruner(zoo.build("mlp")[0], 0.5, OneShot(at=0), granularity="channel", example_inputs=x, freeze=["fc3"])
    with pytest.raises(ValueError, match="saved for channel groups"):
        other.load_state_dict(state)
    weight_pruner = tp.Pruner(zoo.build("mlp")[0], 0.5, OneShot(at=0))
    with pytest.raises(ValueError, match="granularity='channel'"):
        other.load_state_dict(weight_pruner.state_dict())
    bad = dict(state, removed=[list(range(32)), []])
    fresh = tp.Pruner(zoo.build("mlp")[0], 0.5, OneShot(at=0), granularity="channel", example_inputs=x)
    with pytest.raises(ValueError, match="at least one kept"):
        fresh.load_state_dict(bad)
    fresh.load_state_dict(state)  # zeroes the saved channels in the fresh model
    for where, values in member_slices(fresh.model, fresh):
        assert bool((values == 0).all()), where


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(), ValueError, "example_inputs"),
    (dict(example_inputs=True, scope={"fc1": 0.5}), ValueError, "'layer' or 'global'"),
    (dict(example_inputs=True, importance="wanda"), ValueError, "no structured form"),
    (dict(example_inputs=True, importance="taylor"), ValueError, "data-driven"),
    (dict(example_inputs=True, data=[(torch.zeros(1, 16), torch.zeros(1))]), ValueError, "does not use them"),
    (dict(example_inputs=True, exclude=["fc1", "fc2"]), ValueError, "no channel group"),
    (dict(example_inputs=True, target_sparsity=1.0), ValueError, "`target_sparsity` must be in"),
])
def test_bad_arguments_raise_before_anything_changes(kwargs, error, message):
    model, x = zoo.build("mlp")
    if kwargs.get("example_inputs") is True:
        kwargs = dict(kwargs, example_inputs=x)
    kwargs = {"target_sparsity": 0.5, **kwargs}
    before = snapshot(model)
    with pytest.raises(error, match=message):
        tp.Pruner(model, schedule=OneShot(at=0), granularity="channel", **kwargs)
    assert_unchanged(model, before)


def test_weight_masks_from_before_are_sliced_with_their_channels():
    model, x = zoo.build("vgg")
    tp.prune(model, sparsity=0.5)  # unstructured masks first
    pruner = tp.Pruner(model, 0.5, OneShot(at=0), granularity="channel", example_inputs=x)
    pruner.step()
    masked = copy.deepcopy(model)
    pruner.finalize()
    for name, mask in tp.masks(model).items():
        layer = model.get_submodule(name)
        assert mask.shape == layer.weight.shape and bool((layer.weight[~mask] == 0).all()), name
    assert model.features[0].out_channels == 4 and model.classifier[0].in_features == 8 * 16
    assert_same_function(model, masked, *x)
