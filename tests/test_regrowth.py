"""Dynamic sparsity with regrowth (RigL): ``tp.Pruner(..., regrow=...)``, `tp.Regrow`, the dense
weight gradients (`DenseGradients`, `weight_gradient`) and `selection.regrown`.

What is checked:

* `weight_gradient` is autograd's weight gradient of the plain layer (Linear, Conv1d, Conv2d with every
  padding form and mode, strides, dilations, groups, unbatched inputs), within the rounding bound of
  the sum of |grad_out| * |x| products;
* `DenseGradients` records the gradient of the *effective* weight of a masked layer (nonzero where the
  mask prunes), sums the forward calls of a step, ignores eval / no_grad passes, stops on disarm and
  is not fed by a deep copy of the armed model;
* `selection.regrown` against a brute-force reference (counts, drops, growth, ties, caps);
* the Pruner end to end: sparsity exactly the plain Pruner's at every step, swaps sized by
  `Regrow.fraction_at`, only at regrowth steps, regrown weights and their optimizer moments at zero,
  drops by criterion score and growth by dense gradient magnitude; ``regrow=None`` unchanged;
  resume and deepcopy bit-exact; the argument and step-time errors, with nothing changed.
"""

import copy
import math
import pickle
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp
from torchprune import selection
from torchprune.regrowth import DenseGradients, Regrow, weight_gradient
from torchprune.schedules import Cubic, OneShot

from conftest import assert_unchanged, checkpoint, labelled_batches, make_mlp64, snapshot, train_with_pruner
from error_bounds import assert_close_bounded

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = torch.finfo(torch.float64).eps


# ----------------------------------------------------------------------------------------------------
# helpers


DATA = labelled_batches(30, dtype=torch.float64)
SCHEDULE = Cubic(begin=1, end=13, every=3)  # pruning updates at 1 (initial 0), 4, 7, 10, 13
REGROW = Regrow(0.5, every=2, end=25)  # begin from the schedule (1): regrowth at 1, 3, 5, ..., 25
TARGET = 0.8


def masks_of(model):
    return {name: mask.clone() for name, mask in tp.masks(model).items()}


def layers_of(model):
    return {name: module for name, module in model.named_modules() if name in tp.masks(model)}


def plain_twin(model):
    """A copy of ``model`` with plain layers whose weights are the effective weights (weight * mask)."""
    twin = copy.deepcopy(model)
    tp.make_permanent(twin)
    for p in twin.parameters():
        p.grad = None
    return twin


def dense_gradients(model, x, y):
    """The gradients of the loss w.r.t. every masked layer's effective weight (autograd on a plain twin)."""
    twin = plain_twin(model)
    twin.train(model.training)
    F.cross_entropy(twin(x), y).backward()
    modules = dict(twin.named_modules())
    return {name: modules[name].weight.grad.clone() for name in tp.masks(model)}


def make_optimizer(model, kind):
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01)
    if kind == "adam-amsgrad":
        return torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def make_run(regrow=REGROW, seed=0, optimizer="adam", **kwargs):
    model = make_mlp64(seed)
    opt = make_optimizer(model, optimizer)
    kwargs.setdefault("target_sparsity", TARGET)
    kwargs.setdefault("schedule", SCHEDULE)
    pruner = tp.Pruner(model, regrow=regrow, **kwargs)
    return model, opt, pruner





def pruned_counts(model):
    return {name: int((~mask).sum()) for name, mask in tp.masks(model).items()}


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def resolved(regrow, schedule=SCHEDULE):
    return regrow.resolved(schedule)


# ----------------------------------------------------------------------------------------------------
# 1. weight_gradient is autograd's weight gradient


def magnitude_and_terms(layer, x, g):
    """The summed |g| * |x| products of each weight-gradient entry (autograd on |x|, |g|: padding only
    copies or zeroes inputs, so it commutes with abs), and how many products each entry sums."""
    twin = copy.deepcopy(layer)
    twin.weight.grad = None
    twin(x.abs()).backward(g.abs())
    if isinstance(layer, nn.Linear):
        terms = g.numel() // g.shape[-1]
    else:
        spatial = layer.weight.dim() - 2
        terms = g.numel() // g.shape[-spatial - 1]  # batch (if any) times output positions
    return twin.weight.grad.detach().clone(), terms


def check_weight_gradient(layer, x, msg=""):
    y = layer(x)
    g = torch.randn_like(y)
    layer.weight.grad = None
    y.backward(g)
    expected = layer.weight.grad.detach().clone()
    got = weight_gradient(layer, x, g)
    magnitude, terms = magnitude_and_terms(layer, x, g)
    assert_close_bounded(got, expected, magnitude, terms, torch.float64, msg=msg)


