"""Hostile and odd inputs to tp.prune() and tp.save/tp.load (issue 7): non-finite values, zero-size
and tied layers, ties, layouts, half precision, meta tensors, wrong checkpoints, hard-coded views,
and very large layers ranked without a full sort in bounded memory."""

import copy
import os
import warnings

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune import selection

from conftest import ViewNet, assert_unchanged, make_mlp, snapshot
from error_bounds import assert_layer_close

# --------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_non_finite_weights_are_refused_naming_the_layer(bad, scope):
    model = make_mlp()
    with torch.no_grad():
        model[2].weight[3, 5] = bad
    before = snapshot(model)
    kind = {"nan": "NaN", "inf": r"\+Inf", "-inf": "-Inf"}[str(bad)]
    with pytest.raises(ValueError, match=rf"layer '2' \(Linear\) has non-finite weights: 1 {kind} of 768 entries "
                                         r"\(the first at index \[3, 5\]\).*nothing was changed"):
        tp.prune(model, sparsity=0.5, scope=scope)
    assert_unchanged(model, before)  # layer '0', ranked before '2', was not masked either


def test_non_finite_weights_are_refused_before_calibration_data_is_read():
    model = make_mlp()
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    read = []

    def batches():
        read.append(True)
        yield torch.randn(2, 16)

    with pytest.raises(ValueError, match="layer '4'"):
        tp.prune(model, sparsity=0.5, importance="wanda", data=batches())
    assert not read


def test_non_finite_value_at_a_pruned_position_is_harmless():
    model = make_mlp()
    tp.prune(model, sparsity=0.5)
    pruned = (~model[0].weight_mask).nonzero()[0].tolist()
    with torch.no_grad():
        model[0].weight[tuple(pruned)] = float("nan")  # the masked op never reads it
    tp.prune(model, sparsity=0.7)
    assert model[0].weight[tuple(pruned)].item() == 0.0
    assert abs(float((~model[0].weight_mask).sum()) - 0.7 * 512) <= 0.5


class _RawAbs(tp.importance.Importance):
    """|w| of the stored weight, pruned entries included (a custom criterion that ignores masks)."""

    def score(self, module):
        return module.weight.detach().abs()


@pytest.mark.parametrize("scope", ["layer", "global", "threshold", "2:4", "pruner"])
def test_non_finite_score_at_a_pruned_position_is_harmless(scope):
    """Scores are checked where weights are: among the kept ones (a pruned weight is never ranked)."""
    from torchprune.schedules import Cubic

    model = make_mlp()
    tp.prune(model, sparsity=0.5)
    pruned = ~model[0].weight_mask.clone()
    assert int(pruned.sum()) == 256
    if scope == "pruner":  # built first: attaching the masks zeroes the pruned weights
        pruner = tp.Pruner(model, 0.7, Cubic(begin=0, end=1, every=1), importance=_RawAbs())
    with torch.no_grad():
        model[0].weight[pruned] = float("nan")  # _RawAbs scores NaN there
    if scope == "pruner":
        assert [pruner.step() for _ in range(2)] == [False, True]  # sparsity 0 at step 0
    elif scope == "threshold":
        tp.prune(model, threshold=0.05, importance=_RawAbs())
    elif scope == "2:4":
        tp.prune(model, granularity="2:4", importance=_RawAbs())
    else:
        tp.prune(model, sparsity=0.7, importance=_RawAbs(), scope=scope)
    assert not bool(model[0].weight_mask[pruned].any())  # pruned stays pruned
    assert int(model[0].weight_mask.sum()) < 256 or scope == "threshold"  # and more went


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_power_overflowing_to_inf_is_refused_not_ranked_as_ties(scope):
    """|w|^2 of float32 weights above ~1.8e19 is +Inf: ranked as ties those went by index (3e19 pruned
    before 2e19); like any Inf score it raises naming the layer, and a finite |w|^2 ranks by |w|."""
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3e19, 2e19, 1.0, 5e19]]))
    with pytest.raises(ValueError, match=r"Magnitude\(p=2\) gave non-finite scores for layer '0': 3 \+Inf of 4"):
        tp.prune(model, sparsity=0.5, importance="l2", scope=scope)
    assert not tp.masks(model)
    with torch.no_grad():
        model[0].weight.div_(1e10)
    tp.prune(model, sparsity=0.5, importance="l2", scope=scope)
    assert model[0].weight_mask.tolist() == [[True, False, False, True]]


