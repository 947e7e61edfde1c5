"""prune(): targets per scope, granularities, repeated pruning, data-driven scores, bad input."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp

from conftest import SmallNet, TinyGPT, assert_unchanged, make_mlp, snapshot
from error_bounds import assert_same_function


def pruned_fraction(mask):
    return float((~mask).sum()) / mask.numel()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.97])
def test_layer_scope_hits_each_layer(small_net, sparsity):
    tp.prune(small_net, sparsity=sparsity)
    masks = tp.masks(small_net)
    assert set(masks) == {"conv", "conv1d", "fc1", "fc2"}
    for mask in masks.values():
        assert abs(float((~mask).sum()) - sparsity * mask.numel()) <= 0.5


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
def test_global_scope_hits_the_total(small_net, sparsity):
    tp.prune(small_net, sparsity=sparsity, scope="global")
    masks = tp.masks(small_net).values()
    total = sum(m.numel() for m in masks)
    assert abs(sum(float((~m).sum()) for m in masks) - sparsity * total) <= 0.5
    assert abs(tp.sparsity(small_net) - sparsity) <= 0.5 / total
    # the global ranking is by magnitude: every kept weight beats every pruned one, except each
    # layer's best weight, which a global ranking always keeps (no layer is emptied)
    torch.manual_seed(0)
    original = SmallNet()  # same seed as the fixture: the weights before pruning
    masks = tp.masks(small_net)
    assert all(m.any() for m in masks.values())
    kept = torch.cat([original.get_submodule(n).weight.detach()[m].abs().sort().values[:-1] for n, m in masks.items()])
    pruned = torch.cat([original.get_submodule(n).weight.detach()[~m].abs() for n, m in masks.items()])
    assert kept.min() >= pruned.max()


def test_pruned_weights_are_zero_and_outputs_match_reference(small_net):
    x = torch.randn(2, 3, 4, 4)
    tp.prune(small_net, sparsity=0.6)
    reference = SmallNet()
    state = {k: v for k, v in small_net.state_dict().items() if not k.endswith("weight_mask")}
    reference.load_state_dict(state)
    small_net.eval(), reference.eval()
    for name, mask in tp.masks(small_net).items():
        assert (small_net.get_submodule(name).weight[~mask] == 0).all()
    assert_same_function(small_net, reference, x)


def test_dict_scope_prunes_only_named_layers(mlp):
    tp.prune(mlp, scope={"0": 0.5, "4": 0.25})
    masks = tp.masks(mlp)
    assert set(masks) == {"0", "4"}
    assert pruned_fraction(masks["0"]) == 0.5 and pruned_fraction(masks["4"]) == 0.25
    assert isinstance(mlp[2], nn.Linear) and type(mlp[2]) is nn.Linear


def test_threshold_prunes_below_the_score(mlp):
    weights = {n: m.weight.detach().abs().clone() for n, m in mlp.named_modules() if isinstance(m, nn.Linear)}
    tp.prune(mlp, threshold=0.1)
    for name, mask in tp.masks(mlp).items():
        assert torch.equal(mask, weights[name] >= 0.1)


def test_repeated_pruning_prunes_further_among_survivors(mlp):
    tp.prune(mlp, sparsity=0.5)
    first = {k: v.clone() for k, v in tp.masks(mlp).items()}
    tp.prune(mlp, sparsity=0.8, importance="random")
    for name, mask in tp.masks(mlp).items():
        assert not (mask & ~first[name]).any()  # nothing regrew
        assert abs(pruned_fraction(mask) - 0.8) <= 0.5 / mask.numel()
    tp.prune(mlp, sparsity=0.3)  # lower than now: nothing changes
    assert all(abs(pruned_fraction(m) - 0.8) <= 0.5 / m.numel() for m in tp.masks(mlp).values())


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_n_m_granularity(n, m):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv1d(16, 8, 1), nn.Linear(16, 8))
    tp.prune(model, granularity=f"{n}:{m}")
    linear_mask = tp.masks(model)["2"]
    assert (linear_mask.view(8, -1, m).sum(-1) == n).all()
    conv_mask = tp.masks(model)["0"]
    assert (conv_mask.permute(0, 2, 3, 1).reshape(-1, m).sum(-1) == n).all()
    assert abs(tp.sparsity(model) - (1 - n / m)) < 1e-12


def test_exclude_by_name_module_and_type(small_net):
    tp.prune(small_net, sparsity=0.5, exclude=["fc2", small_net.conv, nn.Conv1d])
    assert set(tp.masks(small_net)) == {"fc1"}


def test_taylor_with_data_matches_manual_scores(mlp):
    torch.manual_seed(1)
    data = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(3)]
    reference = make_mlp()
    expected = {}
    for x, y in data:
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        for name in ("0", "2", "4"):
            layer = reference.get_submodule(name)
            term = (layer.weight * layer.weight.grad).abs().detach()
            expected[name] = expected.get(name, 0) + term
    before = [p.grad for p in mlp.parameters()]
    tp.prune(mlp, sparsity=0.5, importance="taylor", data=data, loss_fn=F.cross_entropy)
    assert [p.grad for p in mlp.parameters()] == before  # gradients restored (all None)
    for name, mask in tp.masks(mlp).items():
        assert torch.equal(mask, tp.selection.by_ratio(expected[name], torch.ones_like(mask), 0.5))


def test_gradient_importance_runs_in_eval_mode_and_restores_it(small_net):
    data = [(torch.randn(4, 3, 4, 4), torch.randint(0, 10, (4,)))]
    stats = small_net.bn.running_mean.clone()
    tp.prune(small_net, sparsity=0.5, importance="gradient", data=data, loss_fn=F.cross_entropy)
    assert small_net.training and torch.equal(small_net.bn.running_mean, stats)


def test_masked_model_compiles_fullgraph_and_exports(small_net):
    tp.prune(small_net, sparsity=0.7, scope="global")
    small_net.eval()
    x = torch.randn(3, 3, 4, 4)
    compiled = torch.compile(small_net, fullgraph=True)
    assert torch.allclose(compiled(x), small_net(x), atol=1e-5)
    exported = torch.export.export(small_net, (x,))
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {"torchprune.masked_linear.default", "torchprune.masked_conv2d.default"} <= ops
    assert torch.allclose(exported.module()(x), small_net(x), atol=1e-6)


BAD_CALLS = [
    (dict(sparsity=1.0), ValueError, r"`sparsity` must be in \[0, 1\), got 1.0"),
    (dict(sparsity=-0.1), ValueError, r"`sparsity` must be in \[0, 1\)"),
    (dict(sparsity="half"), TypeError, r"`sparsity` must be a number"),
    (dict(), ValueError, r"exactly one of `sparsity`.*or `threshold`"),
    (dict(sparsity=0.5, threshold=0.1), ValueError, r"exactly one of `sparsity`"),
    (dict(sparsity=0.5, importance="nope"), ValueError, r"`importance` must be one of"),
    (dict(sparsity=0.5, granularity="blocks"), ValueError, r"`granularity` must be 'weight', 'N:M'"),
    (dict(sparsity=0.5, granularity="channel"), ValueError, r"structural pruning"),
    (dict(granularity="4:4"), ValueError, r"0 < N < M"),
    (dict(granularity="5:4"), ValueError, r"0 < N < M"),
    (dict(granularity="2:4", sparsity=0.3), ValueError, r"`sparsity` must be None or 0.5"),
    (dict(granularity="2:4", threshold=0.3), ValueError, r"`threshold` cannot be combined"),
    (dict(granularity="2:4", scope="global"), ValueError, r"`scope` must be 'layer' for N:M"),
    (dict(granularity="2:3"), ValueError, r"layer 'conv1d' \(Conv1d\) has input size 8"),
    (dict(sparsity=0.5, scope="model"), ValueError, r"`scope` must be one of \['layer', 'global'\]"),
    (dict(scope={"fc1": 1.5}), ValueError, r"`scope\['fc1'\]` must be in \[0, 1\)"),
    (dict(scope={"bn": 0.5}), ValueError, r"`scope` key 'bn' is not a prunable layer"),
    (dict(scope={"fc1": 0.5}, sparsity=0.5), ValueError, r"pass neither `sparsity` nor `threshold`"),
    (dict(sparsity=0.5, exclude=["missing"]), ValueError, r"`exclude` names no module of the model: 'missing'"),
    (dict(sparsity=0.5, exclude=[nn.Linear(2, 2)]), ValueError, r"`exclude` holds a Linear that is not part"),
    (dict(sparsity=0.5, exclude=[3]), TypeError, r"`exclude` items must be"),
    (dict(sparsity=0.5, exclude=[nn.Linear, nn.Conv1d, nn.Conv2d]), ValueError, r"no prunable layer"),
    (dict(sparsity=0.5, importance="taylor"), ValueError, r"pass `data` and `loss_fn`"),
    (dict(sparsity=0.5, importance="gradient", data=[]), ValueError, r"pass `loss_fn`"),
    (dict(sparsity=0.5, importance="gradient", data=[], loss_fn=F.cross_entropy), ValueError,
     r"`data` yielded no batches"),
    (dict(sparsity=0.5, importance="gradient", data=[torch.zeros(1)], loss_fn=F.cross_entropy), TypeError,
     r"`data` must yield"),
    (dict(threshold=float("nan")), ValueError, r"`threshold` must be a finite real number, got nan"),
    (dict(threshold=float("inf")), ValueError, r"`threshold` must be a finite real number, got inf"),
    (dict(threshold="0.1"), TypeError, r"`threshold` must be a finite real number, got str"),
    (dict(scope={}), ValueError, r"`scope` must name at least one layer"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_CALLS)
def test_bad_input_raises_and_leaves_the_model_untouched(small_net, kwargs, error, message):
    tp.prune(small_net, sparsity=0.2, exclude=["fc2"])  # already pruned models stay untouched too
    before = snapshot(small_net)
    with pytest.raises(error, match=message):
        tp.prune(small_net, **kwargs)
    assert_unchanged(small_net, before)


def test_model_without_prunable_layers_and_non_module():
    with pytest.raises(ValueError, match="no prunable layer"):
        tp.prune(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), sparsity=0.5)
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        tp.prune("resnet", sparsity=0.5)


def test_failing_loss_fn_leaves_model_untouched(small_net):
    before = snapshot(small_net)

    def broken(output, target):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tp.prune(small_net, sparsity=0.5, importance="taylor", data=[(torch.randn(2, 3, 4, 4), None)], loss_fn=broken)
    assert_unchanged(small_net, before)


def test_layers_on_unsupported_devices_are_refused_before_any_change(small_net):
    small_net.fc2.to("meta")  # stands in for a device this build has no masked kernels for
    before = {k: v.clone() for k, v in small_net.state_dict().items() if not k.startswith("fc2")}
    with pytest.raises(ValueError, match=r"`model` layer 'fc2' is on meta; this build's masked ops run on cpu only"):
        tp.prune(small_net, sparsity=0.5)
    assert not tp.masks(small_net)
    assert all(torch.equal(v, small_net.state_dict()[k]) for k, v in before.items())


class TiedNet(nn.Module):
    """Two Linear layers that share one weight tensor (as tied encoder/decoder layers do)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)
        self.second.weight = self.first.weight
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.second(torch.relu(self.first(x))))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_tied_weights_get_one_mask(scope):
    torch.manual_seed(0)
    model = TiedNet()
    tp.prune(model, sparsity=0.5, scope=scope)
    masks = tp.masks(model)
    assert torch.equal(masks["first"], masks["second"])
    assert model.first.weight is model.second.weight
    if scope == "layer":
        assert int((~masks["first"]).sum()) == 32
    tp.prune(model, sparsity=0.75, importance="random", scope=scope)
    assert torch.equal(tp.masks(model)["first"], tp.masks(model)["second"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(sparsity=0.5, exclude=["second"]),
     r"Linear 'second' shares its weight with layer 'first', which pruning would change"),
    (dict(scope={"first": 0.5}), r"Linear 'second' shares its weight with layer 'first'"),
    (dict(scope={"first": 0.5, "second": 0.3}), r"`scope` gives layers 'first' and 'second' different sparsities"),
])
def test_tied_weights_split_by_arguments_are_refused(kwargs, message):
    model = TiedNet()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        tp.prune(model, **kwargs)
    assert_unchanged(model, before)