LINEAR_CASES = {
    "2d": ((5, 7), (11, 7)),
    "3d": ((4, 6), (3, 5, 6)),
    "4d": ((3, 2), (2, 3, 4, 2)),
    "1d-input": ((3, 9), (9,)),
    "1x1": ((1, 1), (6, 1)),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_weight_gradient_of_linear_is_autograds(case):
    (out_features, in_features), shape = LINEAR_CASES[case]
    torch.manual_seed(3)
    layer = nn.Linear(in_features, out_features).double()
    check_weight_gradient(layer, torch.randn(*shape, dtype=torch.float64), case)


CONV_CASES = {  # (dims, in, out, kernel, kwargs, input spatial, batched)
    "conv2d-plain": (2, 3, 4, 3, {}, (7, 8), True),
    "conv2d-stride-pad": (2, 3, 4, (3, 2), dict(stride=(2, 1), padding=(1, 2)), (9, 7), True),
    "conv2d-same": (2, 2, 3, (4, 3), dict(padding="same"), (7, 6), True),
    "conv2d-same-dilated": (2, 2, 3, (2, 3), dict(padding="same", dilation=(3, 2)), (9, 8), True),
    "conv2d-valid": (2, 2, 3, 3, dict(padding="valid", stride=2), (8, 9), True),
    "conv2d-dilation": (2, 3, 2, 3, dict(dilation=2, padding=1), (9, 9), True),
    "conv2d-groups": (2, 4, 6, 3, dict(groups=2, padding=1), (6, 6), True),
    "conv2d-depthwise": (2, 4, 4, 3, dict(groups=4, stride=2), (7, 7), True),
    "conv2d-reflect": (2, 3, 4, 3, dict(padding=2, padding_mode="reflect"), (6, 7), True),
    "conv2d-circular": (2, 3, 4, 3, dict(padding=(1, 2), padding_mode="circular", stride=2), (6, 7), True),
    "conv2d-replicate": (2, 3, 4, 3, dict(padding=1, padding_mode="replicate", dilation=2), (7, 7), True),
    "conv2d-reflect-same": (2, 2, 2, 4, dict(padding="same", padding_mode="reflect"), (6, 6), True),
    "conv2d-unbatched": (2, 3, 4, 3, dict(padding=1, stride=2), (6, 5), False),
    "conv2d-unbatched-circular": (2, 2, 4, 3, dict(padding=1, padding_mode="circular", groups=2), (5, 5), False),
    "conv1d-plain": (1, 3, 5, 3, {}, (11,), True),
    "conv1d-stride-pad": (1, 3, 5, 4, dict(stride=3, padding=2), (13,), True),
    "conv1d-same": (1, 2, 3, 4, dict(padding="same", dilation=3), (12,), True),
    "conv1d-valid": (1, 2, 3, 5, dict(padding="valid"), (9,), True),
    "conv1d-groups": (1, 6, 3, 3, dict(groups=3, padding=1), (8,), True),
    "conv1d-reflect": (1, 3, 2, 3, dict(padding=2, padding_mode="reflect"), (7,), True),
    "conv1d-circular": (1, 3, 2, 3, dict(padding=3, padding_mode="circular", stride=2), (7,), True),
    "conv1d-replicate": (1, 3, 2, 3, dict(padding=1, padding_mode="replicate"), (7,), True),
    "conv1d-unbatched": (1, 3, 4, 3, dict(padding="same", padding_mode="replicate"), (9,), False),
}


SAME_EVEN = "ignore:Using padding='same' with even kernel lengths:UserWarning"


@pytest.mark.filterwarnings(SAME_EVEN)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_weight_gradient_of_conv_is_autograds(case):
    dims, cin, cout, kernel, kwargs, spatial, batched = CONV_CASES[case]
    torch.manual_seed(4)
    layer = (nn.Conv1d if dims == 1 else nn.Conv2d)(cin, cout, kernel, **kwargs).double()
    shape = ((2,) if batched else ()) + (cin,) + spatial
    check_weight_gradient(layer, torch.randn(*shape, dtype=torch.float64), case)


@pytest.mark.filterwarnings(SAME_EVEN)
def test_weight_gradient_over_random_layer_shapes():
    rng = random.Random(0)
    torch.manual_seed(0)
    checked = 0
    while checked < 120:
        kind = rng.choice(["linear", "conv1d", "conv2d"])
        if kind == "linear":
            layer = nn.Linear(rng.randint(1, 9), rng.randint(1, 9), bias=rng.random() < 0.5).double()
            lead = tuple(rng.randint(1, 4) for _ in range(rng.randint(0, 3)))
            x = torch.randn(*lead, layer.in_features, dtype=torch.float64)
        else:
            dims = 1 if kind == "conv1d" else 2
            groups = rng.choice([1, 1, 2, 3])
            cin, cout = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
            kernel = tuple(rng.randint(1, 4) for _ in range(dims))
            dilation = tuple(rng.randint(1, 3) for _ in range(dims))
            mode = rng.choice(["zeros", "zeros", "reflect", "circular", "replicate"])
            padding = rng.choice([0, 1, 2, "same", "valid", tuple(rng.randint(0, 2) for _ in range(dims))])
            stride = (1,) * dims if padding == "same" else tuple(rng.randint(1, 3) for _ in range(dims))
            if padding == "valid":
                mode = "zeros"  # torch refuses nothing here, but padding 'valid' pads nothing anyway
            layer = (nn.Conv1d if dims == 1 else nn.Conv2d)(cin, cout, kernel, stride=stride, padding=padding,
                                                              dilation=dilation, groups=groups, padding_mode=mode,
                                                              bias=rng.random() < 0.5).double()
            spatial = tuple(rng.randint(6, 11) for _ in range(dims))
            batch = () if rng.random() < 0.3 else (rng.randint(1, 3),)
            x = torch.randn(*batch, cin, *spatial, dtype=torch.float64)
            try:
                layer(x)
            except RuntimeError:  # a padding larger than the input for reflect, a kernel larger than the input
                continue
        check_weight_gradient(layer, x, repr(layer))
        checked += 1


# ----------------------------------------------------------------------------------------------------
# 2. DenseGradients on masked layers


def masked_single(kind, seed=0):
    """A one-layer Sequential, pruned by tp.prune to 50%, and an input for it."""
    torch.manual_seed(seed)
    if kind == "linear":
        layer, x = nn.Linear(12, 7), torch.randn(3, 5, 12)
    elif kind == "conv1d":
        layer, x = nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular", groups=2), torch.randn(2, 4, 9)
    else:
        layer, x = nn.Conv2d(3, 5, 3, stride=2, padding="valid", dilation=2), torch.randn(2, 3, 11, 10)
    model = nn.Sequential(layer).double()
    tp.prune(model, sparsity=0.5)
    mask = model[0].weight_mask
    assert 0 < int(mask.sum()) < mask.numel()
    return model, x.double()


def plain_reference(model, inputs_and_grads):
    """The weight gradient of a plain copy of layer 0 with weight = weight * mask, summed over
    (x, grad_out) pairs, and the summed |grad_out| * |x| magnitude and terms."""
    twin = plain_twin(model)[0]
    expected = magnitude = None
    terms = 0
    for x, g in inputs_and_grads:
        twin.weight.grad = None
        twin(x).backward(g)
        grad = twin.weight.grad.detach().clone()
        mag, k = magnitude_and_terms(twin, x, g)
        expected = grad if expected is None else expected + grad
        magnitude = mag if magnitude is None else magnitude + mag
        terms += k
    return expected, magnitude, terms


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_dense_gradients_of_a_masked_layer_are_the_effective_weights_gradient(kind):
    model, x = masked_single(kind)
    layer, mask = model[0], model[0].weight_mask
    dense = DenseGradients({"0": layer})
    dense.arm()
    assert dense.armed
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    sums = dense.take()
    assert list(sums) == ["0"] and dense.take() == {}  # take() clears
    expected, magnitude, terms = plain_reference(model, [(x, g)])
    assert_close_bounded(sums["0"], expected, magnitude, terms, torch.float64, msg=kind)
    # dense: the gradient where the mask prunes is there too, while the masked op's own gradient is zero
    assert (sums["0"][~mask] != 0).any()
    assert (layer.weight.grad[~mask] == 0).all()
    dense.disarm()
    assert not dense.armed


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dense_gradients_sum_the_forward_calls_of_a_step(kind):
    model, x1 = masked_single(kind, seed=1)
    x2 = torch.randn_like(x1)
    layer = model[0]
    dense = DenseGradients({"0": layer})
    dense.arm()
    pairs = []
    for x in (x1, x2):  # gradient accumulation: two forward and backward passes in one step
        y = layer(x)
        g = torch.randn_like(y)
        y.backward(g)
        pairs.append((x, g))
    expected, magnitude, terms = plain_reference(model, pairs)
    assert_close_bounded(dense.take()["0"], expected, magnitude, terms, torch.float64, msg=kind)
    # two calls in one forward, one backward: the same sum
    dense.arm()
    g1, g2 = (torch.randn_like(layer(x)) for x in (x1, x2))
    ((layer(x1) * g1).sum() + (layer(x2) * g2).sum()).backward()
    expected, magnitude, terms = plain_reference(model, [(x1, g1), (x2, g2)])
    assert_close_bounded(dense.take()["0"], expected, magnitude, terms, torch.float64, msg=kind)


def test_dense_gradients_record_nothing_in_eval_mode_under_no_grad_or_disarmed():
    model, x = masked_single("linear")
    layer = model[0]
    dense = DenseGradients({"0": layer})
    layer(x).sum().backward()  # not armed yet
    assert dense.take() == {}
    dense.arm()
    dense.arm()  # arming twice registers the hooks once
    layer.eval()
    layer(x).sum().backward()
    assert dense.take() == {}
    layer.train()
    with torch.no_grad():
        layer(x)
    x_grad = x.clone().requires_grad_()
    with torch.no_grad():
        layer(x_grad)
    assert dense.take() == {}
    layer(x).sum().backward()
    once = dense.take()["0"]
    layer(x).sum().backward()
    assert torch.equal(dense.take()["0"], once)  # one hook, not two
    dense.disarm()
    layer(x).sum().backward()
    assert dense.take() == {}
    assert len(layer._forward_hooks) == 0


def test_a_deep_copy_of_an_armed_model_records_nothing_into_the_original():
    model, x = masked_single("conv2d")
    dense = DenseGradients({"0": model[0]})
    dense.arm()
    clone = copy.deepcopy(model)
    clone(x).sum().backward()
    assert dense.take() == {}
    clone2 = pickle.loads(pickle.dumps(model))
    clone2(x).sum().backward()
    assert dense.take() == {}
    model(x).sum().backward()  # the original still records
    assert list(dense.take()) == ["0"]


# ----------------------------------------------------------------------------------------------------
# 3. selection.regrown


def regrown_reference(drop, grow, before, after, count):
    n = drop.numel()
    drop, grow = drop.reshape(-1).tolist(), grow.reshape(-1).tolist()
    before, after = before.reshape(-1).tolist(), after.reshape(-1).tolist()
    kept = [i for i in range(n) if after[i]]
    candidates = [i for i in range(n) if not before[i]]
    count = max(0, min(count, len(kept) - 1, len(candidates)))
    out = list(after)
    for i in sorted(kept, key=lambda i: (drop[i], i))[:count]:
        out[i] = False
    for i in sorted(candidates, key=lambda i: (-grow[i], i))[:count]:
        out[i] = True
    return torch.tensor(out, dtype=torch.bool), count


def random_masks(gen, shape):
    before = torch.rand(shape, generator=gen) < torch.rand((), generator=gen)
    after = before & (torch.rand(shape, generator=gen) < torch.rand((), generator=gen) * 0.5 + 0.5)
    return before, after


def test_regrown_matches_a_brute_force_reference():
    gen = torch.Generator().manual_seed(0)
    for case in range(400):
        shape = tuple(int(s) for s in torch.randint(1, 7, (int(torch.randint(1, 4, (), generator=gen)),),
                                                    generator=gen))
        before, after = random_masks(gen, shape)
        if case % 2:  # few distinct values: many ties
            drop = torch.randint(0, 3, shape, generator=gen).double()
            grow = torch.randint(0, 3, shape, generator=gen).double()
        else:
            drop, grow = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen).abs()
        numel = before.numel()
        count = int(torch.randint(0, numel + 3, (), generator=gen))
        mask, swapped = selection.regrown(drop, grow, before, after, count)
        want, want_count = regrown_reference(drop, grow, before, after, count)
        assert mask.shape == after.shape and mask.dtype == torch.bool
        assert torch.equal(mask.reshape(-1), want), case
        assert swapped == want_count, case
        # the invariants, said directly
        assert int(mask.sum()) == int(after.sum())  # as many kept
        assert not (mask & before & ~after).any()  # pruned just now (in after only): never back
        grown, dropped = mask & ~after, after & ~mask
        assert int(grown.sum()) == int(dropped.sum()) == swapped
        assert not (grown & before).any()  # grown ones were pruned in `before`
        if int(after.sum()) > 0:
            assert int(mask.sum()) >= min(1, int(after.sum()))