def test_non_finite_calibration_data_is_refused_naming_the_layer():
    model = make_mlp()
    x = torch.randn(4, 16)
    x[1, 2] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"importance Wanda\(\) gave non-finite scores for layer '0': \d+ NaN of 512 "
                                         r"entries .*calibration data"):
        tp.prune(model, sparsity=0.5, importance="wanda", data=[x])
    assert_unchanged(model, before)


class _InfOnLast(tp.importance.Importance):
    """|w|, but +Inf for one weight of the last layer: a criterion gone wrong late in the model."""

    def score(self, module):
        scores = module.weight.detach().abs().clone()
        if module.out_features == 4:
            scores[0, 1] = float("inf")
        return scores


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_non_finite_scores_of_a_later_layer_leave_every_layer_untouched(scope):
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"for layer '4': 1 \+Inf of 96 entries \(the first at index \[0, 1\]\)"):
        tp.prune(model, sparsity=0.5, importance=_InfOnLast(), scope=scope)
    assert_unchanged(model, before)
    assert not tp.masks(model)


# --------------------------------------------------------------------------- zero-size layers


@pytest.mark.parametrize("kwargs", [dict(sparsity=0.5), dict(sparsity=0.5, scope="global"), dict(threshold=0.1),
                                    dict(granularity="2:4"), dict(scope={"0": 0.9, "1": 0.5, "2": 0.3})])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_size_layers_are_pruned_without_error(kwargs, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(0, 8), nn.Linear(8, 8), nn.Linear(8, 0))  # input 0 features, output 0
    x = torch.randn(3, 0)
    tp.prune(model, **kwargs)
    assert model[0].weight_mask.shape == (8, 0) and model[2].weight_mask.shape == (0, 8)
    assert model(x).shape == (3, 0)
    if kwargs.get("threshold") is None:
        # the zero-size layers count nothing; the real one holds the whole target
        assert tp.sparsity(model) == 0.5
    tp.save(model, tmp_path / "z.pt")
    fresh = tp.load(tmp_path / "z.pt", nn.Sequential(nn.Linear(0, 8), nn.Linear(8, 8), nn.Linear(8, 0)))
    assert torch.equal(fresh[1].weight_mask, model[1].weight_mask)


@pytest.mark.parametrize("importance", ["wanda", "activation", "apoz", "taylor"])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_size_layers_with_data_driven_importance(importance):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(0, 8), nn.Linear(8, 8), nn.Linear(8, 0))
    data = [(torch.randn(5, 0), torch.randn(5, 0))]
    loss_fn = ((lambda out, target: (out - target).pow(2).sum() + model[1].weight.pow(2).sum())
               if importance == "taylor" else None)
    tp.prune(model, sparsity=0.5, importance=importance, data=data, loss_fn=loss_fn)
    assert model[2].weight_mask.numel() == 0
    assert model[1].weight_mask.shape == (8, 8)


# --------------------------------------------------------------------------- ties


def test_all_equal_weights_prune_the_same_exact_count_every_run():
    masks = []
    for _ in range(3):
        layer = nn.Linear(10, 10)
        nn.init.constant_(layer.weight, 0.5)
        tp.prune(layer, sparsity=0.37)
        masks.append(layer.weight_mask.clone())
    expected = torch.ones(100, dtype=torch.bool)
    expected[:37] = False  # ties: the lower flat index goes first
    for mask in masks:
        assert torch.equal(mask.flatten(), expected)


