"""Stopping and resuming progressive runs, and copying them.

A run stopped between two mask updates and resumed in fresh objects (model, optimizer, Pruner, each
loaded from its state dict) ends bit-identical to an uninterrupted run, for every criterion kind,
granularity and scope; a Pruner state refuses a model of another shape by layer; copy.deepcopy and
pickle of a pruned model, and of the whole run, during and after it keep outputs, masks and zeros.
(test_progressive.py covers the basic Adam + global-scope resume for taylor, magnitude and apoz.)
"""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp
from torchprune.schedules import Cubic

from conftest import checkpoint, labelled_batches, make_mlp, train_with_pruner

pytestmark = pytest.mark.usefixtures("one_thread")


SCHEDULE = Cubic(begin=1, end=16, every=3)  # updates at 1, 4, 7, 10, 13, 16
CASES = {  # Pruner keyword arguments besides the schedule
    "gradient": dict(target_sparsity=0.8, importance="gradient"),
    "activation": dict(target_sparsity=0.5, importance="activation"),
    "wanda": dict(target_sparsity=0.6, importance="wanda"),
    "random": dict(target_sparsity=0.7, importance="random", scope="global"),
    "taylor-data": dict(target_sparsity=0.7, importance="taylor", data=labelled_batches(2, seed=7),
                        loss_fn=F.cross_entropy),
    "2:4-taylor": dict(importance="taylor", granularity="2:4", exclude=["4"]),
    "dict-apoz": dict(target_sparsity=None, importance="apoz", scope={"0": 0.8, "2": 0.5, "4": 0.2}),
    "channel-activation": dict(target_sparsity=0.5, importance="activation", granularity="channel", scope="global",
                               example_inputs=torch.zeros(1, 16), data=labelled_batches(2, seed=7)),
}


def make_run(case, seed=0):
    model = make_mlp(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    return model, optimizer, tp.Pruner(model, schedule=SCHEDULE, **CASES[case])


def assert_same_tensors(a, b):
    """Bit-identical tensors under the same keys (nested dicts, as forward statistics are kept)."""
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key])
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_twice_between_updates_in_fresh_objects_is_bit_identical(case):
    data = labelled_batches(18)
    straight, straight_optimizer, straight_pruner = make_run(case)
    train_with_pruner(straight, straight_optimizer, straight_pruner, data)

    model, optimizer, pruner = make_run(case)
    stops = (6, 12)  # after steps 0-5 and 0-11: between the updates at 4 and 7, and at 10 and 13
    train_with_pruner(model, optimizer, pruner, data[:stops[0]])
    for start, stop in zip(stops, stops[1:] + (len(data),)):
        state = checkpoint(model, optimizer, pruner)
        model, optimizer, pruner = make_run(case, seed=start)  # other initial weights: all must come from `state`
        pruner.load_state_dict(state["pruner"])  # the Pruner first, the model after: the order does not matter
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        assert pruner.steps == start
        train_with_pruner(model, optimizer, pruner, data[start:stop])

    assert_same_tensors(straight.state_dict(), model.state_dict())
    assert_same_tensors(straight_pruner.state_dict().get("importance", {}), pruner.state_dict().get("importance", {}))
    assert pruner.sparsity == straight_pruner.sparsity > 0
    straight_pruner.finalize()
    pruner.finalize()
    assert_same_tensors(straight.state_dict(), model.state_dict())


def test_accumulated_statistics_are_part_of_the_state():
    """Resuming without the Pruner's statistics would rank differently: the state carries them."""
    data = labelled_batches(8)
    model, optimizer, pruner = make_run("gradient")
    train_with_pruner(model, optimizer, pruner, data[:6])
    state = checkpoint(model, optimizer, pruner)
    assert set(state["pruner"]["importance"]) == {"0", "2", "4"}  # summed at step 5, after the update at step 4
    fresh, fresh_optimizer, fresh_pruner = make_run("gradient")
    fresh.load_state_dict(state["model"])
    fresh_optimizer.load_state_dict(state["optimizer"])
    state["pruner"]["importance"] = {}  # as if the statistics had not been saved
    fresh_pruner.load_state_dict(state["pruner"])
    train_with_pruner(model, optimizer, pruner, data[6:])
    train_with_pruner(fresh, fresh_optimizer, fresh_pruner, data[6:])  # the update at step 7 ranks on step 6 alone
    assert any(not torch.equal(a, b) for a, b in zip(tp.masks(model).values(), tp.masks(fresh).values()))


class WiderMLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 40), nn.ReLU(), nn.Linear(40, 4))


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_state_of_another_model_shape_is_refused_naming_the_layer(importance):
    model, optimizer, pruner = make_run("gradient")
    train_with_pruner(model, optimizer, pruner, labelled_batches(5))
    state = pruner.state_dict()
    other = tp.Pruner(WiderMLP(), 0.8, SCHEDULE, importance=importance)
    before = other.state_dict()
    message = r"layer '2' with weight shape \[24, 32\], but this model's '2' has shape \[40, 32\]"
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(state)
    assert other.steps == 0 and other.state_dict() == before  # nothing changed