def test_regrown_picks_the_lowest_drop_and_highest_grow_scores():
    before = torch.tensor([True, True, True, True, False, False, False, True])
    after = torch.tensor([True, True, True, False, False, False, False, True])  # index 3 pruned just now
    drop = torch.tensor([5.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 2.0])
    grow = torch.tensor([0.0, 0.0, 0.0, 99.0, 4.0, 7.0, 1.0, 0.0])  # 3 has the largest, and must not come back
    mask, swapped = selection.regrown(drop, grow, before, after, 2)
    assert swapped == 2
    assert torch.equal(mask, torch.tensor([True, False, True, False, True, True, False, False]))


def test_regrown_breaks_ties_by_lower_flat_index():
    before = torch.tensor([[True, True, True], [False, False, False]])
    after = before.clone()
    mask, swapped = selection.regrown(torch.ones(2, 3), torch.ones(2, 3), before, after, 2)
    assert swapped == 2
    assert torch.equal(mask, torch.tensor([[False, False, True], [True, True, False]]))


def test_regrown_caps_the_count():
    before = torch.tensor([True, True, True, False, False, False, False])
    after = before.clone()
    scores = torch.arange(7.0)
    # more than the candidates (4) and than the kept (3): at least one weight stays kept
    mask, swapped = selection.regrown(scores, scores, before, after, 10)
    assert swapped == 2 and int(mask.sum()) == 3
    assert torch.equal(mask, torch.tensor([False, False, True, False, False, True, True]))
    # more than the candidates
    before2 = torch.tensor([True, True, True, True, True, False])
    mask, swapped = selection.regrown(scores[:6], scores[:6], before2, before2.clone(), 4)
    assert swapped == 1 and torch.equal(mask, torch.tensor([False, True, True, True, True, True]))
    # nothing pruned before: nothing to grow
    full = torch.ones(4, dtype=torch.bool)
    mask, swapped = selection.regrown(scores[:4], scores[:4], full, full.clone(), 2)
    assert swapped == 0 and torch.equal(mask, full)


