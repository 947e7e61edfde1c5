"""The progressive Pruner: schedules followed, masks only growing, scores accumulated from training,
exact resume from a checkpoint, N:M, finalize() and argument checks."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp
from torchprune import selection
from torchprune.schedules import Constant, Cubic, Linear, OneShot

from conftest import TinyGPT, assert_unchanged, make_mlp, snapshot
from error_bounds import assert_same_function

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(n=12, seed=0, features=16, classes=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, features, generator=g), torch.randint(0, classes, (8,), generator=g)) for _ in range(n)]


def train(model, optimizer, pruner, data, start=0, stop=None):
    for x, y in data[start:stop]:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        pruner.step()


def layer_sparsities(model):
    return {name: float((~m).sum()) / m.numel() for name, m in tp.masks(model).items()}


def test_exported_in_both_places():
    assert tp.Pruner is tp.pruner.Pruner


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_sparsity_follows_the_schedule_and_masks_only_grow(scope):
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = Cubic(begin=2, end=10, every=2)
    pruner = tp.Pruner(model, 0.8, schedule, scope=scope)
    assert pruner.sparsity == 0.0 and len(tp.masks(model)) == 3  # all-true masks from the start
    previous = {k: v.clone() for k, v in tp.masks(model).items()}
    data = batches(14)
    for step, (x, y) in enumerate(data):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        changed = pruner.step()
        assert changed == (schedule.is_update(step) and schedule.resolved(0.8).sparsity_at(step) > 0)
        target = schedule.resolved(0.8).sparsity_at(step)
        assert pruner.sparsity == pytest.approx(target, abs=0.002)
        if scope == "layer":
            for name, value in layer_sparsities(model).items():
                assert value == pytest.approx(target, abs=1 / model.get_submodule(name).weight.numel())
        for name, mask in tp.masks(model).items():
            assert not (mask & ~previous[name]).any()  # nothing regrows
            previous[name] = mask.clone()
        for layer in model:  # pruned weights stay exactly zero through momentum
            if hasattr(layer, "weight_mask"):
                assert (layer.weight[~layer.weight_mask] == 0).all()
    assert pruner.sparsity == pytest.approx(0.8, abs=0.002) and pruner.steps == 14


@pytest.mark.parametrize("name", ["gradient", "taylor"])
def test_gradient_scores_accumulate_from_training_steps_since_the_last_update(name):
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = tp.Pruner(model, 0.5, OneShot(at=2), importance=name)
    expected = {k: torch.zeros_like(m.weight) for k, m in model.named_children() if isinstance(m, nn.Linear)}
    for x, y in batches(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        for k in expected:  # the pruner reads .grad (and the weight) after optimizer.step()
            layer = model.get_submodule(k)
            g = layer.weight.grad
            expected[k] += g.abs() if name == "gradient" else (layer.weight.detach() * g).abs()
        before = {k: v.clone() for k, v in tp.masks(model).items()}
        pruner.step()
    for k, scores in expected.items():
        want = selection.by_ratio(scores, before[k], 0.5)
        assert torch.equal(tp.masks(model)[k], want), k


def _run(importance, total, checkpoint=None, granularity="weight"):
    """A real loop: model, Adam and Pruner; optionally checkpointed after `checkpoint` steps and
    resumed in fresh objects. Returns the model and the Pruner."""
    torch.manual_seed(0)
    model = make_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    def make_pruner(m):
        if granularity == "channel":  # 50% of the 32 + 24 hidden neurons, scored on two batches for taylor
            extra = dict(data=batches(2, seed=9), loss_fn=F.cross_entropy) if importance == "taylor" else {}
            return tp.Pruner(m, 0.5, Cubic(begin=1, end=19, every=3), importance=importance, scope="global",
                             granularity="channel", example_inputs=torch.zeros(1, 16), **extra)
        return tp.Pruner(m, 0.9, Cubic(begin=1, end=19, every=3), importance=importance, scope="global")

    pruner = make_pruner(model)
    data = batches(total, seed=1)
    if checkpoint is None:
        train(model, optimizer, pruner, data)
        return model, pruner
    train(model, optimizer, pruner, data, 0, checkpoint)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "pruner": pruner.state_dict()},
               buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    del model, optimizer, pruner
    torch.manual_seed(123)  # a different fresh initialisation: everything must come from the checkpoint
    fresh = make_mlp(seed=5)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.01)
    fresh_pruner = make_pruner(fresh)
    fresh.load_state_dict(state["model"])
    fresh_optimizer.load_state_dict(state["optimizer"])
    fresh_pruner.load_state_dict(state["pruner"])
    assert fresh_pruner.steps == checkpoint
    train(fresh, fresh_optimizer, fresh_pruner, data, checkpoint)
    return fresh, fresh_pruner


def _assert_same_state(straight, resumed):
    a, b = straight.state_dict(), resumed.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("importance", ["taylor", "magnitude", "apoz"])
@pytest.mark.parametrize("checkpoint", [6, 8])  # between updates (scores half accumulated), right after one
def test_resume_mid_schedule_is_bit_identical(importance, checkpoint):
    straight, _ = _run(importance, 24)
    resumed, _ = _run(importance, 24, checkpoint)
    _assert_same_state(straight, resumed)
    assert tp.sparsity(resumed) == pytest.approx(0.9, abs=0.002)


@pytest.mark.parametrize("importance", ["l2", "taylor", "random"])
@pytest.mark.parametrize("checkpoint", [6, 8])
def test_channel_resume_mid_schedule_is_bit_identical(importance, checkpoint):
    straight, straight_pruner = _run(importance, 24, granularity="channel")
    resumed, resumed_pruner = _run(importance, 24, checkpoint, granularity="channel")
    assert resumed_pruner.removed_channels() == straight_pruner.removed_channels()
    assert resumed_pruner.sparsity == pytest.approx(28 / 56)
    _assert_same_state(straight, resumed)
    straight_pruner.finalize()
    resumed_pruner.finalize()
    _assert_same_state(straight, resumed)
    assert sum(m.out_features for m in resumed if isinstance(m, nn.Linear)) == 28 + 4  # 28 hidden neurons kept


def test_load_state_dict_refuses_other_layers():
    pruner = tp.Pruner(make_mlp(), 0.5, OneShot(at=0))
    other = tp.Pruner(make_mlp(), 0.5, OneShot(at=0), exclude=["4"])
    with pytest.raises(ValueError, match="saved for layers"):
        other.load_state_dict(pruner.state_dict())
    with pytest.raises(ValueError, match="Pruner.state_dict"):
        pruner.load_state_dict({"step": 3})


def test_n_m_grows_group_by_group():
    model = make_mlp()
    pruner = tp.Pruner(model, 0.5, Linear(begin=0, end=2, every=1), granularity="2:4", exclude=["4"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    pruned_per_group = []
    for x, y in batches(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        pruner.step()
        groups = (~tp.masks(model)["0"]).view(-1, 4).sum(1)
        pruned_per_group.append(groups.unique().tolist())
    # sparsity 0, 0.25, 0.5 -> round(s * 4) pruned in every group of 4
    assert pruned_per_group == [[0], [1], [2]]
    with pytest.raises(ValueError, match="must be 0.5 for 2:4"):
        tp.Pruner(make_mlp(), 0.75, Linear(0, 2, 1), granularity="2:4", exclude=["4"])


def test_activation_statistics_come_from_training_forwards_only():
    model = make_mlp()
    pruner = tp.Pruner(model, 0.25, OneShot(at=0), importance="activation")
    x, y = batches(1)[0]
    model.eval()
    model(torch.randn(50, 16) * 100)  # an evaluation pass: not counted
    model.train()
    reference = tp.importance.Activation("mean")
    reference.observe_forward(model[0], (x,), model[0](x))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    before = tp.masks(model)["0"].clone()
    pruner.step()
    want = selection.by_ratio(reference(model[0]), before, 0.25)
    assert torch.equal(tp.masks(model)["0"], want)
    rows = (~tp.masks(model)["0"]).all(1).sum()
    assert rows == 8  # 25% of 32 neurons, whole rows


def test_wanda_with_data_prunes_each_row_alike():
    model = make_mlp()
    data = [x for x, _ in batches(2)]
    pruner = tp.Pruner(model, 0.5, OneShot(at=0), importance="wanda", data=data)
    pruner.step()
    for name, mask in tp.masks(model).items():
        assert ((~mask).sum(1) == mask.shape[1] // 2).all(), name


def test_dict_scope_from_allocate_reaches_each_layer_target():
    model = make_mlp()
    plan = {"0": 0.7, "2": 0.5, "4": 0.1}
    pruner = tp.Pruner(model, None, Linear(begin=0, end=4, every=2), scope=plan)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, optimizer, pruner, batches(5))
    for name, value in layer_sparsities(model).items():
        assert value == pytest.approx(plan[name], abs=1 / model.get_submodule(name).weight.numel())


def test_finalize_makes_masks_permanent():
    model = make_mlp()
    pruner = tp.Pruner(model, 0.6, OneShot(at=0), importance="apoz")
    x, y = batches(1)[0]
    model(x)
    pruner.step()
    before = copy.deepcopy(model)
    assert pruner.finalize() is model
    assert tp.masks(model) == {} and all(type(m) in (nn.Linear, nn.ReLU) for m in model)
    assert_same_function(model, before, x)
    assert tp.sparsity(model) == pytest.approx(0.6, abs=0.005) and pruner.sparsity == pytest.approx(0.6, abs=0.005)
    assert all(len(m._forward_hooks) == 0 for m in model)
    with pytest.raises(RuntimeError, match="finalized"):
        pruner.step()


def test_leaves_other_pruned_layers_alone_at_finalize():
    model = make_mlp()
    tp.prune(model, scope={"4": 0.5})
    pruner = tp.Pruner(model, 0.3, OneShot(at=0), exclude=["4"])
    pruner.step()
    pruner.finalize()
    assert list(tp.masks(model)) == ["4"]


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(target_sparsity=0.5, schedule=Cubic(0, 10, 1), granularity="head"), ValueError, "attention heads"),
    (dict(target_sparsity=0.5, schedule=Cubic(0, 10, 1), granularity="channel"), ValueError, "example_inputs"),
    (dict(target_sparsity=1.0, schedule=Cubic(0, 10, 1)), ValueError, r"`target_sparsity` must be in \[0, 1\)"),
    (dict(target_sparsity=0.5, schedule=Cubic(0, 10, 1, final=0.7)), ValueError, "make them agree"),
    (dict(target_sparsity=None, schedule=Cubic(0, 10, 1)), ValueError, "pass `target_sparsity`"),
    (dict(target_sparsity=0.5, schedule="cubic"), TypeError, "`schedule` must be"),
    (dict(target_sparsity=0.5, schedule=Cubic(0, 10, 1), scope="net"), ValueError, "`scope` must be one of"),
    (dict(target_sparsity=0.5, schedule=Cubic(0, 10, 1), scope={"fc1": 0.5}), ValueError,
     "target_sparsity=None"),
    (dict(target_sparsity=None, schedule=Cubic(0, 10, 1, final=0.5), scope={"fc1": 0.5}), ValueError,
     "without `final`"),
    (dict(target_sparsity=None, schedule=Cubic(0, 10, 1), scope={"fc1": 1.5}), ValueError,
     r"`scope\['fc1'\]` must be in"),
    (dict(target_sparsity=0.5, schedule=Cubic(0, 10, 1), importance="bn_scale"), ValueError, "no affine BatchNorm"),
    (dict(target_sparsity=0.5, schedule=Cubic(0, 10, 1), data=[torch.zeros(1)]), ValueError, "do"),
    (dict(target_sparsity=0.5, schedule=Cubic(0, 10, 1), importance="taylor", data=[torch.zeros(1)]), ValueError,
     "loss_fn"),
    (dict(target_sparsity=0.5, schedule=Cubic(0, 10, 1), exclude=["nope"]), ValueError, "names no module"),
    (dict(target_sparsity=0.5, schedule=Cubic(0, 10, 1), granularity="2:4", scope="global"), ValueError,
     "'layer' for N:M"),
])
def test_bad_arguments_raise_before_anything_changes(small_net, kwargs, error, message):
    before = snapshot(small_net)
    with pytest.raises(error, match=message):
        tp.Pruner(small_net, **kwargs)
    assert_unchanged(small_net, before)


def test_constant_schedule_refreshes_the_ranking_without_regrowth():
    model = make_mlp()
    pruner = tp.Pruner(model, 0.5, Constant(begin=0, end=6, every=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train(model, optimizer, pruner, batches(7))
    assert pruner.sparsity == pytest.approx(0.5, abs=0.01)


def test_bn_scale_in_the_pruner_removes_whole_filters(small_net):
    with torch.no_grad():
        small_net.bn.weight.copy_(torch.tensor([0.1, -2.0, 0.3, 0.0, 5.0, -0.2, 1.0, 0.05]))
    pruner = tp.Pruner(small_net, 0.25, OneShot(at=0), importance="bn_scale", exclude=["conv1d", "fc1", "fc2"])
    pruner.step()
    gone = (~small_net.conv.weight_mask).flatten(1).all(1)
    assert gone.tolist() == [False, False, False, True, False, False, False, True]


def test_taylor_with_data_scores_on_the_data_at_each_update():
    model = make_mlp()
    data = batches(2, seed=7)
    pruner = tp.Pruner(model, 0.5, OneShot(at=0), importance="taylor", data=data, loss_fn=F.cross_entropy)
    reference = make_mlp()
    tp.prune(reference, sparsity=0.5, importance="taylor", data=data, loss_fn=F.cross_entropy)
    pruner.step()  # no training step needed: the data gives the gradients
    for name, mask in tp.masks(reference).items():
        assert torch.equal(tp.masks(model)[name], mask), name


def test_an_update_on_diverged_weights_names_the_layer_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    pruner = tp.Pruner(model, 0.5, tp.schedules.Linear(begin=0, end=4, every=2))
    pruner.step()  # first update at step 0
    before = model[2].weight_mask.clone()
    with torch.no_grad():
        model[2].weight[0, model[2].weight_mask[0].nonzero()[0, 0]] = float("nan")
    pruner.step()  # step 1: no update
    with pytest.raises(ValueError, match=r"layer '2' \(Linear\) has non-finite weights: 1 NaN"):
        pruner.step()  # step 2: an update
    assert torch.equal(model[2].weight_mask, before)


@pytest.mark.parametrize("target,granularity", [(0.5, "weight"), (None, "2:4")])
def test_tied_output_layer_is_left_out_with_a_warning(target, granularity):
    model = TinyGPT()
    embedding = model.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"layer 'lm_head' left unpruned: Embedding 'wte' shares its weight") as record:
        pruner = tp.Pruner(model, target, OneShot(at=0), granularity=granularity)
    assert len(record) == 1 and record[0].filename == __file__
    assert pruner.step()
    assert set(tp.masks(model)) == {"mlp"} and pruner.sparsity == 0.5
    assert torch.equal(model.wte.weight, embedding) and model.lm_head.weight is model.wte.weight
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Embedding 'wte' shares its weight with layer 'lm_head'.*leave 'lm_head'"):
        tp.Pruner(model, None, OneShot(at=0), scope={"lm_head": 0.5})
    assert_unchanged(model, before)