def test_aliases_can_name_a_layer_in_exclude_and_scope():
    from test_io import AliasNet

    model = AliasNet()
    tp.prune(model, sparsity=0.5, exclude=["classifier"])
    assert set(tp.masks(model)) == {"head"}
    model = AliasNet()
    tp.prune(model, scope={"classifier": 0.25, "head": 0.5})
    assert pruned_fraction(tp.masks(model)["fc"]) == 0.25


def test_weight_tied_to_an_embedding_is_refused_when_nothing_else_is_left():
    class TiedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.lm_head = nn.Linear(8, 10, bias=False)
            self.lm_head.weight = self.embed.weight

    model = TiedHead()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no prunable layer .* once tied layers are left out: "
                                         r"Embedding 'embed' shares its weight with layer 'lm_head'.*untie it first"):
        tp.prune(model, sparsity=0.5)
    assert_unchanged(model, before)


TIED_HEAD_LEFT_OUT = (r"layer 'lm_head' left unpruned: Embedding 'wte' shares its weight with layer 'lm_head', "
                      r"which pruning would change under it\. To prune such a layer, untie it first .*`exclude`")


@pytest.mark.parametrize("kwargs", [dict(sparsity=0.5), dict(sparsity=0.5, scope="global"), dict(granularity="2:4"),
                                    dict(sparsity=0.5, importance="wanda", data=[torch.arange(16).view(2, 8)])])