@pytest.mark.parametrize("count", [0, -3])
def test_regrown_with_count_zero_returns_an_equal_mask(count):
    gen = torch.Generator().manual_seed(1)
    before, after = random_masks(gen, (4, 5))
    mask, swapped = selection.regrown(torch.randn(4, 5), torch.randn(4, 5), before, after, count)
    assert swapped == 0 and torch.equal(mask, after) and mask is not after


def test_regrown_takes_row_scores_as_drop_scores():
    gen = torch.Generator().manual_seed(2)
    before, after = random_masks(gen, (6, 5))
    drop, grow = torch.randn(6, 5, generator=gen), torch.rand(6, 5, generator=gen)
    rows = selection.RowScores(drop.shape, drop.dtype, lambda a, b: drop[a:b])
    assert torch.equal(selection.regrown(rows, grow, before, after, 3)[0],
                       selection.regrown(drop, grow, before, after, 3)[0])


# ----------------------------------------------------------------------------------------------------
# 4. Regrow values and the Pruner end to end


def test_regrow_values_by_hand():
    r = Regrow(0.4, every=10, begin=0, end=100)
    assert [r.is_update(s) for s in (0, 10, 90, 100)] == [True] * 4
    assert [r.is_update(s) for s in (1, 5, 99, 101, 110)] == [False] * 5
    assert r.fraction_at(0) == 0.4
    assert r.fraction_at(25) == pytest.approx(0.4 * (1 + math.cos(math.pi / 4)) / 2, rel=4 * EPS)
    assert r.fraction_at(50) == pytest.approx(0.2, rel=4 * EPS)
    assert r.fraction_at(100) == 0.0 and r.fraction_at(150) == 0.0
    late = Regrow(0.3, every=4, begin=3, end=20)
    assert [s for s in range(30) if late.is_update(s)] == [3, 7, 11, 15, 19]
    assert late.fraction_at(0) == 0.3  # before begin: the full fraction
    constant = Regrow(0.25, every=1, begin=2, end=9, decay="constant")
    assert {constant.fraction_at(s) for s in range(15)} == {0.25}
    assert Regrow(0.6, every=3, begin=5, end=5).fraction_at(5) == 0.6
    # None fields come from the schedule; the original is unchanged
    r = Regrow(0.3)
    got = r.resolved(Cubic(begin=5, end=50, every=5))
    assert (got.fraction, got.every, got.begin, got.end, got.decay) == (0.3, 5, 5, 50, "cosine")
    assert (r.every, r.begin, r.end) == (None, None, None)
    got = Regrow(0.2, every=2, end=80, decay="constant").resolved(Cubic(begin=5, end=50, every=5))
    assert (got.fraction, got.every, got.begin, got.end, got.decay) == (0.2, 2, 5, 80, "constant")
    got = Regrow(1, begin=0).resolved(Cubic(begin=5, end=50, every=5))
    assert (got.fraction, got.every, got.begin, got.end) == (1.0, 5, 0, 50)
    assert isinstance(got.fraction, float)
    assert "fraction=0.3" in repr(Regrow(0.3)) and "decay='cosine'" in repr(Regrow(0.3))