def test_channel_state_of_another_model_shape_is_refused_naming_the_group():
    model, optimizer, pruner = make_run("channel-activation")
    train_with_pruner(model, optimizer, pruner, labelled_batches(5))
    other = tp.Pruner(WiderMLP(), 0.5, SCHEDULE, importance="activation", granularity="channel", scope="global",
                      example_inputs=torch.zeros(1, 16), data=labelled_batches(2, seed=7))
    with pytest.raises(ValueError, match=r"\['2.weight\[0\]'\] differ"):
        other.load_state_dict(pruner.state_dict())
    assert other.steps == 0 and other.sparsity == 0


def test_a_state_saved_before_shapes_were_recorded_still_loads():
    model, optimizer, pruner = make_run("gradient")
    train_with_pruner(model, optimizer, pruner, labelled_batches(5))
    state = pruner.state_dict()
    state["version"] = 1
    del state["shapes"]
    fresh = make_run("gradient")[2]
    fresh.load_state_dict(state)
    assert fresh.steps == 5
    assert_same_tensors(fresh.state_dict()["importance"], state["importance"])


def pickled(obj):
    return pickle.loads(pickle.dumps(obj))


COPIES = {"deepcopy": copy.deepcopy, "pickle": pickled}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("case", ["activation", "gradient", "2:4-taylor", "channel-activation"])
def test_copied_model_mid_run_computes_the_same_and_keeps_its_zeros_when_trained(how, case):
    model, optimizer, pruner = make_run(case)
    train_with_pruner(model, optimizer, pruner, labelled_batches(6))
    clone = COPIES[how](model)
    x = torch.randn(6, 16)
    assert torch.equal(clone(x), model(x))
    assert_same_tensors(tp.masks(clone), tp.masks(model))
    assert [type(m) for m in clone] == [type(m) for m in model]
    zero = {name: p == 0 for name, p in model.named_parameters()}  # exactly the pruned entries
    assert sum(int(z.sum()) for z in zero.values()) > 0
    statistics = pruner.state_dict().get("importance", {})
    clone.train()
    clone_optimizer = torch.optim.Adam(clone.parameters(), lr=0.1)  # Adam moves every weight it may
    for inputs, targets in labelled_batches(3, seed=4):
        clone_optimizer.zero_grad()
        F.cross_entropy(clone(inputs), targets).backward()
        clone_optimizer.step()
    # masked weights by their masks; zeroed channels (no masks) because a channel zeroed in every
    # member of its group gets exactly zero gradient
    for name, p in clone.named_parameters():
        assert (p[zero[name]] == 0).all(), name
        assert not torch.equal(p, model.get_parameter(name)), name  # the copy did train
    # the original Pruner did not observe the copy's forward passes
    assert_same_tensors(pruner.state_dict().get("importance", {}), statistics)


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("case", ["activation", "taylor-data", "random", "dict-apoz", "channel-activation"])
def test_copied_run_mid_schedule_ends_like_the_uninterrupted_run(how, case):
    """Copying model, optimizer and Pruner together between two updates, then training both the
    original and the copy: all three end bit-identical (the copy's statistics are its own)."""
    data = labelled_batches(18)
    straight, straight_optimizer, straight_pruner = make_run(case)
    train_with_pruner(straight, straight_optimizer, straight_pruner, data)

    model, optimizer, pruner = make_run(case)
    train_with_pruner(model, optimizer, pruner, data[:6])
    clone, clone_optimizer, clone_pruner = COPIES[how]((model, optimizer, pruner))
    assert clone_pruner.model is clone and clone_pruner.steps == 6
    train_with_pruner(clone, clone_optimizer, clone_pruner, data[6:])
    train_with_pruner(model, optimizer, pruner, data[6:])
    assert_same_tensors(straight.state_dict(), clone.state_dict())
    assert_same_tensors(straight.state_dict(), model.state_dict())
    clone_pruner.finalize()
    straight_pruner.finalize()
    assert_same_tensors(straight.state_dict(), clone.state_dict())


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("case", ["wanda", "channel-activation"])
def test_copied_model_after_finalize_is_a_plain_model_with_the_same_outputs(how, case):
    model, optimizer, pruner = make_run(case)
    train_with_pruner(model, optimizer, pruner, labelled_batches(18))
    pruner.finalize()
    clone = COPIES[how](model)
    x = torch.randn(6, 16)
    assert torch.equal(clone(x), model(x))
    assert tp.masks(clone) == {} and [type(m) for m in clone] == [type(m) for m in model]
    assert_same_tensors(clone.state_dict(), model.state_dict())
    assert tp.sparsity(clone) == tp.sparsity(model)