@pytest.mark.parametrize("numel", [1000, 300_000])  # the stable-sort and the radix-select paths
def test_all_equal_scores_tie_by_index_on_both_paths(numel):
    scores = torch.full((numel // 100, 100), 2.0)
    keep = selection.by_ratio(scores, None, 0.61)
    count = round(0.61 * numel)
    assert int((~keep).sum()) == count
    assert not keep.flatten()[:count].any() and keep.flatten()[count:].all()
    a, b = torch.full((numel // 200, 100), 1.0), torch.full((numel // 200, 100), 1.0)
    ka, kb = selection.by_global_ratio([a, b], [None, None], 0.3)
    pruned = round(0.3 * numel)
    assert int((~ka).sum()) == pruned and kb.all()  # the earlier layer first, in index order
    assert not ka.flatten()[:pruned].any() and ka.flatten()[pruned:].all()


def test_all_equal_scores_in_wanda_rows_tie_by_index():
    model = nn.Linear(8, 4, bias=False)
    nn.init.constant_(model.weight, 1.0)
    tp.prune(model, sparsity=0.5, importance="wanda", data=[torch.ones(3, 8)])
    expected = torch.tensor([False] * 4 + [True] * 4).expand(4, 8)
    assert torch.equal(model.weight_mask, expected)


# --------------------------------------------------------------------------- no layer emptied


def test_global_scope_keeps_the_best_weight_of_a_layer_it_would_empty():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    with torch.no_grad():
        model[0].weight.mul_(1e-3)  # every weight of layer 0 is below every weight of layer 1
    best = model[0].weight.detach().abs().argmax()
    tp.prune(model, sparsity=0.6, scope="global")
    assert int(model[0].weight_mask.sum()) == 1 and bool(model[0].weight_mask.flatten()[best])
    assert int((~model[0].weight_mask).sum() + (~model[1].weight_mask).sum()) == 120  # the total is still exact
    out = model(torch.randn(2, 10))
    assert out.std(0).abs().sum() > 0  # the input still reaches the output
    for _ in range(5):  # pruning further never empties it either
        tp.prune(model, sparsity=0.99, scope="global")
        assert int(model[0].weight_mask.sum()) == 1 and int(model[1].weight_mask.sum()) == 1


def test_layer_scope_keeps_one_weight_of_a_tiny_layer():
    model = nn.Sequential(nn.Linear(2, 1), nn.Linear(1, 1))
    tp.prune(model, sparsity=0.9)  # round(0.9 * 2) = 2 and round(0.9 * 1) = 1 would empty both
    assert int(model[0].weight_mask.sum()) == 1 and int(model[1].weight_mask.sum()) == 1


def test_wanda_rows_keep_one_weight_each():
    model = nn.Linear(1, 6)
    tp.prune(model, sparsity=0.9, importance="wanda", data=[torch.randn(4, 1)])
    assert model.weight_mask.all()


def test_sparsity_one_is_refused_and_an_explicit_threshold_may_empty_a_layer():
    model = make_mlp()
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\), got 1.0"):
        tp.prune(model, sparsity=1.0)
    tp.prune(model, threshold=1e9)  # asked for explicitly: every score is below it
    assert not any(m.any() for m in tp.masks(model).values())


# --------------------------------------------------------------------------- tied weights


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.c = nn.Linear(8, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_tied_weights_get_one_mask_counted_once(scope, tmp_path):
    torch.manual_seed(0)
    model = Tied()
    tp.prune(model, sparsity=0.5, scope=scope)
    assert model.a.weight_mask is model.b.weight_mask
    pruned = int((~model.a.weight_mask).sum()) + int((~model.c.weight_mask).sum())
    assert pruned == 64  # half of the 128 distinct weights, not of 192
    assert tp.sparsity(model) == 0.5
    tp.prune(model, sparsity=0.75, scope=scope)  # again: still one mask, no double pruning
    assert model.a.weight_mask is model.b.weight_mask
    assert int((~model.a.weight_mask).sum()) + int((~model.c.weight_mask).sum()) == 96
    tp.save(model, tmp_path / "t.pt")
    torch.manual_seed(1)
    fresh = tp.load(tmp_path / "t.pt", Tied())
    assert fresh.a.weight_mask is fresh.b.weight_mask
    assert torch.equal(fresh.a.weight_mask, model.a.weight_mask)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x), model(x))


# --------------------------------------------------------------------------- module called twice


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def test_module_called_twice_counts_both_calls_in_wanda_statistics():
    torch.manual_seed(0)
    model = Twice()
    x = torch.randn(5, 6)
    with torch.no_grad():
        hidden = torch.relu(model.fc(x))
    norms = (x.pow(2).sum(0) + hidden.pow(2).sum(0)).sqrt()  # every input the layer multiplied
    expected = selection.by_row_ratio(model.fc.weight.detach().abs() * norms, None, 0.5)
    crit = tp.importance.Wanda()
    tp.prune(model, sparsity=0.5, importance=crit, data=[x])
    assert torch.equal(model.fc.weight_mask, expected)


def test_module_called_twice_counts_both_calls_in_activation_statistics():
    torch.manual_seed(0)
    model = Twice()
    x = torch.randn(5, 6)
    with torch.no_grad():
        first = model.fc(x)
        second = model.fc(torch.relu(first))
    outputs = torch.cat([first, second])
    crit = tp.importance.Activation("apoz")
    from torchprune.calibration import observe_activations

    observe_activations(model, {"fc": model.fc}, crit, [x])
    stats = crit._stats[id(model.fc)]
    assert float(stats["count"]) == 10  # 5 samples, two calls
    torch.testing.assert_close(stats["zeros"], (outputs <= 0).sum(0).double())


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("granularity", ["weight", "2:4"])
def test_channels_last_conv_prunes_like_the_contiguous_one(granularity):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    last = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    assert not last.weight.is_contiguous()
    tp.prune(conv, sparsity=0.5 if granularity == "weight" else None, granularity=granularity)
    tp.prune(last, sparsity=0.5 if granularity == "weight" else None, granularity=granularity)
    assert torch.equal(last.weight_mask, conv.weight_mask)
    assert torch.equal(last.weight.detach(), conv.weight.detach())
    x = torch.randn(2, 8, 6, 6)
    assert_layer_close(last(x.to(memory_format=torch.channels_last)), conv, x)


def test_channels_last_conv_large_enough_for_the_radix_path():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3)  # 73,728 weights: above the stable-sort limit
    assert conv.weight.numel() > selection._SORT_LIMIT
    last = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    tp.prune(conv, sparsity=0.7)
    tp.prune(last, sparsity=0.7)
    assert torch.equal(last.weight_mask, conv.weight_mask)
    assert int((~conv.weight_mask).sum()) == round(0.7 * conv.weight.numel())


def test_non_contiguous_weight_and_inputs():
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    transposed = copy.deepcopy(layer)
    transposed.weight = nn.Parameter(layer.weight.detach().t().contiguous().t())  # same values, strides (1, 6)
    assert not transposed.weight.is_contiguous()
    x = torch.randn(8, 5).t()  # a non-contiguous (5, 8) input batch
    assert not x.is_contiguous()
    tp.prune(layer, sparsity=0.5, importance="wanda", data=[x.contiguous()])
    tp.prune(transposed, sparsity=0.5, importance="wanda", data=[x])
    assert torch.equal(transposed.weight_mask, layer.weight_mask)
    assert_layer_close(transposed(x), layer, x)


# --------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("importance", ["magnitude", "l2"])
def test_half_precision_weights_are_scored_in_float32_and_keep_their_dtype(dtype, importance):
    torch.manual_seed(0)
    reference = nn.Linear(32, 16)
    with torch.no_grad():
        reference.weight.mul_(1e-3)  # |w|^2 < 1e-6: in float16 many squares underflow to 0 and would tie
    half = copy.deepcopy(reference).to(dtype)
    reference.weight.data = half.weight.data.float()  # the same values, held in float32
    tp.prune(half, sparsity=0.5, importance=importance)
    tp.prune(reference, sparsity=0.5, importance=importance)
    assert half.weight.dtype == dtype and half.weight_mask.dtype == torch.bool
    assert torch.equal(half.weight_mask, reference.weight_mask)
    assert tp.importance.resolve(importance)(half).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradient_statistics_are_summed_in_float32(dtype):
    torch.manual_seed(0)
    model = nn.Linear(8, 4).to(dtype)
    crit = tp.importance.Taylor()
    batches = [(torch.randn(3, 8).to(dtype), torch.randn(3, 4).to(dtype)) for _ in range(3)]
    tp.prune(model, sparsity=0.5, importance=crit, data=batches, loss_fn=lambda o, t: (o - t).float().pow(2).mean())
    assert model.weight.dtype == dtype
    assert int((~model.weight_mask).sum()) == 16


# --------------------------------------------------------------------------- meta device


def test_meta_model_is_refused_naming_the_layer():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"`model` layer '0' is on meta.*no values to rank.*to_empty"):
        tp.prune(model, sparsity=0.5)
    assert not tp.masks(model) and model[0].weight.is_meta