def record_run(regrow, optimizer="adam", steps=30, importance="magnitude", scope="layer", with_dense=False):
    """Trains a run and records, at every step: masks before and after pruner.step(), weights before it
    (after the optimizer step) and after it, the optimizer state after it and (optionally) the dense
    gradients of the step computed independently."""
    model, opt, pruner = make_run(regrow, optimizer=optimizer, importance=importance, scope=scope)
    layers = layers_of(model)
    records = []
    for step, (x, y) in enumerate(DATA[:steps]):
        dense = dense_gradients(model, x, y) if with_dense else None
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        before = masks_of(model)
        weights_before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
        updated = pruner.step()
        assert pruner.steps == step + 1
        records.append(dict(
            step=step, updated=updated, before=before, after=masks_of(model), dense=dense,
            weights_before=weights_before,
            weights={name: layer.weight.detach().clone() for name, layer in layers.items()},
            state={name: {k: v.clone() for k, v in opt.state[layer.weight].items() if torch.is_tensor(v)}
                   for name, layer in layers.items()},
            sparsity=pruner.sparsity, counts=pruned_counts(model), targets=pruner.target_at(step)))
    return model, opt, pruner, records


@pytest.mark.parametrize("optimizer", ["adam", "adam-amsgrad", "sgd-momentum"])
def test_pruner_regrowth_end_to_end(optimizer):
    _, _, plain, plain_records = record_run(None, optimizer=optimizer)
    model, _, pruner, records = record_run(REGROW, optimizer=optimizer, with_dense=True)
    regrow = resolved(REGROW)
    assert (regrow.begin, regrow.every, regrow.end) == (1, 2, 25)
    numel = {name: mask.numel() for name, mask in tp.masks(model).items()}
    swaps_after_end = 0
    for rec, ref in zip(records, plain_records):
        step, before, after = rec["step"], rec["before"], rec["after"]
        # the sparsity is exactly the schedule's, as without regrowth
        assert rec["sparsity"] == ref["sparsity"], step
        assert rec["counts"] == ref["counts"], step
        assert rec["counts"] == {name: int(round(rec["targets"][name] * numel[name])) for name in numel}, step
        for name in after:
            grown = after[name] & ~before[name]
            dropped = before[name] & ~after[name]
            if not regrow.is_update(step):
                assert not grown.any(), (step, name)
                if not SCHEDULE.is_update(step):
                    assert torch.equal(after[name], before[name]), (step, name)
                continue
            kept = int(after[name].sum())
            expected = max(0, min(int(round(regrow.fraction_at(step) * kept)), kept - 1, int((~before[name]).sum())))
            assert int(grown.sum()) == expected, (step, name)
            if expected == int(round(regrow.fraction_at(step) * kept)):
                assert abs(int(grown.sum()) - regrow.fraction_at(step) * kept) <= 0.5, (step, name)
            if not grown.any():
                continue
            # regrown weights come back at exactly zero, with their optimizer moments at zero
            assert (rec["weights"][name][grown] == 0).all(), (step, name)
            for key, value in rec["state"][name].items():
                if value.shape == grown.shape:
                    assert (value[grown] == 0).all(), (step, name, key)
            # they grow by the largest dense gradient magnitude among the weights pruned before the step
            g = rec["dense"][name].abs()
            others = ~before[name] & ~grown
            if others.any():
                assert g[grown].min() >= g[others].max() * (1 - 64 * EPS), (step, name)
            # what goes (the schedule's pruning and the swap's drops together): the lowest magnitudes of the kept
            w = rec["weights_before"][name].abs()
            assert w[dropped].max() <= w[after[name] & before[name]].min(), (step, name)
            if step > SCHEDULE.end:  # a pure swap: as many go as come back
                swaps_after_end += 1
                assert not torch.equal(after[name], before[name])
                assert int(dropped.sum()) == int(grown.sum())
    assert swaps_after_end > 0  # dynamic sparsity once the final sparsity is reached
    # regrown weights do learn afterwards: some are nonzero at the end of training
    last = [r for r in records if r["step"] == 23][0]
    grown_any = False
    for name, layer in layers_of(model).items():
        grown = last["after"][name] & ~last["before"][name]
        grown_any |= bool((layer.weight.detach()[grown & tp.masks(model)[name]] != 0).any())
    assert grown_any