def test_tied_output_layer_is_left_out_with_a_warning(kwargs):
    model = TinyGPT()
    embedding = model.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match=TIED_HEAD_LEFT_OUT) as record:
        tp.prune(model, **kwargs)
    assert len(record) == 1 and record[0].filename == __file__  # one warning, at the call
    assert set(tp.masks(model)) == {"mlp"} and pruned_fraction(tp.masks(model)["mlp"]) == 0.5
    assert torch.equal(model.wte.weight, embedding) and model.lm_head.weight is model.wte.weight
    assert type(model.lm_head) is nn.Linear


def test_tied_output_layer_named_or_untied():
    model = TinyGPT()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Embedding 'wte' shares its weight with layer 'lm_head', which pruning "
                                         r"would change under it: leave 'lm_head' out of `scope` or untie it first"):
        tp.prune(model, scope={"mlp": 0.5, "lm_head": 0.5})
    assert_unchanged(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tp.prune(model, scope={"mlp": 0.5})  # not named: not a target, nothing to warn about
        tp.prune(model, sparsity=0.75, exclude=["lm_head"])
        assert set(tp.masks(model)) == {"mlp"}
        model = TinyGPT()
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untied: pruned alone
        embedding = model.wte.weight.detach().clone()
        tp.prune(model, sparsity=0.5)
    assert set(tp.masks(model)) == {"mlp", "lm_head"} and torch.equal(model.wte.weight, embedding)


def test_nan_weights_are_reported_not_kept(mlp):
    with torch.no_grad():
        mlp[2].weight[0, 0] = float("nan")
    before = snapshot(mlp)
    with pytest.raises(ValueError, match=r"layer '2' \(Linear\) has non-finite weights: 1 NaN"):
        tp.prune(mlp, sparsity=0.5)
    assert_unchanged(mlp, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_are_ranked_exactly(dtype):
    layer = nn.Linear(4, 1, bias=False).to(dtype)
    with torch.no_grad():  # squares underflow in half precision; ranking must still follow |w|
        layer.weight.copy_(torch.tensor([[3e-4, 1e-4, 2e-4, 4e-4]]))
    tp.prune(layer, sparsity=0.5, importance="l2")
    assert tp.masks(layer)[""].tolist() == [[True, False, False, True]]
    stored = float(layer.weight.detach()[0, 3])  # the stored value, rounded to half precision
    layer2 = nn.Linear(1, 1, bias=False).to(dtype)
    with torch.no_grad():
        layer2.weight.fill_(stored)
    tp.prune(layer2, threshold=stored + 1e-9)  # a threshold just above the stored value prunes it
    assert not tp.masks(layer2)[""].any()