def test_load_into_a_meta_model_is_refused_naming_the_layer(tmp_path):
    model = make_mlp()
    tp.prune(model, sparsity=0.5)
    tp.save(model, tmp_path / "m.pt")
    with torch.device("meta"):
        target = make_mlp()
    with pytest.raises(ValueError, match=r"`model` layer '0' is on meta"):
        tp.load(tmp_path / "m.pt", target)
    assert not tp.masks(target)


# --------------------------------------------------------------------------- checkpoints of another shape


@pytest.mark.parametrize("other, message", [
    (lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 20), nn.ReLU(), nn.Linear(20, 4)),
     r"at layers '2' \(Linear\), '4' \(Linear\); nothing was changed \(shape differs: 2.bias \[24\] vs \[20\]"),
    (lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4),
                           nn.Linear(4, 2)),
     r"at layer '5' \(Linear\); nothing was changed \(missing in the file: \['5.bias', '5.weight'\]"),
    (lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24)),
     r"the file masks a Linear at '4', the model has nothing there"),
])
def test_load_into_a_model_of_another_shape_names_the_layer_and_changes_nothing(tmp_path, other, message):
    model = make_mlp()
    tp.prune(model, sparsity=0.5)
    tp.save(model, tmp_path / "m.pt")
    target = other()
    before = snapshot(target)
    with pytest.raises(ValueError, match=message):
        tp.load(tmp_path / "m.pt", target)
    assert_unchanged(target, before)