def test_regrow_float_is_regrow_of_that_fraction():
    data = DATA[:16]
    a, a_opt, a_pruner = make_run(0.3)
    train_with_pruner(a, a_opt, a_pruner, data)
    b, b_opt, b_pruner = make_run(Regrow(0.3))
    train_with_pruner(b, b_opt, b_pruner, data)
    c, c_opt, c_pruner = make_run(None)
    train_with_pruner(c, c_opt, c_pruner, data)
    assert_same_state(a, b)
    assert any(not torch.equal(m, tp.masks(c)[n]) for n, m in tp.masks(a).items())  # it did swap
    assert a_pruner.sparsity == c_pruner.sparsity


def test_no_regrowth_step_no_gradient_needed():
    """Between regrowth steps (and with regrowth off) pruner.step() needs no forward or backward."""
    model, opt, pruner = make_run(Regrow(0.5, every=4, begin=4, end=12), schedule=OneShot(at=0))
    pruner.step()  # step 0: the one-shot prune, not a regrowth step
    for _ in range(3):  # steps 1, 2, 3
        assert not pruner.step()
    with pytest.raises(RuntimeError, match="regrowth at step 4 needs the gradient"):
        pruner.step()  # step 4 is one


# ----------------------------------------------------------------------------------------------------
# 5. regrow=None is the plain Pruner


def test_regrow_none_is_unchanged_bit_for_bit():
    data = DATA[:20]
    a = make_mlp64()
    a_opt = make_optimizer(a, "adam")
    a_pruner = tp.Pruner(a, TARGET, SCHEDULE)
    b, b_opt, b_pruner = make_run(None)
    for x, y in data:
        updated = []
        for model, opt, pruner in ((a, a_opt, a_pruner), (b, b_opt, b_pruner)):
            before = masks_of(model)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            updated.append(pruner.step())
            for name, mask in tp.masks(model).items():
                assert not (mask & ~before[name]).any()  # masks only grow
        assert updated[0] == updated[1]
        assert_same_state(a, b)
        assert a_pruner.state_dict() == b_pruner.state_dict()
    assert a_pruner.sparsity == b_pruner.sparsity > 0.7


# ----------------------------------------------------------------------------------------------------
# 6. resume


@pytest.mark.parametrize("stops", [(5,), (6,), (17,), (18,), (3, 5, 12, 17)],
                         ids=["before-regrowth-in-schedule", "after-regrowth", "before-regrowth-after-end",
                              "after-regrowth-after-end", "several"])
def test_resume_ends_like_the_uninterrupted_run(stops):
    regrow = resolved(REGROW)
    straight, straight_opt, straight_pruner = make_run()
    train_with_pruner(straight, straight_opt, straight_pruner, DATA)

    model, opt, pruner = make_run()
    train_with_pruner(model, opt, pruner, DATA[:stops[0]])
    for start, stop in zip(stops, stops[1:] + (len(DATA),)):
        state = checkpoint(model, opt, pruner)
        model, opt, pruner = make_run(seed=start + 100)  # other weights: everything comes from `state`
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        pruner.load_state_dict(state["pruner"])
        assert pruner.steps == start
        if regrow.is_update(start):  # the next step is a regrowth step: its gradient must be recorded
            x, y = DATA[start]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            before = masks_of(model)
            updated = pruner.step()
            if start > SCHEDULE.begin + SCHEDULE.every:  # weights were pruned before: some come back
                assert updated
                assert all(bool((m & ~before[n]).any()) for n, m in tp.masks(model).items())
            start += 1
        train_with_pruner(model, opt, pruner, DATA[start:stop])
    assert_same_state(straight, model)
    assert pruner.sparsity == straight_pruner.sparsity > 0.7


# ----------------------------------------------------------------------------------------------------
# 7. copies


@pytest.mark.parametrize("at", [17, 18])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_pruner_works_on_its_copy_and_leaves_the_original_alone(at, how):
    straight, straight_opt, straight_pruner = make_run()
    train_with_pruner(straight, straight_opt, straight_pruner, DATA)

    model, opt, pruner = make_run()
    train_with_pruner(model, opt, pruner, DATA[:at])
    assert resolved(REGROW).is_update(17)
    clone = copy.deepcopy(pruner) if how == "deepcopy" else pickle.loads(pickle.dumps(pruner))
    assert clone.model is not model and clone.steps == at
    clone_opt = make_optimizer(clone.model, "adam")
    clone_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # no tensor shared with the original's state
    before = snapshot(model)
    original_state = pruner.state_dict()
    train_with_pruner(clone.model, clone_opt, clone, DATA[at:])
    assert_unchanged(model, before)
    assert pruner.state_dict() == original_state and pruner.steps == at
    assert_same_state(straight, clone.model)
    # the original goes on as if nothing happened
    train_with_pruner(model, opt, pruner, DATA[at:])
    assert_same_state(straight, model)


# ----------------------------------------------------------------------------------------------------
# 8. errors


def pruner_kwargs_error_cases():
    example = torch.zeros(1, 16, dtype=torch.float64)
    return {
        "2:4": (dict(target_sparsity=None, granularity="2:4", regrow=0.3), ValueError, r"`regrow`.*N:M"),
        "block:4x1": (dict(granularity="block:4x1", regrow=0.3), ValueError, r"`regrow`.*block"),
        "block": (dict(granularity="block", regrow=Regrow(0.2)), ValueError, r"`regrow`.*block"),
        "sparsegpt": (dict(importance="sparsegpt", regrow=0.3), ValueError, r"`regrow`.*reconstructs"),
        # a row-wise criterion prunes the same share of every row; swaps across rows would break it and the
        # next update would overshoot the schedule (found while writing these tests)
        "wanda": (dict(importance="wanda", regrow=0.3), ValueError, r"`regrow`.*every\s+row"),
        "channel": (dict(granularity="channel", example_inputs=example, regrow=0.3), ValueError,
                    r"`regrow`.*channel"),
        "str": (dict(regrow="a"), TypeError, r"`regrow`.*str"),
        "True": (dict(regrow=True), TypeError, r"`regrow`.*bool"),
        "list": (dict(regrow=[0.3]), TypeError, r"`regrow`.*list"),
        "dict": (dict(regrow={"fraction": 0.3}), TypeError, r"`regrow`"),
        "zero": (dict(regrow=0), ValueError, r"`fraction`"),
        "1.5": (dict(regrow=1.5), ValueError, r"`fraction`"),
        "negative": (dict(regrow=-0.2), ValueError, r"`fraction`"),
        "ends-before-schedule-begins": (dict(schedule=Cubic(begin=5, end=20, every=5), regrow=Regrow(0.3, end=3)),
                                        ValueError, r"`begin`.*`end`|`end`.*`begin`"),
        "begins-after-schedule-ends": (dict(schedule=Cubic(begin=0, end=10, every=5), regrow=Regrow(0.3, begin=11)),
                                       ValueError, r"`begin`.*`end`|`end`.*`begin`"),
    }


@pytest.mark.parametrize("case", list(pruner_kwargs_error_cases()))
def test_pruner_refuses_bad_regrow_and_changes_nothing(case):
    kwargs, error, message = pruner_kwargs_error_cases()[case]
    kwargs = dict(kwargs)
    model = make_mlp64()
    before = snapshot(model)
    target = kwargs.pop("target_sparsity", TARGET)
    schedule = kwargs.pop("schedule", SCHEDULE)
    with pytest.raises(error, match=message):
        tp.Pruner(model, target, schedule, **kwargs)
    assert_unchanged(model, before)
    assert tp.masks(model) == {}