# --------------------------------------------------------------------------- hard-coded views


def test_hard_coded_view_is_reported_by_layer_and_left_alone():
    torch.manual_seed(0)
    model, x = ViewNet(), torch.randn(2, 3, 4, 4)
    unprunable = tp.DependencyGraph(model, x).unprunable
    assert set(unprunable) == {"conv2", "fc"}
    assert any("view with a fixed size" in why for why in unprunable["conv2"])
    with pytest.warns(UserWarning, match=r"kept conv2, fc: view with a fixed size for a pruned dim") as caught:
        tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)  # no crash deep in tracing
    assert len([w for w in caught if "left some channels" in str(w.message)]) == 1  # warned once
    assert caught[0].filename == __file__  # points at the caller's tp.prune
    assert model.conv1.weight.shape == (4, 3, 3, 3)  # conv1 -> conv2 channels are free to go
    assert model.conv2.weight.shape == (16, 4, 3, 3) and model.fc.weight.shape == (10, 256)
    assert model(x).shape == (2, 10)


def test_excluded_layers_and_the_model_output_are_not_warned_about():
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match=r"kept conv2, fc: view"):  # fc excluded: its inputs could have gone
        tp.prune(ViewNet(), sparsity=0.5, granularity="channel", example_inputs=x, exclude=["fc"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # conv2 excluded: the group the view keeps is one the user keeps anyway
        tp.prune(ViewNet(), sparsity=0.5, granularity="channel", example_inputs=x, exclude=["conv2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the classifier's outputs reach the model output: expected, silent
        tp.prune(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), sparsity=0.5, granularity="channel",
                 example_inputs=torch.randn(2, 8))


# --------------------------------------------------------------------------- very large layers


def _sorted_path(monkeypatch):
    monkeypatch.setattr(selection, "_SORT_LIMIT", 1 << 62)


def _random_case(generator, trial):
    shapes = [(int(torch.randint(1, 40, (1,), generator=generator)),
               int(torch.randint(1, 30, (1,), generator=generator)))
              for _ in range(3)]
    scores, masks = [], []
    for i, shape in enumerate(shapes):
        x = torch.randn(shape, generator=generator)
        if trial % 3 == 0:
            x = torch.round(x * 4) / 4  # many ties
        if trial % 5 == 0:
            x[x.abs() < 0.3] = -0.0  # -0.0 ties with +0.0, as in a sort
        if i == 1 and trial % 2:
            x = x.double()  # mixed dtypes: 64-bit keys
        scores.append(x)
        masks.append(None if (trial + i) % 3 == 0 else torch.rand(shape, generator=generator) > 0.3)
    return scores, masks


@pytest.mark.parametrize("trial", range(12))
def test_radix_select_in_tiny_blocks_equals_the_stable_sort(monkeypatch, trial):
    generator = torch.Generator().manual_seed(trial)
    scores, masks = _random_case(generator, trial)
    sparsity = [0.1, 0.5, 0.9, 0.97][trial % 4]
    with monkeypatch.context() as patch:
        _sorted_path(patch)
        expected = (selection.by_global_ratio(scores, masks, sparsity),
                    [selection.by_ratio(s, m, sparsity) for s, m in zip(scores, masks)],
                    [selection.by_row_ratio(s, m, sparsity) for s, m in zip(scores, masks)])
    monkeypatch.setattr(selection, "_SORT_LIMIT", 0)
    monkeypatch.setattr(selection, "_CHUNK", 7)  # blocks of a row or a few: every boundary case
    got = (selection.by_global_ratio(scores, masks, sparsity),
           [selection.by_ratio(s, m, sparsity) for s, m in zip(scores, masks)],
           [selection.by_row_ratio(s, m, sparsity) for s, m in zip(scores, masks)])
    for want, have in zip(expected, got):
        for a, b in zip(want, have):
            assert torch.equal(a, b)


def test_n_of_m_and_threshold_in_blocks_equal_one_block(monkeypatch):
    torch.manual_seed(0)
    scores = torch.round(torch.randn(6, 8, 3, 3) * 3) / 3
    mask = torch.rand(6, 8, 3, 3) > 0.2
    whole = selection.n_of_m(scores, mask, 2, 4), selection.by_threshold(scores, mask, 0.1)
    monkeypatch.setattr(selection, "_CHUNK", 5)
    blocks = selection.n_of_m(scores, mask, 2, 4), selection.by_threshold(scores, mask, 0.1)
    assert torch.equal(whole[0], blocks[0]) and torch.equal(whole[1], blocks[1])


def test_a_few_million_scores_match_the_stable_sort(monkeypatch):
    torch.manual_seed(0)
    big = torch.round(torch.randn(2000, 1500) * 100) / 100  # 3M scores, many ties
    small = torch.randn(300, 7).double()
    mask = torch.rand(2000, 1500) > 0.1
    fast = selection.by_global_ratio([big, small], [mask, None], 0.8), selection.by_ratio(big, mask, 0.6)
    _sorted_path(monkeypatch)
    exact = selection.by_global_ratio([big, small], [mask, None], 0.8), selection.by_ratio(big, mask, 0.6)
    assert all(torch.equal(a, b) for a, b in zip(fast[0], exact[0]))
    assert torch.equal(fast[1], exact[1])
    assert int((~fast[1]).sum()) == round(0.6 * big.numel())


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@pytest.mark.slow
def test_ranking_120_million_scores_is_exact_with_bounded_memory():
    if not os.path.exists("/proc/self/clear_refs") or not _peak_rss_reset():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    scores = torch.empty(12_000, 10_000).uniform_(-1, 1)  # 120M float32 scores: 480 MB
    scores[:, ::7] = 0.25  # a block of ties around the 80th percentile... and elsewhere
    before = _status_kb("VmRSS")
    _peak_rss_reset()
    keep = selection.by_ratio(scores, None, 0.8)
    peak_extra = (_status_kb("VmHWM") - before) * 1024
    count = round(0.8 * scores.numel())
    assert int((~keep).sum()) == count
    pruned_max = scores[~keep].max()
    kept_min = scores[keep].min()
    assert pruned_max <= kept_min
    # the new mask (1 byte per score) plus blocks: far below a float64 copy and a sort (~24 bytes/score)
    assert peak_extra < scores.numel() * 1.5, f"peak extra {peak_extra / 2**20:.0f} MiB"


class _PlainL1(tp.importance.Magnitude):
    """The same scores through an overridden score(): forces prune() to hold full score tensors."""

    def score(self, module):
        return super().score(module).clone()


@pytest.mark.parametrize("kwargs", [dict(sparsity=0.8, scope="global"), dict(sparsity=0.6), dict(threshold=0.02),
                                    dict(granularity="2:4")])
def test_magnitude_scored_in_blocks_equals_full_score_tensors(kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1200), nn.Linear(1200, 96).half(), nn.Linear(96, 8).double())  # > sort limit
    tp.prune(model, sparsity=0.3, scope="global")  # some weights already pruned
    reference = copy.deepcopy(model)
    tp.prune(model, importance="magnitude", **kwargs)  # blocks of rows (selection.RowScores)
    tp.prune(reference, importance=_PlainL1(), **kwargs)  # whole score tensors
    for name, mask in tp.masks(model).items():
        assert torch.equal(mask, tp.masks(reference)[name]), name


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_channel_pruning_never_removes_a_whole_group(scope):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.mul_(1e-4)  # the first group's channels all score far below the others
    x = torch.randn(2, 3, 6, 6)
    tp.prune(model, sparsity=0.99, granularity="channel", scope=scope, example_inputs=x)
    assert model[0].out_channels >= 1 and model[2].out_channels >= 1 and model[4].out_channels >= 1
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("entry", ["prune", "Pruner"])
def test_float8_weights_are_refused_by_layer_before_anything_changes(entry):
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)).to(torch.float8_e4m3fn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError,
                       match=r"layer '0' has torch.float8_e4m3fn weights; the masked ops take torch.float32"):
        if entry == "prune":
            tp.prune(model, sparsity=0.5)
        else:
            tp.Pruner(model, 0.5, tp.schedules.OneShot(at=0))
    assert not tp.masks(model)
    assert all(torch.equal(v.view(torch.uint8), before[k].view(torch.uint8)) for k, v in model.state_dict().items())