@pytest.mark.parametrize("kwargs,argument", [
    (dict(fraction=0), "fraction"), (dict(fraction=1.5), "fraction"), (dict(fraction=True), "fraction"),
    (dict(fraction="a"), "fraction"), (dict(fraction=-0.1), "fraction"), (dict(fraction=float("nan")), "fraction"),
    (dict(fraction=None), "fraction"),
    (dict(every=0), "every"), (dict(every=-1), "every"), (dict(every=True), "every"), (dict(every=1.5), "every"),
    (dict(every="2"), "every"),
    (dict(decay="linear"), "decay"), (dict(decay=None), "decay"),
    (dict(begin=-1), "begin"), (dict(begin=True), "begin"), (dict(begin=2.0), "begin"),
    (dict(end=-3), "end"), (dict(end=False), "end"),
    (dict(begin=10, end=5), "end"),
])
def test_regrow_refuses_bad_arguments_by_name(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        Regrow(**kwargs)


def test_regrow_accepts_the_edges():
    assert Regrow(1).fraction == 1.0
    assert Regrow(1e-9, every=1, begin=0, end=0, decay="constant").end == 0
    assert Regrow(0.5, begin=7, end=7).begin == 7


def run_to(stop, regrow=REGROW):
    model, opt, pruner = make_run(regrow)
    train_with_pruner(model, opt, pruner, DATA[:stop])
    return model, opt, pruner


def everything(model, opt):
    """What a failed pruner.step() must leave as it was: the model (weights, masks, classes, grads,
    modes) and the optimizer's state."""
    return snapshot(model), copy.deepcopy(opt.state_dict())


def assert_everything_unchanged(model, opt, before):
    (state, types, grads, training), opt_before = before
    now_state, now_types, now_grads, now_training = snapshot(model)
    assert list(now_state) == list(state) and now_types == types and now_training == training
    for key in state:
        assert torch.equal(now_state[key], state[key]), key
    for key in grads:  # a NaN gradient stays the same NaN gradient
        assert (grads[key] is None) == (now_grads[key] is None), key
        if grads[key] is not None:
            torch.testing.assert_close(now_grads[key], grads[key], rtol=0, atol=0, equal_nan=True, msg=key)
    now = opt.state_dict()
    assert now["state"].keys() == opt_before["state"].keys()
    for key, value in opt_before["state"].items():
        for k, v in value.items():
            assert torch.equal(torch.as_tensor(now["state"][key][k]), torch.as_tensor(v)), (key, k)


@pytest.mark.parametrize("how", ["no-forward", "eval-forward", "no-grad-forward", "one-layer-only"])
@pytest.mark.parametrize("at", [7, 17])  # a regrowth step with a pruning update, one after the schedule's end
def test_a_regrowth_step_without_gradient_raises_and_changes_nothing(how, at):
    model, opt, pruner = run_to(at)
    assert resolved(REGROW).is_update(at)
    x, y = DATA[at]
    if how == "eval-forward":
        model.eval()
        F.cross_entropy(model(x), y).backward()
        model.train()
    elif how == "no-grad-forward":
        with torch.no_grad():
            model(x)
    elif how == "one-layer-only":
        model[0](x).sum().backward()
    before = everything(model, opt)
    missing = r"\['0', '2', '4'\]" if how != "one-layer-only" else r"\['2', '4'\]"
    with pytest.raises(RuntimeError, match=rf"regrowth at step {at} needs the gradient.*{missing}"):
        pruner.step()
    assert_everything_unchanged(model, opt, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_raises_and_changes_nothing(bad):
    at = 17
    model, opt, pruner = run_to(at)
    x, y = DATA[at]
    opt.zero_grad()
    if math.isnan(bad):
        (F.cross_entropy(model(x), y) * bad).backward()
    else:
        x = x.clone()
        x[0, 0] = bad  # an infinite input: infinite (and NaN) gradients of the first layer
        F.cross_entropy(model(x), y).backward()
    before = everything(model, opt)
    with pytest.raises(FloatingPointError, match=rf"regrowth at step {at}: the gradient of layer '\d' has"):
        pruner.step()
    assert_everything_unchanged(model, opt, before)


# ----------------------------------------------------------------------------------------------------
# 9. global scope


def test_global_scope_keeps_each_layers_count_across_swaps():
    _, _, _, plain_records = record_run(None, scope="global")
    _, _, _, records = record_run(REGROW, scope="global")
    regrow = resolved(REGROW)
    swapped = 0
    for rec, ref in zip(records, plain_records):
        step = rec["step"]
        total = sum(rec["counts"].values())
        assert total == sum(ref["counts"].values()), step  # the global count is the schedule's
        if step >= SCHEDULE.begin + SCHEDULE.every:
            numel = sum(m.numel() for m in rec["after"].values())
            assert total == int(round(rec["targets"]["0"] * numel)), step
        if not SCHEDULE.is_update(step):
            for name in rec["after"]:  # a swap (or nothing) keeps each layer's count
                assert int(rec["after"][name].sum()) == int(rec["before"][name].sum()), (step, name)
        if regrow.is_update(step) and step > SCHEDULE.end:
            grown = sum(int((rec["after"][n] & ~rec["before"][n]).sum()) for n in rec["after"])
            swapped += grown > 0
        if not regrow.is_update(step):
            assert all(not (rec["after"][n] & ~rec["before"][n]).any() for n in rec["after"]), step
    assert swapped > 0


# ----------------------------------------------------------------------------------------------------
# regressions: bugs found while writing these tests


def test_tied_layers_regrow_by_the_gradient_of_the_shared_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).double()
    model[2].weight = model[0].weight
    pruner = tp.Pruner(model, 0.5, OneShot(at=0), regrow=Regrow(0.5, every=1, begin=1, end=3, decay="constant"))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    pruner.step()  # step 0: prune half
    before = masks_of(model)["0"]
    x = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    twin = plain_twin(model)
    twin[2].weight = twin[0].weight
    twin(x).pow(2).sum().backward()
    g = twin[0].weight.grad.abs()
    model.zero_grad()
    model(x).pow(2).sum().backward()
    pruner.step()  # step 1: regrowth
    after = tp.masks(model)["0"]
    grown = after & ~before
    assert grown.any()
    others = ~before & ~grown
    assert g[grown].min() >= g[others].max() * (1 - 64 * EPS)


def test_the_regrowth_after_a_failed_one_uses_only_its_own_steps_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    pruner = tp.Pruner(model, 0.5, OneShot(at=0),
                       regrow=Regrow(0.5, every=2, begin=2, end=10, decay="constant"))
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(6, 8, generator=gen, dtype=torch.float64) for _ in range(5)]
    for step in (0, 1):
        model.zero_grad()
        model(xs[step]).sum().backward()
        pruner.step()
    with pytest.raises(RuntimeError, match="needs the gradient"):
        pruner.step()  # step 2, a regrowth step, without a forward and backward
    model.zero_grad()
    (100 * model(xs[3]).pow(2).sum()).backward()  # step 3: not a regrowth step
    pruner.step()
    before = masks_of(model)
    twin = plain_twin(model)
    twin(xs[4]).sum().backward()
    dense = {"0": twin[0].weight.grad.abs(), "2": twin[2].weight.grad.abs()}
    model.zero_grad()
    model(xs[4]).sum().backward()
    assert pruner.step()  # step 4: regrowth, by step 4's gradient only
    for name, mask in tp.masks(model).items():
        grown = mask & ~before[name]
        assert grown.any(), name
        others = ~before[name] & ~grown
        assert dense[name][grown].min() >= dense[name][others].max() * (1 - 64 * EPS), name
